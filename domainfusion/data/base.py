"""The multi-domain dataset contract shared by every dataset (DomainBed's `MultipleDomainDataset`).

A dataset is a list of per-environment torch datasets yielding `(x, y)` with x a float tensor in [0, 1]
(normalisation lives in the networks, so the diffusion layer can always see real pixels), plus metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.utils.data

from ..errors import UserError


class MultipleDomainDataset:
    """Environments in a fixed order; `N_STEPS`/`CHECKPOINT_FREQ` are DomainBed's per-dataset training budget."""

    N_STEPS: int = 5001
    CHECKPOINT_FREQ: int = 100
    N_WORKERS: int = 2
    ENVIRONMENTS: Sequence[str] = ()
    INPUT_SHAPE: tuple[int, int, int] = (3, 224, 224)

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


def existing_data_dir(root: str | Path, holds: str) -> Path:
    """`root` when it is a folder; else one error, so a typo in --data-dir never becomes a new folder with a download."""
    if not Path(root).is_dir():
        raise UserError(f"--data-dir {root} does not exist; create it ({holds} is then fetched into it once) or pass "
                        "the folder that already holds it")
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
