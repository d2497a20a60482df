"""Algorithms side by side on DigitsDG-offline: leave-one-domain-out, trial seeds, one identical CPU-sized budget.

Every algorithm runs through the same `domainfusion sweep` (same seeds, splits, steps, selection); the report adds
what generative methods cost: generated images, generation time, LDM fine-tuning (DSI), their total, and step time
relative to ERM. Launching into an existing output dir adds the new algorithms' runs next to the finished ones (the
sweep skips those) and reports all of them. Usage:

    .venv/bin/python benchmarks/digitsdg_table.py --steps 300 --algorithms ERM --name erm-digitsdg
    .venv/bin/python benchmarks/digitsdg_table.py --algorithms ERM,CDGA,DomainFusion --test-envs 1 \
        --name method-digitsdg
    .venv/bin/python benchmarks/digitsdg_table.py --algorithms DSI,DSI_TestTime --test-envs 1 --n-trials 1 \
        --steps 300 --checkpoint-freq 100 --output-dir runs/bench_method --name method-digitsdg-dsi \
        --hparams '{"batch_size": 32, "dsi_finetune_steps": 100, "dsi_translate_fraction": 0.1, "img2img_steps": 10}'
    .venv/bin/python benchmarks/digitsdg_table.py --plan benchmarks/plans/method-v2.json --steps 1000 \
        --checkpoint-freq 100 --device cuda --n-parallel 16 --output-dir runs/bench_v2 --name method-digitsdg-v2

A `--plan` is a JSON list of rows, each {"variant", "algorithm", "hparams", "priority"} and optionally "test_envs"
(e.g. "1") and "n_hparams": every row's jobs go into one sweep (so parallel slots never idle between rows), ordered
by priority, then trial seed, then row, so a launch stopped early has finished the rows that matter most; each row is
its own line in the tables (`--variant`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from common import REPO, run, write_report

sys.path.insert(0, str(REPO))
from domainfusion.launchers import get_launcher  # noqa: E402
from domainfusion.report.records import Record, group_records, load_records, row_name  # noqa: E402
from domainfusion.report.selection import IIDAccuracySelection  # noqa: E402
from domainfusion.sweep import make_jobs, sweep  # noqa: E402

ENVS = ["mnist", "mnist_m", "syn", "optdigits"]


def coverage_table(records: list[Record], rows: list[dict]) -> str:
    """Per algorithm, the hparams overrides its runs recorded and the held-out domains each trial seed finished, read
    from the runs (not from this command's flags), so a report of runs launched by several calls says what it holds.
    A trial missing some held-out domains is flagged: the Averages table averages it over the ones it has."""
    overrides: dict[str, set[str]] = {}
    for record in records:
        overrides.setdefault(row_name(record["args"]), set()).add(record["args"]["hparams"] or "none")
    done: dict[str, dict[int, list[str]]] = {}
    for r in sorted(rows, key=lambda r: r["test_env"]):
        done.setdefault(r["algorithm"], {}).setdefault(r["trial_seed"], []).append(ENVS[r["test_env"]])
    lines = []
    for algorithm in sorted(done):
        trials = "; ".join(
            f"{seed}: {', '.join(envs)}" + ("" if len(envs) == len(ENVS) else " (**incomplete**)")
            for seed, envs in sorted(done[algorithm].items())
        )
        lines.append(f"| {algorithm} | {' / '.join(f'`{o}`' for o in sorted(overrides[algorithm]))} | {trials} |")
    return (
        "| algorithm | hparams overrides recorded by its runs | trial seed: finished held-out domains |\n"
        "|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def search_table(records: list[Record]) -> str:
    """Every random-search draw of every (algorithm, held-out domain, trial): the training-domain validation
    accuracy that ranks it, the test accuracy it would give, which one the selection keeps, and the hparams that
    vary between the draws, so a reader sees what the search tried and how close the runners-up were."""
    lines = []
    for group in group_records(records):
        ranked = IIDAccuracySelection().hparams_accs(group.records)
        names = {k for _, runs in ranked for k in runs[-1]["hparams"]}
        varying = sorted(k for k in names if len({repr(runs[-1]["hparams"].get(k)) for _, runs in ranked}) > 1)
        for acc, runs in sorted(ranked, key=lambda pair: pair[1][0]["args"]["hparams_seed"]):
            hp = runs[-1]["hparams"]
            shown = ", ".join(
                f"{k}={hp[k]:.3g}" if isinstance(hp.get(k), float) else f"{k}={hp.get(k, '(not recorded)')}"
                for k in varying
            )
            kept = "**kept**" if run is ranked[0][1] else ""
            lines.append(
                f"| {group.algorithm} | {ENVS[group.test_env]} | {group.trial_seed} | "
                f"{run[0]['args']['hparams_seed']} | {100 * acc.val_acc:.1f} | {100 * acc.test_acc:.1f} | {kept} | "
                f"{shown} |"
            )
    return (
        "| algorithm | held-out | trial | hparams seed | val acc | test acc | | hparams that vary |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def plan_jobs(plan_path: str, a: argparse.Namespace) -> list:
    """The jobs of every row of a plan, in launch order (priority, trial seed, row)."""
    rows = json.loads(Path(plan_path).read_text())
    keyed = []
    for i, row in enumerate(rows):
        hparams = {**json.loads(a.hparams or "{}"), **row.get("hparams", {})}
        test_envs = row.get("test_envs", a.test_envs)
        jobs = make_jobs(
            ["DigitsDG"],
            [row["algorithm"]],
            n_hparams_from=0,
            n_hparams=row.get("n_hparams", a.n_hparams),
            n_trials=a.n_trials,
            data_dir=a.data_dir,
            output_dir=a.output_dir,
            steps=a.steps,
            checkpoint_freq=a.checkpoint_freq,
            single_test_envs=test_envs is None,
            test_envs=[[int(e)] for e in test_envs.split(";")] if test_envs else None,
            hparams=hparams or None,
            extra={"eval_train_in": False, "device": a.device, "variant": row["variant"]},
        )
        keyed += [((row["priority"], job.args["trial_seed"], i), job) for job in jobs]
    return [job for _, job in sorted(keyed, key=lambda pair: pair[0])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--checkpoint-freq", type=int, default=50)
    p.add_argument("--n-trials", type=int, default=3)
    p.add_argument(
        "--n-hparams",
        type=int,
        default=1,
        help="hparams seeds 0..N-1 per run (0 = defaults, others = the registry's random-search draws); each "
        "(held-out domain, trial) keeps the seed with the best training-domain validation accuracy",
    )
    p.add_argument("--n-parallel", type=int, default=2)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--output-dir", default="runs/bench_digitsdg")
    p.add_argument("--algorithms", default="ERM")
    p.add_argument("--plan", default=None, help="a JSON list of rows (variants) to launch instead of --algorithms")
    p.add_argument("--test-envs", default=None, help="held-out domains, e.g. '1' or '0;1' (default: each one)")
    p.add_argument("--hparams", default=None, help="JSON overrides applied to every run, e.g. a smaller batch")
    p.add_argument("--name", default="erm-digitsdg", help="report name: benchmarks/reports/<date>-<name>.md")
    p.add_argument("--device", default="auto", help="where the runs train (cuda on a GPU machine)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="launch nothing: report the runs already in --output-dir (a launch stopped early, or runs brought back "
        "from another machine)",
    )
    a = p.parse_args()

    sweep_args = [
        "sweep",
        "launch",
        "--datasets",
        "DigitsDG",
        "--algorithms",
        a.algorithms,
        "--data-dir",
        a.data_dir,
        "--output-dir",
        a.output_dir,
        "--n-hparams-from",
        "0",
        "--n-hparams",
        str(a.n_hparams),
        "--n-trials",
        str(a.n_trials),
        "--single-test-envs",
        *(["--test-envs", a.test_envs] if a.test_envs else []),
        "--steps",
        str(a.steps),
        "--checkpoint-freq",
        str(a.checkpoint_freq),
        "--no-eval-train-in",
        "--launcher",
        "local",
        "--n-parallel",
        str(a.n_parallel),
        "--device",
        a.device,
        "--skip-confirmation",
    ] + (["--hparams", a.hparams] if a.hparams else [])
    wall = None
    if not a.report_only:
        run(["datasets", "show", "DigitsDG", "--data-dir", a.data_dir, "--out", "/tmp/digitsdg_warmup.png"])
        if a.plan:
            start = time.time()
            sweep("launch", plan_jobs(a.plan, a), get_launcher("local", {}), a.n_parallel, skip_confirmation=True)
            wall = time.time() - start
        else:
            _, wall = run(sweep_args)
    tables = {}
    for sel in ("iid", "oracle"):
        rows_path = Path(a.output_dir) / f"rows_{sel}.json"
        tables[sel], _ = run(["results", a.output_dir, "--selection", sel, "--json-out", str(rows_path)])
    tables["oracle"] = tables["oracle"].split("\n## Cost per run")[0]  # the cost table is the same for both
    plot = REPO / "benchmarks" / "reports" / f"{a.name.replace('-', '_')}_accuracy.png"
    run(["results", a.output_dir, "--plot", str(plot)])

    rows = json.loads((Path(a.output_dir) / "rows_iid.json").read_text())
    records = load_records(a.output_dir)
    per_trial = "\n".join(
        f"| {r['algorithm']} | {ENVS[r['test_env']]} | {r['trial_seed']} | {r['hparams_seed']} | "
        f"{100 * r['test_acc']:.1f} | {100 * r['val_acc']:.1f} |"
        for r in sorted(rows, key=lambda r: (r["algorithm"], r["test_env"], r["trial_seed"]))
    )
    hparams_text = (
        "default hparams (hparams seed 0)"
        if a.n_hparams == 1
        else f"hparams seeds 0..{a.n_hparams - 1} (0 = defaults, the others random-search draws; the selection method "
        f"picks one per held-out domain and trial)"
    )
    overrides = "the overrides each algorithm recorded (below)" if a.report_only else f"overrides {a.hparams or 'none'}"
    body = (
        f"Budget: {a.steps} steps per run, checkpoint every {a.checkpoint_freq} steps, {hparams_text} with "
        f"{overrides}, "
        f"{a.n_trials} trial seeds, {a.n_parallel} runs in parallel; the training domains' "
        f"in-splits are not evaluated (`--no-eval-train-in`; no selection method reads them).\n\n"
        + (
            f"Sweep wall time (this launch's jobs only): {wall / 60:.1f} min. "
            if wall is not None
            else "Reported from the runs in the output folder (`--report-only`); no sweep was launched by this "
            "command. "
        )
        + "In the cost table, step time includes "
        f"DomainFusion's pool refreshes (they run inside training steps); CDGA's and DSI's offline generation happens "
        f"before step 0, DSI_TestTime's during evaluation, and DSI's per-domain LDM fine-tuning before everything: "
        f"those are only in their own columns and in the total (steps + fine-tuning + generation outside steps; "
        f"classifier evaluation excluded).\n\n"
        f"## What the folder holds\n\n{coverage_table(records, rows)}\n"
        f"## Training-domain validation (the protocol's headline)\n\n{tables['iid']}\n"
        f"## Test-domain validation (oracle)\n\n{tables['oracle']}\n"
        f"## Per trial (training-domain validation)\n\n"
        f"| algorithm | held-out | trial | hparams seed | test acc | val acc |\n"
        f"|---|---|---|---|---|---|\n{per_trial}\n\n![accuracy vs step]({plot.name})\n"
    )
    if any(r["args"]["hparams_seed"] for r in records):
        body += f"\n## Random-search draws (training-domain validation)\n\n{search_table(records)}"
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
