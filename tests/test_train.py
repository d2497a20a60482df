"""Training runs end to end on tiny data: results.jsonl schema, learning, artefacts, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from domainfusion.algorithms import ALGORITHMS, algorithm_class
from domainfusion.algorithms.erm import ERM
from domainfusion.cli import app
from domainfusion.errors import UserError
from domainfusion.train import TrainArgs, train


def _args(folder: Path, out: Path, **kw) -> TrainArgs:
    base = dict(
        dataset="ImageFolder",
        data_dir=str(folder),
        output_dir=str(out),
        test_envs=[0],
        steps=45,
        checkpoint_freq=10,
        image_size=16,
        progress=False,
        num_workers=0,
        hparams='{"lr": 0.001, "data_augmentation": false}',
    )
    base.update(kw)
    return TrainArgs(**base)


def test_results_schema_learning_and_artefacts(tiny_folder: Path, tmp_path: Path):
    records = train(_args(tiny_folder, tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    assert [r["step"] for r in lines] == [0, 10, 20, 30, 40, 44]
    expected = {"step", "epoch", "loss", "step_time", "mem_gb", "hparams", "args", "environments"}
    expected |= {f"env{i}_{s}_acc" for i in range(3) for s in ("in", "out")}
    assert set(lines[0]) == expected
    # 12 images per domain → out-split int(12 · 0.2) = 2, in-split 10; image folders use batch size 32
    assert lines[1]["epoch"] == pytest.approx(10 / (10 / 32))
    assert lines[0]["args"]["test_envs"] == [0] and lines[0]["hparams"]["lr"] == 0.001
    # classes differ by stripe orientation, domains by colour: ERM must learn them, on the held-out domain too
    assert lines[0]["loss"] > 0.5 and lines[-1]["loss"] < 0.2
    assert lines[-1]["env0_in_acc"] == 1.0 and lines[-1]["env1_out_acc"] == 1.0
    assert (tmp_path / "run" / "done").read_text() == "done"
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert state["classifier.weight"].shape == (2, 128)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["environments"] == ["d0", "d1", "d2"]


def test_seeded_runs_are_identical_and_train_in_eval_can_be_skipped(tiny_folder: Path, tmp_path: Path):
    a = train(_args(tiny_folder, tmp_path / "a", steps=6, checkpoint_freq=5, skip_model_save=True))
    b = train(_args(tiny_folder, tmp_path / "b", steps=6, checkpoint_freq=5, skip_model_save=True, eval_train_in=False))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert "env1_in_acc" in a[0] and "env1_in_acc" not in b[0] and b[0]["env0_in_acc"] == a[0]["env0_in_acc"]


def test_finished_run_is_never_overwritten_silently(tiny_folder: Path, tmp_path: Path):
    train(_args(tiny_folder, tmp_path / "run", steps=2, skip_model_save=True))
    before = (tmp_path / "run" / "results.jsonl").read_text()
    with pytest.raises(UserError, match="holds a finished run"):
        train(_args(tiny_folder, tmp_path / "run", steps=2))
    assert (tmp_path / "run" / "results.jsonl").read_text() == before


def test_unwritable_output_dir_and_unknown_algorithm(tiny_folder: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        train(_args(tiny_folder, blocker / "run"))
    with pytest.raises(UserError, match="known algorithms: CDGA, DSI, DSI_TestTime, DomainFusion, .*ERM"):
        algorithm_class("IRMM")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"holdout_fraction": 1.0}, "strictly between 0 and 1"),
        ({"holdout_fraction": 0.01}, "too few to hold out"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"checkpoint_freq": -1}, "--checkpoint-freq must be at least 1"),
    ],
)
def test_bad_numeric_flags(tiny_folder: Path, tmp_path: Path, changes, match):
    with pytest.raises(UserError, match=match):
        train(_args(tiny_folder, tmp_path / "run", **changes))


def test_nan_loss_stops_with_a_clear_message(tiny_folder: Path, tmp_path: Path, monkeypatch):
    def nan_update(self, minibatches):
        return {"loss": float("nan")}

    monkeypatch.setattr(ERM, "update", nan_update)
    with pytest.raises(UserError, match="loss became nan at step 0"):
        train(_args(tiny_folder, tmp_path / "run"))
    assert not (tmp_path / "run" / "done").exists()


def test_cli_reports_user_errors_in_one_line(tiny_folder: Path, tmp_path: Path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "domainfusion",
            "train",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--test-envs",
            "7",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "out of range" in proc.stderr and "0=d0, 1=d1, 2=d2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_datasets_show_writes_a_grid(tiny_folder: Path, tmp_path: Path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app, ["datasets", "show", "ImageFolder", "--data-dir", str(tiny_folder), "--out", str(out), "--per-class", "2"]
    )
    assert result.exit_code == 0, result.output
    w, h = Image.open(out).size
    assert w > h > 0  # 4 columns (2 classes × 2) by 3 rows
    assert "ERM" in ALGORITHMS


def test_tensorboard_scalars_are_written(tiny_folder: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_args(tiny_folder, tmp_path / "run", steps=3, checkpoint_freq=2, skip_model_save=True, tensorboard=True))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"loss", "env0_in_acc", "env2_out_acc", "step_time"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("env0_in_acc")] == [0, 2]


def test_loader_workers_and_the_ldm_budget_reach_the_generators_context(tiny_folder: Path, tmp_path: Path, monkeypatch):
    from domainfusion.algorithms import RunContext

    seen = {}
    build = RunContext.for_data.__func__

    def spy(cls, *args, **kwargs):
        context = build(cls, *args, **kwargs)
        seen.update(ldm_max_batch=context.ldm_max_batch, num_workers=context.num_workers)
        return context

    monkeypatch.setattr(RunContext, "for_data", classmethod(spy))
    train(_args(tiny_folder, tmp_path / "run", steps=1, checkpoint_freq=1, ldm_max_batch=5, num_workers=1))
    assert seen == {"ldm_max_batch": 5, "num_workers": 1}
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--steps",
            "1",
            "--image-size",
            "16",
            "--num-workers",
            "1",
            "--ldm-max-batch",
            "7",
            "--no-progress",
            "--output-dir",
            str(tmp_path / "cli"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen == {"ldm_max_batch": 7, "num_workers": 1}
