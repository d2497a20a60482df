"""Image grids a person can look at: a dataset as rows = domains × columns = classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.base import MultipleDomainDataset
from ..data.loaders import labels_of


def first_index_per_class(env: Dataset, num_classes: int, per_class: int, seed: int) -> list[list[int]]:
    """Up to `per_class` seeded-random sample indices of each class in one environment."""
    labels = np.asarray(labels_of(env))
    rng = np.random.RandomState(seed)
    return [list(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in range(num_classes)]


def dataset_grid(dataset: MultipleDomainDataset, out_png: str | Path, per_class: int = 1, seed: int = 0) -> Path:
    """Save a PNG grid (rows = domains, columns = classes, `per_class` examples per cell) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(dataset), dataset.num_classes * per_class
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols + 1, 1.1 * n_rows + 0.6), squeeze=False)
    for r, env in enumerate(dataset.datasets):
        picks = first_index_per_class(env, dataset.num_classes, per_class, seed)
        for c in range(dataset.num_classes):
            for k in range(per_class):
                ax = axes[r][c * per_class + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(picks[c]):
                    ax.imshow(_to_rgb(env[int(picks[c][k])][0]))
                if r == 0 and k == 0:
                    ax.set_title(dataset.class_names[c], fontsize=8)
        axes[r][0].set_ylabel(dataset.environments[r], fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _to_rgb(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] with C ∈ {1, 2, 3} → (H, W, 3) for imshow (ColoredMNIST's 2 channels → red/green)."""
    x = x.detach().float().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 2:
        x = torch.cat([x, torch.zeros_like(x[:1])])
    return x.permute(1, 2, 0).numpy()
