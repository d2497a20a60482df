"""What each algorithm cost: step time (and its ratio to ERM's), generated images, generation time, LDM fine-tuning
and their total per run.

The numbers DomainFusion's paper argues with (generated images vs CDGA/DSI, fine-tuned LDMs, extra training time),
read from the same results.jsonl records as the accuracy tables. The total is training steps + LDM fine-tuning +
generation outside the steps (before training, as CDGA/DSI, or during evaluation, as DSI_TestTime); a pool that was
refreshed (`pool_refreshes` > 0, DomainFusion) was generated inside the steps, so its time is already in step time.
Evaluating the classifier and loading data are left out: they are the same for every algorithm.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .records import Record, row_name


def run_costs(records: Sequence[Record]) -> dict[str, list[dict[str, float]]]:
    """Per algorithm, one dict per run: mean step time (weighted by the steps each record covers), generated images,
    generation seconds, fine-tuned LDMs and their fine-tuning seconds as of the run's last record, and the total."""
    runs: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        runs[r["args"]["output_dir"]].append(r)
    per_algorithm: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs.values():
        run = sorted(run, key=lambda r: r["step"])
        windows = np.diff([-1] + [r["step"] for r in run])  # a record's step_time averages the steps since the last
        last = run[-1]
        generation_s = float(last.get("generation_s", 0.0))
        finetune_s = float(last.get("ldm_finetune_s", 0.0))
        steps_s = float(np.dot([r["step_time"] for r in run], windows))
        per_algorithm[row_name(last["args"])].append(
            {
                "step_time": steps_s / float(windows.sum()),
                "generated_images": float(last.get("generated_images", 0)),
                "generation_s": generation_s,
                "ldm_finetuned_models": float(last.get("ldm_finetuned_models", 0)),
                "ldm_finetune_s": finetune_s,
                "total_s": steps_s + finetune_s + (0.0 if last.get("pool_refreshes", 0) > 0 else generation_s),
            }
        )
    return dict(per_algorithm)


def cost_table(records: Sequence[Record], algorithm_order: Sequence[str] = ()) -> str:
    """A Markdown table of `run_costs`, means over runs; the ERM ratio column needs ERM runs in the records."""
    costs = run_costs(records)
    erm = np.mean([c["step_time"] for c in costs["ERM"]]) if "ERM" in costs else float("nan")
    order = [a for a in algorithm_order if a in costs] + sorted(a for a in costs if a not in algorithm_order)
    lines = [
        "| algorithm | runs | step time (s) | × ERM | generated images / run | generation time / run (s) | "
        "fine-tuned LDMs / run | LDM fine-tuning / run (s) | total / run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for alg in order:
        runs = costs[alg]
        step = float(np.mean([c["step_time"] for c in runs]))
        ratio = f"{step / erm:.2f}" if np.isfinite(erm) else "–"
        lines.append(
            f"| {alg} | {len(runs)} | {step:.3f} | {ratio} | "
            f"{np.mean([c['generated_images'] for c in runs]):,.0f} | "
            f"{np.mean([c['generation_s'] for c in runs]):.0f} | "
            f"{np.mean([c['ldm_finetuned_models'] for c in runs]):.0f} | "
            f"{np.mean([c['ldm_finetune_s'] for c in runs]):.0f} | {np.mean([c['total_s'] for c in runs]):.0f} |"
        )
    return "\n".join(lines) + "\n"
