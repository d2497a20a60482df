"""Harness fidelity: ERM at DomainBed's budget against DomainBed's published training-domain-validation numbers.

Published (Gulrajani & Lopez-Paz 2021, ERM, training-domain validation): RotatedMNIST 0° 95.9 ± 0.1, 15° 98.9,
30° 98.8, 45° 98.9, 60° 98.9, 75° 96.4; ColoredMNIST +90% 71.7, +80% 72.9, -90% 10.0. DomainBed's numbers select
over 20 random hparam draws × 3 trials; at default hparams the comparison is of the harness, not of the search.

Two phases, so the runs can happen on a GPU machine and the report here from the returned runs:

    python benchmarks/domainbed_fidelity.py launch --datasets RotatedMNIST,ColoredMNIST --n-trials 3 --n-parallel 9 \
        --device cuda --output-dir runs/bench_fidelity
    python benchmarks/domainbed_fidelity.py report --output-dir runs/bench_fidelity
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from domainfusion.utils import machine_description

from common import REPO, run, write_report

sys.path.insert(0, str(REPO))
from domainfusion.report.records import load_records  # noqa: E402
from domainfusion.report.selection import IIDAccuracySelection  # noqa: E402
from domainfusion.report.tables import trial_results  # noqa: E402

PUBLISHED = {
    "RotatedMNIST": {0: 95.9, 1: 98.9, 2: 98.8, 3: 98.9, 4: 98.9, 5: 96.4},
    "ColoredMNIST": {0: 71.7, 1: 72.9, 2: 10.0},
}
ENV_NAMES = {"RotatedMNIST": ["0°", "15°", "30°", "45°", "60°", "75°"], "ColoredMNIST": ["+90%", "+80%", "-90%"]}
LAUNCH_INFO = "launch.json"


def launch(a: argparse.Namespace) -> None:
    """One `domainfusion sweep` over every single held-out env at default hparams; it runs trial 0 of all first.

    Only the out-splits and the held-out domain are evaluated (`--no-eval-train-in`): no selection method reads the
    training domains' in-splits, and on MNIST-sized data they are two thirds of the evaluation compute.
    """
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAUNCH_INFO).write_text(
        json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "machine": machine_description()})
    )
    run(
        [
            "sweep",
            "launch",
            "--datasets",
            a.datasets,
            "--algorithms",
            "ERM",
            "--data-dir",
            a.data_dir,
            "--output-dir",
            str(out),
            "--n-hparams-from",
            "0",
            "--n-hparams",
            "1",
            "--n-trials",
            str(a.n_trials),
            "--single-test-envs",
            "--steps",
            str(a.steps),
            "--checkpoint-freq",
            str(a.checkpoint_freq),
            "--no-eval-train-in",
            "--n-parallel",
            str(a.n_parallel),
            "--device",
            a.device,
            "--skip-confirmation",
        ]
    )


def report(a: argparse.Namespace) -> None:
    """Training-domain validation per (dataset, held-out env), mean ± SE over trials, against the published table."""
    out = Path(a.output_dir)
    info = json.loads((out / LAUNCH_INFO).read_text())
    records = [r for done in sorted(out.glob("*/done")) for r in load_records(done.parent)]  # finished runs only
    results = trial_results(records, IIDAccuracySelection())
    lines, step_times = [], {}
    for r in records:
        if r["step"] > 0:
            step_times.setdefault(r["args"]["dataset"], []).append(r["step_time"])
    for dataset, published in PUBLISHED.items():
        for env, pub in published.items():
            accs = [100 * t.test_acc for t in results if t.dataset == dataset and t.test_env == env]
            if not accs:
                continue
            mean, err = float(np.mean(accs)), float(np.std(accs) / np.sqrt(len(accs)))
            trials = ", ".join(f"{x:.1f}" for x in accs)
            lines.append(
                f"| {dataset} | {ENV_NAMES[dataset][env]} | {mean:.1f} ± {err:.1f} | {trials} | {pub:.1f} | "
                f"{mean - pub:+.2f} | {'yes' if abs(mean - pub) <= 1.0 else 'no'} |"
            )
    steps = sorted({r["args"]["steps"] for r in records})
    freqs = sorted({r["args"]["checkpoint_freq"] for r in records})
    timing = "; ".join(f"{d} {1000 * np.mean(t):.1f} ms" for d, t in sorted(step_times.items()))
    body = (
        f"Runs launched on: {info['machine']}\n\nLaunch command: `{info['command']}`\n\n"
        f"ERM, default hparams (hparams seed 0), {steps} steps, checkpoint every {freqs} steps, out-splits and "
        f"held-out domain evaluated, training-domain validation selection, mean ± standard error over trial "
        f"seeds (DomainBed's formula). Target: within 1.0 point of each published number.\n\n"
        "| dataset | test env | ours | per trial | DomainBed | gap | within 1.0 |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + f"\n\nMean step time: {timing}.\n"
        + (f"\n{a.note}\n" if a.note else "")
    )
    write_report("domainbed-fidelity", shlex.join([sys.executable, *sys.argv]), body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["launch", "report"])
    p.add_argument("--datasets", default="RotatedMNIST,ColoredMNIST")
    p.add_argument("--n-trials", type=int, default=1)
    p.add_argument("--n-parallel", type=int, default=1)
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--checkpoint-freq", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--output-dir", default="runs/bench_fidelity")
    p.add_argument("--note", default="", help="report: a paragraph on how the runs went (interruptions, load)")
    a = p.parse_args()
    launch(a) if a.phase == "launch" else report(a)


if __name__ == "__main__":
    main()
