"""Report layer on hand-made DomainBed records; every expected number below is computed by hand in comments."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from domainfusion.errors import UserError
from domainfusion.report import (
    SELECTION_METHODS,
    IIDAccuracySelection,
    LeaveOneOutSelection,
    OracleSelection,
    RunAcc,
    group_records,
    latex_document,
    load_records,
    per_trial_rows,
    plot_accuracy_vs_step,
    results_table,
)

N_ENVS = 3


def rec(step, test_envs, in_accs=None, out_accs=None, hparams_seed=0, trial_seed=0, dataset="D", algorithm="ERM"):
    """A DomainBed record over N_ENVS envs; unspecified accuracies default to 0.0."""
    record = {
        "step": step,
        "epoch": step / 10,
        "loss": 1.0,
        "step_time": 0.1,
        "mem_gb": 1.0,
        "hparams": {"lr": 1e-3},
        "args": {
            "dataset": dataset,
            "algorithm": algorithm,
            "test_envs": list(test_envs),
            "hparams_seed": hparams_seed,
            "trial_seed": trial_seed,
            "seed": 0,
            "output_dir": f"/sweep/{dataset}_{algorithm}_{test_envs}_{hparams_seed}_{trial_seed}",
        },
    }
    for i in range(N_ENVS):
        record[f"env{i}_in_acc"] = (in_accs or {}).get(i, 0.0)
        record[f"env{i}_out_acc"] = (out_accs or {}).get(i, 0.0)
    return record


def group(records, test_env, trial_seed=0):
    (g,) = [g for g in group_records(records) if (g.test_env, g.trial_seed) == (test_env, trial_seed)]
    return g.records


def test_registry_names():
    assert SELECTION_METHODS["iid"].name == "training-domain validation set"
    assert SELECTION_METHODS["loo"].name == "leave-one-domain-out cross-validation"
    assert SELECTION_METHODS["oracle"].name == "test-domain validation set (oracle)"


def test_group_records_puts_two_test_env_record_in_both_groups():
    records = [rec(0, [0]), rec(0, [0, 2]), rec(0, [1], trial_seed=1)]
    keys = [(g.trial_seed, g.dataset, g.algorithm, g.test_env, len(g.records)) for g in group_records(records)]
    assert keys == [(0, "D", "ERM", 0, 2), (0, "D", "ERM", 2, 1), (1, "D", "ERM", 1, 1)]


def test_variants_of_an_algorithm_are_rows_of_their_own():
    plain, named = rec(0, [0], algorithm="DomainFusion"), rec(0, [0], algorithm="DomainFusion")
    named["args"]["variant"] = "DomainFusion_posterior"
    assert [g.algorithm for g in group_records([plain, named])] == ["DomainFusion", "DomainFusion_posterior"]


# Test env 0. hparams 0: step 1 has the best train-env validation (mean of env1/env2 out = 0.85) although
# step 2 has the best *test-env* out acc (0.99), which must be ignored. hparams 1: step 0, val 0.9.
IID_RECORDS = [
    rec(0, [0], in_accs={0: 0.40}, out_accs={0: 0.50, 1: 0.6, 2: 0.7}, hparams_seed=0),  # val 0.65
    rec(1, [0], in_accs={0: 0.55}, out_accs={0: 0.90, 1: 0.8, 2: 0.9}, hparams_seed=0),  # val 0.85
    rec(2, [0], in_accs={0: 0.60}, out_accs={0: 0.99, 1: 0.7, 2: 0.8}, hparams_seed=0),  # val 0.75
    rec(0, [0], in_accs={0: 0.50}, out_accs={0: 0.10, 1: 0.9, 2: 0.9}, hparams_seed=1),  # val 0.90
    rec(1, [0], in_accs={0: 0.70}, out_accs={0: 0.80, 1: 0.7, 2: 0.7}, hparams_seed=1),  # val 0.70
    rec(0, [0, 1], in_accs={0: 1.0, 1: 1.0}, out_accs={1: 1.0, 2: 1.0}, hparams_seed=2),  # LOO-only run
]


def test_iid_picks_best_train_env_validation_step_and_run():
    iid = IIDAccuracySelection()
    run0 = [r for r in IID_RECORDS if r["args"]["hparams_seed"] == 0]
    acc = iid.run_acc(run0)
    assert acc.test_acc == 0.55
    assert acc.val_acc == pytest.approx(0.85)
    ranked = iid.hparams_accs(IID_RECORDS)
    assert [run[0]["args"]["hparams_seed"] for _, run in ranked] == [1, 0]  # the 2-test-env run is unscored
    assert ranked[0][0] == RunAcc(val_acc=pytest.approx(0.9), test_acc=0.5)
    assert iid.sweep_acc(IID_RECORDS) == 0.5


def test_iid_ties_go_to_larger_hparams_seed_like_domainbed():
    records = [
        rec(0, [0], in_accs={0: 0.3}, out_accs={1: 0.5, 2: 0.5}, hparams_seed=0),
        rec(0, [0], in_accs={0: 0.4}, out_accs={1: 0.5, 2: 0.5}, hparams_seed=1),
    ]
    assert IIDAccuracySelection().sweep_acc(records) == 0.4


def test_oracle_uses_last_step_test_env_out_acc():
    oracle = OracleSelection()
    # hparams 0 last step (2): val = env0 out 0.99, test 0.60; hparams 1 last step (1): val 0.80, test 0.70.
    shuffled = IID_RECORDS[::-1]  # step order must come from 'step', not file order
    assert oracle.run_acc([r for r in shuffled if r["args"]["hparams_seed"] == 1]) == RunAcc(0.80, 0.70)
    assert oracle.sweep_acc(shuffled) == 0.60
    assert oracle.sweep_acc([rec(0, [0, 1])]) is None


def loo_records(drop=lambda r: False):
    """Test env 0 with its {0,1} and {0,2} runs for two hparam seeds (plus runs held out elsewhere)."""
    records = [
        # hparams 0: step 0 val = (0.7 + 0.9) / 2 = 0.8, step 1 val = (0.8 + 0.6) / 2 = 0.7 -> step 0, test 0.5
        rec(0, [0], in_accs={0: 0.5}, hparams_seed=0),
        rec(1, [0], in_accs={0: 0.6}, hparams_seed=0),
        rec(0, [0, 1], in_accs={1: 0.7}, hparams_seed=0),
        rec(1, [0, 1], in_accs={1: 0.8}, hparams_seed=0),
        rec(0, [0, 2], in_accs={2: 0.9}, hparams_seed=0),
        rec(1, [0, 2], in_accs={2: 0.6}, hparams_seed=0),
        # hparams 1: val = (0.85 + 0.85) / 2 = 0.85 -> best run, test 0.65
        rec(0, [0], in_accs={0: 0.65}, hparams_seed=1),
        rec(0, [0, 1], in_accs={1: 0.85}, hparams_seed=1),
        rec(0, [0, 2], in_accs={2: 0.85}, hparams_seed=1),
        # a different test env's run: must not enter test env 0's group
        rec(0, [1], in_accs={1: 0.99}, out_accs={0: 1.0, 2: 1.0}, hparams_seed=1),
    ]
    return [r for r in records if not drop(r)]


def test_leave_one_out_hand_computed():
    loo = LeaveOneOutSelection()
    records = group(loo_records(), test_env=0)
    assert loo.run_acc([r for r in records if r["args"]["hparams_seed"] == 0]) == RunAcc(pytest.approx(0.8), 0.5)
    assert loo.sweep_acc(records) == 0.65
    # Test env 1 has a single-test-env run but no {1, 2} run, so no step can be validated.
    assert loo.sweep_acc(group(loo_records(), test_env=1)) is None


def test_leave_one_out_missing_pair_gives_none():
    loo = LeaveOneOutSelection()
    no_02_for_hp1 = group(
        loo_records(lambda r: r["args"]["test_envs"] == [0, 2] and r["args"]["hparams_seed"] == 1), test_env=0
    )
    assert loo.sweep_acc(no_02_for_hp1) == 0.5  # hparams 1 is unscorable, hparams 0 wins
    no_02 = group(loo_records(lambda r: r["args"]["test_envs"] == [0, 2]), test_env=0)
    assert loo.sweep_acc(no_02) is None
    # Only step 0's {0,2} record missing for hparams 0: step 1 (val 0.7, test 0.6) is the only scorable one.
    step1_only = [
        r
        for r in group(loo_records(), test_env=0)
        if r["args"]["hparams_seed"] == 0 and not (r["step"] == 0 and r["args"]["test_envs"] == [0, 2])
    ]
    assert LeaveOneOutSelection().run_acc(step1_only) == RunAcc(pytest.approx(0.7), 0.6)


def table_records():
    """One record per run, so any selection returns that record's test-env in acc."""
    records = []

    def add(algorithm, test_env, trial_seed, acc):
        records.append(
            rec(
                0,
                [test_env],
                in_accs={test_env: acc},
                out_accs={test_env: 0.5},
                trial_seed=trial_seed,
                algorithm=algorithm,
            )
        )

    for trial, acc in enumerate([0.90, 0.92, 0.94]):
        add("ERM", 0, trial, acc)
    add("ERM", 1, 0, 0.80)
    add("ERM", 1, 1, 0.60)  # trial 2 missing for env 1; env 2 missing entirely
    for trial in range(3):
        for test_env, acc in enumerate([0.5, 0.6, 0.7]):
            add("Fish", test_env, trial, acc)
    return records


