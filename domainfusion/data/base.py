"""The multi-domain dataset contract shared by every dataset (DomainBed's `MultipleDomainDataset`).

A dataset is a list of per-environment torch datasets yielding `(x, y)` with x a float tensor in [0, 1]
(normalisation lives in the networks, so the diffusion layer can always see real pixels), plus metadata. What the
rest of the package knows about a dataset (its hparams' size class, how an LDM is prompted for it) is declared on its
class, read there without building it (`data.dataset_traits`), so a new dataset is one file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.utils.data

from ..errors import UserError


class MultipleDomainDataset:
    """Environments in a fixed order; `N_STEPS`/`CHECKPOINT_FREQ` are DomainBed's per-dataset training budget."""

    N_STEPS: int = 5001
    CHECKPOINT_FREQ: int = 100
    N_WORKERS: int = 2
    ENVIRONMENTS: Sequence[str] = ()
    INPUT_SHAPE: tuple[int, int, int] = (3, 224, 224)
    # Read off the class without building it (`data.dataset_traits`). hparams.py: DomainBed's small-image block or
    # its ResNet block. ldm/adapt.py: the LDM prompts ("{cls}" = a class name, "{description}" = a domain's look).
    SMALL_IMAGES: bool = False  # lr 1e-3, batch 64 searched over 2**U(3, 9), no weight decay: MNIST-sized images
    BATCH_SEARCH_MAX_LOG2: float = 5.5  # the ResNet block's batch search, 2**U(3, this) (DomainBed: 5 for DomainNet)
    PROMPT_TEMPLATE: str = "a photo of a {cls}"  # a class
    DOMAIN_PROMPT_TEMPLATE: str = "{description} of a {cls}"  # a class in one domain's look (CDGA moves between them)
    DOMAIN_DESCRIPTIONS: Mapping[str, str] = {}  # environment name -> its look (also kept out of the style vocabulary)
    UNDESCRIBED_DOMAIN: str = "a {domain} image"  # the look of an environment not in DOMAIN_DESCRIPTIONS, by its name

    def __init__(self) -> None:
        self.datasets: list[torch.utils.data.Dataset] = []
        self.input_shape: tuple[int, int, int] = self.INPUT_SHAPE
        self.num_classes: int = 0
        self.class_names: list[str] = []
        self.environments: list[str] = list(self.ENVIRONMENTS)
        self.skipped_images: list[str] = []  # unreadable files left out (--skip-bad-images)

    def __getitem__(self, index: int) -> torch.utils.data.Dataset:
        return self.datasets[index]

    def __len__(self) -> int:
        return len(self.datasets)


class DigitDataset(MultipleDomainDataset):
    """The ten digits, prompted in the embedded LDM's caption wording ('a photo of the digit 3, printed'), so its text
    conditioning knows every word; an environment without a description is named as it is ('..., 15')."""

    PROMPT_TEMPLATE = "a photo of the digit {cls}"
    DOMAIN_PROMPT_TEMPLATE = PROMPT_TEMPLATE + ", {description}"
    UNDESCRIBED_DOMAIN = "{domain}"


def existing_data_dir(root: str | Path, holds: str) -> Path:
    """`root` when it is a folder; else one error: a typo in --data-dir must never become a folder with a download."""
    if not Path(root).is_dir():
        raise UserError(
            f"--data-dir {root} does not exist; create it ({holds} is then fetched into it once) or pass "
            "the folder that already holds it"
        )
    return Path(root)


def check_test_envs(test_envs: Sequence[int], environments: Sequence[str], dataset: str) -> None:
    """Fail before any data is loaded when a test env index does not exist."""
    valid = ", ".join(f"{i}={name}" for i, name in enumerate(environments))
    for env in test_envs:
        if not 0 <= env < len(environments):
            raise UserError(f"--test-envs {env} is out of range for {dataset}; valid environments: {valid}")
    if len(set(test_envs)) != len(test_envs):
        raise UserError(f"--test-envs {list(test_envs)} repeats an environment")
    if len(set(test_envs)) >= len(environments):
        raise UserError(f"--test-envs {list(test_envs)} leaves no training environment; valid environments: {valid}")
