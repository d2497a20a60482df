"""The seeded hparam registry: DomainBed's values, per-name seeding, validation of overrides."""

from __future__ import annotations

import numpy as np
import pytest

from domainfusion import hparams as registry
from domainfusion.errors import UserError
from domainfusion.utils import seed_hash


def test_erm_defaults_are_domainbeds():
    assert registry.default_hparams("ERM", "RotatedMNIST") == {
        "data_augmentation": True,
        "resnet18": False,
        "resnet_dropout": 0.0,
        "class_balanced": False,
        "nonlinear_classifier": False,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "batch_size": 64,
    }
    pacs = registry.default_hparams("ERM", "PACS")
    assert pacs["lr"] == 5e-5 and pacs["batch_size"] == 32


def test_random_draw_is_reproducible_and_seeded_per_name():
    a = registry.random_hparams("ERM", "PACS", 7)
    assert a == registry.random_hparams("ERM", "PACS", 7)
    assert a != registry.random_hparams("ERM", "PACS", 8)
    r = np.random.RandomState(seed_hash(7, "lr"))
    assert a["lr"] == 10 ** r.uniform(-5, -3.5)
    r = np.random.RandomState(seed_hash(7, "batch_size"))
    assert a["batch_size"] == int(2 ** r.uniform(3, 5.5))
    for _ in range(20):
        draw = registry.random_hparams("ERM", "PACS", int(np.random.randint(1 << 30)))
        assert 1e-5 <= draw["lr"] <= 10**-3.5 and 8 <= draw["batch_size"] <= 45


def test_adding_an_hparam_does_not_change_the_others(monkeypatch):
    before = registry.random_hparams("ERM", "PACS", 3)

    def extra(algorithm, dataset, hparam):
        hparam("new_knob", 1.0, lambda r: float(r.uniform(0, 1)), 0.0, 1.0)

    monkeypatch.setattr(registry, "_algorithm_hparams", extra)
    after = registry.random_hparams("ERM", "PACS", 3)
    assert set(after) == set(before) | {"new_knob"}
    assert all(after[k] == v for k, v in before.items())


def test_resolve_uses_defaults_for_seed_zero_and_validates_overrides():
    assert registry.resolve_hparams("ERM", "PACS", 0, 5) == registry.default_hparams("ERM", "PACS")
    assert registry.resolve_hparams("ERM", "PACS", 2, 5) == registry.random_hparams("ERM", "PACS", seed_hash(2, 5))
    hp = registry.resolve_hparams("ERM", "PACS", 0, 0, '{"lr": 0.01, "batch_size": 16}')
    assert hp["lr"] == 0.01 and hp["batch_size"] == 16
    with pytest.raises(UserError, match="unknown hparam\\(s\\) \\['lrr'\\].*known: \\["):
        registry.resolve_hparams("ERM", "PACS", 0, 0, '{"lrr": 0.01}')
    with pytest.raises(UserError, match="'resnet_dropout'=1.5 is outside"):
        registry.resolve_hparams("ERM", "PACS", 0, 0, {"resnet_dropout": 1.5})
    with pytest.raises(UserError, match="'batch_size' must be a finite int"):
        registry.resolve_hparams("ERM", "PACS", 0, 0, {"batch_size": 3.5})
    with pytest.raises(UserError, match="'batch_size' must be a finite int, got inf"):
        registry.resolve_hparams("ERM", "PACS", 0, 0, '{"batch_size": Infinity}')
    with pytest.raises(UserError, match="'lr' must be a finite float, got nan"):
        registry.resolve_hparams("ERM", "PACS", 0, 0, '{"lr": NaN}')
    with pytest.raises(UserError, match="not valid JSON"):
        registry.resolve_hparams("ERM", "PACS", 0, 0, "{lr: 1}")


def test_dataset_blocks_come_from_the_dataset_class():
    """Size class and batch search are read off the registered class; an unregistered (DomainBed) name gets the
    base class's ResNet block, as DomainBed gives its other datasets."""
    assert registry.default_hparams("ERM", "DigitsDG") == registry.default_hparams("ERM", "RotatedMNIST")
    assert registry.default_hparams("ERM", "SVIRO") == registry.default_hparams("ERM", "PACS")
    for seed in range(20):
        r = np.random.RandomState(seed_hash(seed, "batch_size"))
        assert registry.random_hparams("ERM", "DomainNet", seed)["batch_size"] == int(2 ** r.uniform(3, 5))


def test_per_step_batches_are_registered_hparams():
    names = set(registry.specs("DomainFusion", "PACS"))
    assert set(registry.PER_STEP_BATCHES) <= names
    split = registry.local_hparams({"batch_size": 8, "ld_batch_size": 4, "lr": 0.1}, world=2)
    assert split == {"batch_size": 4, "ld_batch_size": 2, "lr": 0.1}