# ERM env0: mean 92.0, population std sqrt(0.0008/3) = 0.016330, / sqrt(3) -> 0.94 -> "0.9" (sample std: 1.2).
# ERM env1: mean 70.0, std 0.1 / sqrt(2) -> 7.07.  Averages: ERM per-trial means 0.85, 0.76, 0.94 ->
# mean 85.0, std sqrt(0.0054) = 0.07348 / sqrt(3) -> 4.24.
EXPECTED_MARKDOWN = """\
### Dataset: D, model selection method: test-domain validation set (oracle)

| Algorithm | A          | B          | C          | Avg  |
| --------- | ---------- | ---------- | ---------- | ---- |
| Fish      | 50.0 ± 0.0 | 60.0 ± 0.0 | 70.0 ± 0.0 | 60.0 |
| ERM       | 92.0 ± 0.9 | 70.0 ± 7.1 | X          | X    |

### Averages, model selection method: test-domain validation set (oracle)

| Algorithm | D          | Avg  |
| --------- | ---------- | ---- |
| Fish      | 60.0 ± 0.0 | 60.0 |
| ERM       | 85.0 ± 4.2 | 85.0 |
"""


def test_markdown_table_mean_se_and_missing():
    table = results_table(
        table_records(), OracleSelection(), env_names={"D": ["A", "B", "C"]}, algorithm_order=["Fish"]
    )
    assert table == EXPECTED_MARKDOWN


