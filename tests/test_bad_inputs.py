"""The output folder under bad input and faults: finished results are never lost, one writer at a time, damaged
checkpoints and full disks give one clear error, nothing is written outside OUTPUT_DIR; plus the training flags that
used to give tracebacks or silent defaults.

The whole bad-input matrix (issue 21) is indexed in MATRIX below: each case, and the test that reproduces it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from domainfusion import checkpoint
from domainfusion import train as train_module
from domainfusion.algorithms.erm import ERM
from domainfusion.checkpoint import CHECKPOINT
from domainfusion.errors import UserError
from domainfusion.output_dir import LOCK, REPLACED, OutputDir
from domainfusion.report.records import load_records
from domainfusion.train import TrainArgs, train

MATRIX = """
case (issue 21)                                            test
1  --overwrite on a finished run, bad image folder         test_overwrite_with_bad_inputs_keeps_the_finished_run
1  interrupted run rerun without --resume, --test-envs 7   test_restart_with_a_typo_keeps_the_interrupted_run
1  new run fails before its first checkpoint               test_failure_before_the_first_checkpoint_restores_the_old_files
1  new run killed before its first checkpoint              test_a_kill_before_the_first_checkpoint_is_undone_by_the_next_run
1  `results` while a replacement runs                      test_a_set_aside_run_is_not_counted_by_results
1  run refused on its inputs                               test_a_run_refused_on_its_inputs_leaves_no_new_folder
3  the same command twice at once                          test_a_second_writer_is_refused_naming_the_first
3  stale lock of a SIGKILLed run                           test_the_lock_of_a_killed_process_is_free
4  truncated model/optimizers/rng/state.json, --resume     test_damaged_checkpoint_files_are_one_clear_error
4  partial last line of results.jsonl, --resume            test_a_cut_last_results_line_is_written_again
4  full disk / file-size limit while checkpointing         test_a_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint
4  --resume with no checkpoint                             test_resume_without_a_checkpoint_says_so
4  checkpoint.*.tmp left by a kill                         test_leftovers_of_killed_writes_are_removed
4  20000² PNG (DecompressionBombError), --skip-bad-images  test_bad_data.py
6  state.json "pool" outside OUTPUT_DIR                    test_a_pool_path_outside_the_run_is_refused
6  model_index.json naming arbitrary modules               test_latent_diffusion.py::test_model_index_may_only_name_allowed_component_classes
6  embedded LDM materialised inside --data-dir             test_latent_diffusion.py (cache folder, $DOMAINFUSION_CACHE)
7  --test-envs "", --image-size 0/-8, --num-workers -1,
   --device gpu / cuda without a GPU                       test_bad_training_flags
2  symlinks, hidden folders, 16-bit PNG, alpha, one class  test_bad_data.py
5  `results` over incomparable runs                        test_bad_args.py
7  ldm sample/img2img flags, --prompt-template, a missing
   --data-dir for data sets that download, --model typos   test_bad_args.py
