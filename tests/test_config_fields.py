"""The one declaration of result-free settings and the one resume diff that train and the LDM trainer share."""

from dataclasses import dataclass, field

from domainfusion.config_fields import ResultFree, changed_fields, result_free, result_free_fields
from domainfusion.ldm.train_config import LDMTrainConfig
from domainfusion.sweep import EXTRA_FIELDS, PLACEMENT_FIELDS, make_jobs
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
    assert set(result_free_fields(TrainArgs)) == {
        "resume",
        "progress",
        "device",
        "num_workers",
        "ldm_max_batch",
        "overwrite",
        "tensorboard",
        "output_dir",
    }
    assert set(result_free_fields(LDMTrainConfig)) == {
        "output_dir",
        "resume",
        "progress",
        "device",
        "unet_gradient_checkpointing",
    }
    assert set(PLACEMENT_FIELDS) == {"output_dir", "device", "num_workers", "ldm_max_batch"}  # out of folder names
    assert not {"resume", "progress", "overwrite"} & set(EXTRA_FIELDS)  # set by the sweep's job command


def test_sweep_folder_names_are_stable_and_ignore_placement():
    """Folder names of a fixed grid as the sweep named them before result-free fields were declared (df71eae): a
    sweep launched then resumes in the same folders, whatever device, workers or LDM batch it now runs with."""

    def names(**placement) -> list[str]:
        jobs = make_jobs(
            ["DigitsDG"],
            ["ERM", "DomainFusion"],
            n_hparams=2,
            n_trials=1,
            data_dir="data",
            output_dir="sw",
            single_test_envs=True,
            extra={"ldm": "embedded", **placement},
        )
        return [job.output_dir.name for job in jobs]

    before = names(device="cpu", num_workers=0)
    assert len(before) == 16 and before[:2] == ["e49b2a0b2a87cf5c7e671ad3bf9dc1d8", "f9665f7e78ffafa4c9884aa8c492cf94"]
    assert before[-1] == "eafa49c3032c03288c3f12846606725f"
    assert names(device="cuda", num_workers=4, ldm_max_batch=2) == before
