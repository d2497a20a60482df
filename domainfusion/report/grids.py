"""Image grids a person can look at: a dataset as rows = domains × columns = classes.

Drawn on a bare Agg `Figure` rather than through pyplot, as `report/plots.py` is: headless, and no global state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from ..data.base import MultipleDomainDataset
from ..data.loaders import labels_of
from ..images import to_rgb, to_uint8


def first_index_per_class(env: Dataset, num_classes: int, per_class: int, seed: int) -> list[list[int]]:
    """Up to `per_class` seeded-random sample indices of each class in one environment."""
    labels = np.asarray(labels_of(env))
    rng = np.random.RandomState(seed)
    return [list(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in range(num_classes)]


def dataset_grid(dataset: MultipleDomainDataset, out_png: str | Path, per_class: int = 1, seed: int = 0) -> Path:
    """Save a PNG grid (rows = domains, columns = classes, `per_class` examples per cell) and return its path."""
    n_rows, n_cols = len(dataset), dataset.num_classes * per_class
    fig = Figure(figsize=(1.1 * n_cols + 1, 1.1 * n_rows + 0.6))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, env in enumerate(dataset.datasets):
        picks = first_index_per_class(env, dataset.num_classes, per_class, seed)
        for c in range(dataset.num_classes):
            for k in range(per_class):
                ax = axes[r][c * per_class + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(picks[c]):
                    ax.imshow(to_uint8(to_rgb(env[int(picks[c][k])][0]), channels_last=True).numpy())
                if r == 0 and k == 0:
                    ax.set_title(dataset.class_names[c], fontsize=8)
        axes[r][0].set_ylabel(dataset.environments[r], fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