def test_strict_table_marks_incomplete_trials():
    table = results_table(table_records(), OracleSelection(), env_names={"D": ["A", "B", "C"]}, strict=True)
    assert "| ERM       | 92.0 ± 0.9 | X          | X          | X    |" in table
    assert "| ERM       | X          | X    |" in table
    assert "| Fish      | 60.0 ± 0.0 | 60.0 |" in table


def test_table_falls_back_to_env_indices():
    assert "| Algorithm | 0          | 1          | 2          | Avg  |" in results_table(
        table_records(), OracleSelection()
    )


def test_latex_table():
    table = results_table(table_records(), OracleSelection(), latex=True, env_names={"D": ["+90%", "B", "C"]})
    lines = table.splitlines()
    assert lines[0] == "\\subsection{Model selection: test-domain validation set (oracle)}"
    assert "\\subsubsection{D}" in lines
    assert "\\begin{tabular}{lcccc}" in lines
    assert "\\textbf{Algorithm} & \\textbf{+90\\%} & \\textbf{B} & \\textbf{C} & \\textbf{Avg} \\\\" in lines
    assert "ERM & 92.0 $\\pm$ 0.9 & 70.0 $\\pm$ 7.1 & X & X \\\\" in lines
    assert "ERM & 85.0 $\\pm$ 4.2 & 85.0 \\\\" in lines
    assert lines.count("\\toprule") == 2 and lines.count("\\end{tabular}}") == 2
    doc = latex_document(table)
    assert doc.startswith("\\documentclass{article}") and doc.rstrip().endswith("\\end{document}")


