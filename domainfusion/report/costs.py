"""What each algorithm cost: step time (and its ratio to ERM's), generated images and generation time per run.

The numbers DomainFusion's paper argues with (generated images vs CDGA/DSI, extra training time), read from the
same results.jsonl records as the accuracy tables.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from domainfusion.report.records import Record


def run_costs(records: Sequence[Record]) -> dict[str, list[dict[str, float]]]:
    """Per algorithm, one dict per run: mean step time (weighted by the steps each record covers), generated images
    and generation seconds as of the run's last record."""
    runs: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        runs[r["args"]["output_dir"]].append(r)
    per_algorithm: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs.values():
        run = sorted(run, key=lambda r: r["step"])
        windows = np.diff([-1] + [r["step"] for r in run])  # a record's step_time averages the steps since the last
        last = run[-1]
        per_algorithm[last["args"]["algorithm"]].append({
            "step_time": float(np.average([r["step_time"] for r in run], weights=windows)),
            "generated_images": float(last.get("generated_images", 0)),
            "generation_s": float(last.get("generation_s", 0.0)),
        })
    return dict(per_algorithm)


def cost_table(records: Sequence[Record], algorithm_order: Sequence[str] = ()) -> str:
    """A Markdown table of `run_costs`, means over runs; the ERM ratio column needs ERM runs in the records."""
    costs = run_costs(records)
    erm = np.mean([c["step_time"] for c in costs["ERM"]]) if "ERM" in costs else float("nan")
    order = [a for a in algorithm_order if a in costs] + sorted(a for a in costs if a not in algorithm_order)
    lines = ["| algorithm | runs | step time (s) | × ERM | generated images / run | generation time / run (s) |",
             "|---|---|---|---|---|---|"]
    for alg in order:
        runs = costs[alg]
        step = float(np.mean([c["step_time"] for c in runs]))
        ratio = f"{step / erm:.2f}" if np.isfinite(erm) else "–"
        lines.append(f"| {alg} | {len(runs)} | {step:.3f} | {ratio} | "
                     f"{np.mean([c['generated_images'] for c in runs]):,.0f} | "
                     f"{np.mean([c['generation_s'] for c in runs]):.0f} |")
    return "\n".join(lines) + "\n"
