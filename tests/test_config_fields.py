"""The one declaration of result-free settings and the one resume diff that train and the LDM trainer share."""

from dataclasses import dataclass, field

from domainfusion.config_fields import ResultFree, changed_fields, result_free, result_free_fields
from domainfusion.ldm.training import LDMTrainConfig
from domainfusion.sweep import EXTRA_FIELDS, PLACEMENT_FIELDS
from domainfusion.train import TrainArgs


@dataclass
class Config:
    size: tuple[int, int] = (2, 3)
    lr: float = 0.1
    added_later: int = 7
    device: str = result_free(ResultFree.PLACEMENT, default="cpu")
    progress: bool = result_free(ResultFree.INVOCATION, default=True)
    tags: list[str] = field(default_factory=list)


def test_changed_fields_ignores_result_free_and_compares_as_json():
    saved = {"size": [2, 3], "lr": 0.1, "device": "cuda", "progress": False, "tags": []}
    assert changed_fields(saved, Config(), Config()) == []  # tuple == its saved list; added_later == its default
    assert changed_fields(saved, Config(lr=0.2, added_later=8, tags=["a"]), Config()) == ["added_later", "lr", "tags"]


def test_declared_kinds():
    assert result_free_fields(Config) == ("device", "progress")
    assert result_free_fields(Config, ResultFree.INVOCATION) == ("progress",)
    assert set(result_free_fields(TrainArgs)) == {"resume", "progress", "device", "num_workers", "overwrite",
                                                  "tensorboard", "output_dir"}
    assert set(result_free_fields(LDMTrainConfig)) == {"resume", "progress", "device"}
    assert set(PLACEMENT_FIELDS) == {"output_dir", "device", "num_workers"}  # out of sweep folder names
    assert not {"resume", "progress", "overwrite"} & set(EXTRA_FIELDS)  # set by the sweep's job command