def test_per_trial_rows():
    rows = per_trial_rows(IID_RECORDS, IIDAccuracySelection())
    assert rows == [
        {
            "dataset": "D",
            "algorithm": "ERM",
            "test_env": 0,
            "trial_seed": 0,
            "test_acc": 0.5,
            "val_acc": pytest.approx(0.9),
            "hparams_seed": 1,
        }
    ]
    json.dumps(rows)


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("".join(lines))


def test_load_records_skips_truncated_last_line_and_runs_without_results(tmp_path):
    good = [json.dumps(rec(s, [0])) + "\n" for s in range(2)]
    write_jsonl(tmp_path / "run_a" / "results.jsonl", good + [json.dumps(rec(2, [0]))[:25]])
    write_jsonl(tmp_path / "run_b" / "results.jsonl", [json.dumps(rec(0, [1])) + "\n"])
    (tmp_path / "run_b" / "done").touch()
    (tmp_path / "run_c").mkdir()  # launched, never wrote a record
    (tmp_path / "run_c" / "done").touch()
    with pytest.warns(UserWarning, match=r"malformed last line .*run_a.*results\.jsonl:3"):
        records = load_records(tmp_path)
    assert [(r["args"]["test_envs"], r["step"]) for r in records] == [([0], 0), ([0], 1), ([1], 0)]


def test_load_records_clean_sweep_has_no_warning(tmp_path):
    write_jsonl(tmp_path / "run" / "results.jsonl", [json.dumps(rec(0, [0])) + "\n"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_records(tmp_path)) == 1


def test_load_records_missing_dir(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_records(tmp_path / "nope")


def test_plot_writes_png(tmp_path):
    records = IID_RECORDS + [rec(s, [1], in_accs={1: 0.1 * s}, dataset="E", algorithm="Fish") for s in range(3)]
    out = plot_accuracy_vs_step(records, tmp_path / "sub" / "curves.png", env_names={"D": ["A", "B", "C"]})
    assert out == tmp_path / "sub" / "curves.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_plot_without_single_test_env_runs(tmp_path):
    with pytest.raises(UserError):
        plot_accuracy_vs_step([rec(0, [0, 1])], tmp_path / "x.png")


def test_cost_table_weights_step_times_by_steps_covered():
    from domainfusion.report import cost_table, run_costs

    def rec(alg: str, out: str, step: int, step_time: float, **extra) -> dict:
        return {"step": step, "step_time": step_time, "args": {"algorithm": alg, "output_dir": out}, **extra}

    records = [
        rec("ERM", "a", 0, 1.0),
        rec("ERM", "a", 10, 2.0),
        rec("DomainFusion", "b", 0, 3.0, generated_images=8, generation_s=1.0),
        rec("DomainFusion", "b", 10, 4.0, generated_images=40, generation_s=5.0),
    ]
    costs = run_costs(records)
    assert costs["ERM"][0]["step_time"] == pytest.approx(21 / 11)  # (1·1 + 2·10) / 11 steps
    assert costs["DomainFusion"] == [
        {
            "step_time": pytest.approx(43 / 11),
            "generated_images": 40.0,
            "generation_s": 5.0,
            "ldm_finetuned_models": 0.0,
            "ldm_finetune_s": 0.0,
            "total_s": pytest.approx(43.0 + 5.0),
        }
    ]
    table = cost_table(records, ["ERM", "DomainFusion"])
    assert "| ERM | 1 | 1.909 | 1.00 | 0 | 0 |" in table
    assert "| DomainFusion | 1 | 3.909 | 2.05 | 40 | 5 |" in table