"""  # noqa: E501  (a table: one row per case)


def _args(folder: Path, out: Path, **kw) -> TrainArgs:
    base = dict(
        dataset="ImageFolder",
        data_dir=str(folder),
        output_dir=str(out),
        test_envs=[0],
        steps=3,
        checkpoint_freq=1,
        image_size=16,
        progress=False,
        num_workers=0,
        hparams='{"lr": 0.001, "data_augmentation": false}',
    )
    base.update(kw)
    return TrainArgs(**base)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run folder (lock and logs aside), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != LOCK}


def _interrupted(run: Path) -> None:
    """Make a finished run look like one killed after its last checkpoint."""
    for name in ("done", "model.safetensors", "model.json"):
        (run / name).unlink(missing_ok=True)


@pytest.fixture
def finished(tiny_folder: Path, tmp_path: Path) -> Path:
    train(_args(tiny_folder, tmp_path / "run"))
    return tmp_path / "run"


# ---------------------------------------------------------------- 1: finished results are never lost


def test_overwrite_with_bad_inputs_keeps_the_finished_run(tiny_folder: Path, finished: Path):
    before = _snapshot(finished)
    assert {"done", "model.safetensors", "results.jsonl", f"{CHECKPOINT}/state.json"} <= set(before)
    (tiny_folder / "d1" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        train(_args(tiny_folder, finished, overwrite=True))
    assert _snapshot(finished) == before


def test_restart_with_a_typo_keeps_the_interrupted_run(tiny_folder: Path, finished: Path):
    _interrupted(finished)
    before = _snapshot(finished)
    with pytest.raises(UserError, match="--test-envs 7"):
        train(_args(tiny_folder, finished, test_envs=[7]))
    assert _snapshot(finished) == before


def test_failure_before_the_first_checkpoint_restores_the_old_files(tiny_folder: Path, finished: Path, monkeypatch):
    before = _snapshot(finished)

    def fails(self, minibatches):
        raise RuntimeError("boom")

    monkeypatch.setattr(ERM, "update", fails)
    with pytest.raises(RuntimeError, match="boom"):
        train(_args(tiny_folder, finished, overwrite=True, seed=1))
    assert _snapshot(finished) == before and not (finished / REPLACED).exists()


def test_a_new_run_replaces_the_old_one_once_it_has_a_checkpoint(tiny_folder: Path, finished: Path):
    old = [json.loads(line)["args"]["seed"] for line in (finished / "results.jsonl").read_text().splitlines()]
    train(_args(tiny_folder, finished, overwrite=True, seed=1))
    new = [json.loads(line)["args"]["seed"] for line in (finished / "results.jsonl").read_text().splitlines()]
    assert old == [0] * 3 and new == [1] * 3 and not (finished / REPLACED).exists()


def test_a_kill_before_the_first_checkpoint_is_undone_by_the_next_run(finished: Path, capsys):
    before = _snapshot(finished)
    output = OutputDir(finished)
    output.acquire()
    assert "done" in output.set_aside()
    (finished / "args.json").write_text("{}")  # the new run's first file; then SIGKILL (the lock goes with it)
    output.release()
    with OutputDir(finished):
        assert _snapshot(finished) == before
    assert "restored the previous run's files" in capsys.readouterr().err


def test_a_set_aside_run_is_not_counted_by_results(finished: Path):
    output = OutputDir(finished)
    output.acquire()
    output.set_aside()  # a replacement in progress: the old run waits in .replaced/
    try:
        assert load_records(finished.parent) == []
    finally:
        output.release()  # as if killed: the next run in the folder restores it
    with OutputDir(finished):
        assert len(load_records(finished.parent)) == 3


def test_a_run_refused_on_its_inputs_leaves_no_new_folder(tiny_folder: Path, tmp_path: Path):
    (tiny_folder / "d1" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        train(_args(tiny_folder, tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="broken.png"):
        train(_args(tiny_folder, tmp_path / "kept"))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [LOCK]  # a folder the user made stays


# ---------------------------------------------------------------- 3: one writer per folder


def test_a_second_writer_is_refused_naming_the_first(tiny_folder: Path, tmp_path: Path):
    with OutputDir(tmp_path / "run"):
        with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on .* since"):
            train(_args(tiny_folder, tmp_path / "run"))
    assert not (tmp_path / "run" / "results.jsonl").exists()
    train(_args(tiny_folder, tmp_path / "run"))  # free again once the holder has let go


def test_the_lock_of_a_killed_process_is_free(tmp_path: Path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from domainfusion.output_dir import OutputDir; "
            "held = OutputDir(sys.argv[1]); held.acquire(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
        OutputDir(tmp_path / "run").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with OutputDir(tmp_path / "run"):
        pass


# ---------------------------------------------------------------- 4: crash recovery


@pytest.mark.parametrize("name", ["model.safetensors", "optimizers.pt", "rng-rank0.safetensors", "state.json"])
def test_damaged_checkpoint_files_are_one_clear_error(tiny_folder: Path, finished: Path, name: str):
    _interrupted(finished)
    path = finished / CHECKPOINT / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"checkpoint file {path} is damaged .* rerun without --resume"):
        train(_args(tiny_folder, finished, resume=True))


def test_a_cut_last_results_line_is_written_again(tiny_folder: Path, tmp_path: Path, monkeypatch):
    reference = train(_args(tiny_folder, tmp_path / "ref", steps=2, skip_model_save=True))
    real_append = train_module.append_jsonl

    def killed_mid_line(path: Path, record: dict) -> None:
        if record["step"] == 1:
            with open(path, "a") as f:
                f.write(json.dumps(record)[:40])
            raise KeyboardInterrupt
        real_append(path, record)

    monkeypatch.setattr(train_module, "append_jsonl", killed_mid_line)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_args(tiny_folder, run, steps=2, skip_model_save=True))
    monkeypatch.undo()
    train(_args(tiny_folder, run, steps=2, skip_model_save=True, resume=True))
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(r["step"], r["loss"]) for r in reference]


def test_a_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tiny_folder: Path, tmp_path: Path, monkeypatch):
    real_save, calls = checkpoint.torch.save, []

    def short_write(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                "data/0: file write failed"
            )
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", short_write)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write step 1's checkpoint .* free disk space .* --resume"):
        train(_args(tiny_folder, run))
    assert json.loads((run / CHECKPOINT / "state.json").read_text())["step"] == 0
    assert not list(run.glob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    records = train(_args(tiny_folder, run, resume=True))
    assert [r["step"] for r in records] == [0, 1, 2]


def test_resume_without_a_checkpoint_says_so(tiny_folder: Path, tmp_path: Path, capsys):
    train(_args(tiny_folder, tmp_path / "run", steps=1, resume=True))
    assert "--resume" not in capsys.readouterr().err  # a new folder: nothing was expected to resume
    (tmp_path / "run" / "done").unlink()
    shutil.rmtree(tmp_path / "run" / CHECKPOINT)  # a run killed before its first checkpoint
    train(_args(tiny_folder, tmp_path / "run", steps=1, resume=True))
    assert f"--resume: {tmp_path / 'run'} has no checkpoint; starting from step 0" in capsys.readouterr().err


def test_leftovers_of_killed_writes_are_removed(tiny_folder: Path, finished: Path):
    _interrupted(finished)
    (finished / "checkpoint.x1y2.tmp").mkdir()
    (finished / "checkpoint.x1y2.tmp" / "model.safetensors").write_bytes(b"0" * 1000)
    (finished / "results.jsonl.tmp").write_text("{")
    train(_args(tiny_folder, finished, resume=True))
    assert not list(finished.glob("*.tmp")) and (finished / "done").exists()


# ---------------------------------------------------------------- 6: nothing outside OUTPUT_DIR


@pytest.mark.parametrize("pool", ["/outside", "../outside", "."])
def test_a_pool_path_outside_the_run_is_refused(tiny_folder: Path, finished: Path, pool: str):
    _interrupted(finished)
    victim = finished.parent / "outside"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    state = finished / CHECKPOINT / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "pool": str(victim) if pool == "/outside" else pool}))
    with pytest.raises(UserError, match="is not a folder inside"):
        train(_args(tiny_folder, finished, resume=True))
    assert (victim / "keep.txt").read_text() == "mine" and (finished / "results.jsonl").exists()


# ---------------------------------------------------------------- 7: training flags


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"test_envs": []}, "--test-envs is empty"),
        ({"test_envs": [1, 1]}, "--test-envs names an environment twice"),
        ({"image_size": 0}, "--image-size must be at least 8"),
        ({"image_size": -8}, "--image-size must be at least 8"),
        ({"num_workers": -1}, "--num-workers must be 0"),
        ({"ldm_max_batch": 0}, "--ldm-max-batch must be at least 1, got 0"),
        ({"device": "gpu"}, "--device gpu is not a device"),
        ({"device": "cuda"}, "--device cuda: no CUDA GPU"),
    ],
)
def test_bad_training_flags(tiny_folder: Path, tmp_path: Path, changes: dict, match: str):
    if changes.get("device") == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match=match):
        train(_args(tiny_folder, tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()
