"""Learning curves of a sweep: what model selection sees (validation) next to what it is judged on (test).

Drawn on a bare Agg `Figure` rather than through pyplot, so plotting works headless and leaves no global state.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import UserError
from .records import Record, num_envs, row_name, split_incomparable


def plot_accuracy_vs_step(
    records: Sequence[Record],
    out_png: str | os.PathLike,
    env_names: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Plot, per run, test-env in-acc (solid) and mean training-env out-acc (dashed) against step.

    One panel per (dataset, test env), one colour per algorithm; markers keep single-checkpoint runs visible.
    Only single-test-env runs are drawn: the two-test-env runs exist for leave-one-out validation and have no
    single held-out curve.
    """
    runs: dict[str, list[Record]] = defaultdict(list)
    for record in split_incomparable(records):
        if len(record["args"]["test_envs"]) == 1:
            runs[json.dumps(record["args"], sort_keys=True, default=str)].append(record)
    if not runs:
        raise UserError("no run with a single test env to plot; is this a DomainBed-style sweep directory?")

    panels: dict[tuple[str, int], list[list[Record]]] = defaultdict(list)
    for run in runs.values():
        args = run[0]["args"]
        panels[(args["dataset"], args["test_envs"][0])].append(sorted(run, key=lambda r: r["step"]))
    algorithms = sorted({row_name(r["args"]) for run in runs.values() for r in run})
    colors = {alg: f"C{i % 10}" for i, alg in enumerate(algorithms)}
    env_names = env_names or {}

    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4 * ncols + 2, 3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (dataset, test_env) in zip(axes, sorted(panels)):
        for run in panels[(dataset, test_env)]:
            color = colors[row_name(run[0]["args"])]
            steps = [r["step"] for r in run]
            test = [100 * r[f"env{test_env}_in_acc"] for r in run]
            val = [100 * np.mean([r[f"env{i}_out_acc"] for i in range(num_envs(r)) if i != test_env]) for r in run]
            ax.plot(steps, test, color=color, linestyle="-", marker=".", alpha=0.7)
            ax.plot(steps, val, color=color, linestyle="--", marker=".", alpha=0.7)
        names = env_names.get(dataset)
        ax.set_title(f"{dataset}, test env {names[test_env] if names else test_env}")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)

    handles = [Line2D([], [], color=colors[alg], label=alg) for alg in algorithms] + [
        Line2D([], [], color="gray", linestyle="-", label="test env (in split)"),
        Line2D([], [], color="gray", linestyle="--", label="train envs (out split, mean)"),
    ]
    fig.legend(handles=handles, loc="outside right upper")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
