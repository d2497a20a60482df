"""ERM baseline on DigitsDG-offline: full leave-one-domain-out table, 3 trial seeds, a CPU-sized budget.

This is the table the DomainFusion method is judged against (same budget, seeds and selection). Usage:

    .venv/bin/python benchmarks/erm_digitsdg.py --steps 150 --checkpoint-freq 50 --n-parallel 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from common import REPO, run, write_report

ENVS = ["mnist", "mnist_m", "syn", "optdigits"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--checkpoint-freq", type=int, default=50)
    p.add_argument("--n-trials", type=int, default=3)
    p.add_argument("--n-parallel", type=int, default=2)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--output-dir", default="runs/bench_erm_digitsdg")
    p.add_argument("--algorithms", default="ERM")
    p.add_argument("--hparams", default=None, help="JSON overrides applied to every run, e.g. a smaller batch")
    a = p.parse_args()

    sweep_args = [
        "sweep", "launch", "--datasets", "DigitsDG", "--algorithms", a.algorithms, "--data-dir", a.data_dir,
        "--output-dir", a.output_dir, "--n-hparams-from", "0", "--n-hparams", "1", "--n-trials", str(a.n_trials),
        "--single-test-envs", "--steps", str(a.steps), "--checkpoint-freq", str(a.checkpoint_freq),
        "--no-eval-train-in", "--launcher", "local", "--n-parallel", str(a.n_parallel), "--skip-confirmation",
    ] + (["--hparams", a.hparams] if a.hparams else [])
    run(["datasets", "show", "DigitsDG", "--data-dir", a.data_dir, "--out", "/tmp/digitsdg_warmup.png"])
    _, wall = run(sweep_args)
    tables = {}
    for sel in ("iid", "oracle"):
        rows_path = Path(a.output_dir) / f"rows_{sel}.json"
        tables[sel], _ = run(["results", a.output_dir, "--selection", sel, "--json-out", str(rows_path)])
    plot = REPO / "benchmarks" / "reports" / "erm_digitsdg_accuracy.png"
    run(["results", a.output_dir, "--plot", str(plot)])

    rows = json.loads((Path(a.output_dir) / "rows_iid.json").read_text())
    per_trial = "\n".join(
        f"| {r['algorithm']} | {ENVS[r['test_env']]} | {r['trial_seed']} | {100 * r['test_acc']:.1f} | "
        f"{100 * r['val_acc']:.1f} |"
        for r in sorted(rows, key=lambda r: (r["algorithm"], r["test_env"], r["trial_seed"]))
    )
    step_times = _step_times(Path(a.output_dir))
    body = (
        f"Budget: {a.steps} steps per run, checkpoint every {a.checkpoint_freq} steps, default hparams "
        f"(hparams seed 0) with overrides {a.hparams or 'none'}, {a.n_trials} trial seeds, {a.n_parallel} runs in parallel; the training domains' "
        f"in-splits are not evaluated (`--no-eval-train-in`; no selection method reads them).\n\n"
        f"Sweep wall time: {wall / 60:.1f} min. Mean step time: {step_times:.3f} s.\n\n"
        f"## Training-domain validation (the protocol's headline)\n\n{tables['iid']}\n"
        f"## Test-domain validation (oracle)\n\n{tables['oracle']}\n"
        f"## Per trial (training-domain validation)\n\n| algorithm | held-out | trial | test acc | val acc |\n"
        f"|---|---|---|---|---|\n{per_trial}\n\n![accuracy vs step](erm_digitsdg_accuracy.png)\n"
    )
    write_report("erm-digitsdg", shlex.join([sys.executable, *sys.argv]), body)


def _step_times(sweep_dir: Path) -> float:
    times = []
    for f in sweep_dir.glob("*/results.jsonl"):
        times += [json.loads(l)["step_time"] for l in f.read_text().splitlines()[1:] if l.strip()]
    return float(np.mean(times)) if times else float("nan")


if __name__ == "__main__":
    main()
