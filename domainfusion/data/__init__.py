"""Datasets: a registry of DomainBed-compatible multi-domain datasets, imported lazily by name.

A new dataset is one module in this folder plus one line in `DATASETS` ("Name": "module:Class"; the line rather than
a decorator, so listing the names imports no dataset module and its dependencies). The module's class subclasses
`base.MultipleDomainDataset` (or `base.DigitDataset`), is built as `cls(root, test_envs, hparams)` (image folders
take `image_folder.MultipleEnvironmentImageFolder`'s arguments), and declares as class attributes what the rest of
the package reads without building it (`dataset_traits`): `ENVIRONMENTS`, `INPUT_SHAPE`, DomainBed's training budget,
the hparams' size class (`SMALL_IMAGES`, `BATCH_SEARCH_MAX_LOG2`) and the LDM prompts (`PROMPT_TEMPLATE`,
`DOMAIN_PROMPT_TEMPLATE`, `DOMAIN_DESCRIPTIONS`, `UNDESCRIBED_DOMAIN`); `base.py` documents their defaults.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .base import MultipleDomainDataset, check_test_envs

DATASETS: dict[str, str] = {
    "RotatedMNIST": "mnist:RotatedMNIST",
    "ColoredMNIST": "mnist:ColoredMNIST",
    "DigitsDG": "digits_dg:DigitsDG",
    "PACS": "image_folder:PACS",
    "VLCS": "image_folder:VLCS",
    "OfficeHome": "image_folder:OfficeHome",
    "TerraIncognita": "image_folder:TerraIncognita",
    "DomainNet": "image_folder:DomainNet",
    "ImageFolder": "image_folder:ImageFolderDataset",
}


def dataset_class(name: str) -> type[MultipleDomainDataset]:
    """The registered class of `name`, imported but not built; an unknown name is a UserError listing the known."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    module, cls = DATASETS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def dataset_traits(name: str) -> type[MultipleDomainDataset]:
    """The class whose attributes describe dataset `name` (hparams' size class, LDM prompts), not built.

    A name not registered here (a DomainBed dataset named to `domainfusion.domainbed` or `RunContext.for_data`) reads
    `MultipleDomainDataset`'s defaults: the ResNet hparams and generic prompts.
    """
    return dataset_class(name) if name in DATASETS else MultipleDomainDataset


def get_dataset(
    name: str,
    data_dir: str | Path,
    test_envs: Sequence[int],
    hparams: dict,
    allow_missing_classes: bool = False,
    image_size: int | None = None,
    skip_bad_images: bool = False,
) -> MultipleDomainDataset:
    """Build a dataset by registry name; test envs are checked against the known environments first.

    `allow_missing_classes`, `image_size` and `skip_bad_images` apply to image-folder datasets (the others have
    fixed content).
    """
    cls = dataset_class(name)
    if cls.ENVIRONMENTS:
        check_test_envs(test_envs, cls.ENVIRONMENTS, name)
    from .image_folder import MultipleEnvironmentImageFolder

    if issubclass(cls, MultipleEnvironmentImageFolder):
        dataset = cls(data_dir, test_envs, hparams, allow_missing_classes, image_size, skip_bad_images)
    else:
        dataset = cls(data_dir, test_envs, hparams)
    check_test_envs(test_envs, dataset.environments, name)
    return dataset
