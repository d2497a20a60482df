"""Bad arguments that used to give tracebacks, misleading messages or silent surprises (issue 21, items 5 and 7):
each is refused up front with one message naming the flag and what to do, or, for `results` over incomparable runs,
reported apart instead of averaged together. In process (typer's CliRunner), with a tiny random LDM."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline
from typer.testing import CliRunner

from domainfusion import cli
from domainfusion.cli import app
from domainfusion.data import mnist
from domainfusion.errors import UserError
from domainfusion.ldm import LatentDiffusion
from domainfusion.report import OracleSelection, group_records, results_table, split_incomparable

from tiny_ldm import save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_ldm(tmp_path_factory.mktemp("ldm")))


def refused(args: list[str], match: str) -> str:
    """Run the CLI in process; it must stop with a UserError (printed without traceback, exit code 2, by `main`)
    whose message matches `match`."""
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert re.search(match, message), message
    return message


# ---------------------------------------------------------------- 7: ldm sample / img2img flags


def test_user_errors_exit_2_without_traceback(model: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["domainfusion", "ldm", "sample", "a cat", "--model", model, "--n-seeds", "0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --n-seeds is the number of samples per prompt: give 1 or more, got 0" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], r"^--steps is the number of DDIM steps: give 1 or more, got 0$"),
        (["--n-seeds", "0"], r"^--n-seeds is the number of samples per prompt: give 1 or more, got 0$"),
        (["--n-seeds", "-2"], r"^--n-seeds .* got -2$"),
    ],
)
def test_sample_counts(model: str, tmp_path: Path, flags: list[str], message: str) -> None:
    refused(["ldm", "sample", "a cat", "--model", model, "--out", str(tmp_path / "s.png"), *flags], message)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("command", ["sample", "img2img"])
def test_image_out_must_be_an_image_file(model: str, tiny_folder: Path, tmp_path: Path, command: str) -> None:
    args = (
        ["ldm", "sample", "a cat"]
        if command == "sample"
        else ["ldm", "img2img", "--dataset", "ImageFolder", "--data-dir", str(tiny_folder)]
    )
    args += ["--model", model, "--steps", "1"]
    refused(
        args + ["--out", str(tmp_path)],
        rf"^--out {re.escape(str(tmp_path))} is a folder; give a file path, "
        rf"e\.g\. {re.escape(str(tmp_path / 'grid.png'))}$",
    )
    refused(args + ["--out", str(tmp_path / "grid")], r"^--out .*grid has no image file extension .*\.png$")


def test_img2img_flags(model: str, tiny_folder: Path, tmp_path: Path) -> None:
    args = [
        "ldm",
        "img2img",
        "--dataset",
        "ImageFolder",
        "--data-dir",
        str(tiny_folder),
        "--model",
        model,
        "--steps",
        "1",
        "--strengths",
        "0.5",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "i.png"),
    ]
    refused(args + ["--n-images", "0"], r"^--n-images is the number of images \(grid rows\): give 1 or more, got 0$")
    refused(args + ["--env", "9"], r"^--env 9 is out of range for ImageFolder; valid environments: 0=d0, 1=d1, 2=d2$")
    refused(args + ["--env", "-1"], r"^--env -1 is out of range")
    refused(args + ["--strengths", "0.5,1.5"], r"^--strengths takes SDEdit strengths between 0 and 1")
    # a dataset with fixed environments is checked before the model loads: this model does not even exist
    refused(
        ["ldm", "img2img", "--env", "9", "--model", str(tmp_path / "none")],
        r"^--env 9 is out of range for DigitsDG; valid environments: 0=mnist, 1=mnist_m, 2=syn, 3=optdigits$",
    )
    assert not (tmp_path / "i.png").exists()
    result = CliRunner().invoke(app, args + ["--n-images", "2", "--prompt-template", "a {cls} {{sketch}}"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "i.png").is_file()


# ---------------------------------------------------------------- 7: prompt templates


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "a {klass}",
            r"^--prompt-template 'a \{klass\}' has the unknown placeholder\(s\) \{klass\}; it may use \{cls\}, "
            r"e\.g\. 'a photo of a \{cls\}'$",
        ),
        ("a {} of {cls}", r"unknown placeholder\(s\) \{\}; it may use \{cls\}"),
        ("a {cls.upper}", r"unknown placeholder\(s\) \{cls\.upper\}"),
        ("a {cls", r"^--prompt-template 'a \{cls' is not a valid template .*literal brace as \{\{ or \}\}$"),
        ("a {cls:d}", r"^--prompt-template 'a \{cls:d\}' is not a valid template \(Unknown format code 'd'"),
        (
            "a photo",
            r"^--prompt-template 'a photo' has no \{cls\} placeholder, so every class would get the same prompt",
        ),
    ],
)
def test_class_prompt_templates(model: str, tiny_folder: Path, tmp_path: Path, template: str, message: str) -> None:
    refused(["train", "--prompt-template", template, "--output-dir", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()
    refused(
        [
            "sweep",
            "launch",
            "--launcher",
            "dummy",
            "--prompt-template",
            template,
            "--output-dir",
            str(tmp_path / "sweep"),
        ],
        message,
    )
    refused(
        [
            "ldm",
            "probe",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--model",
            model,
            "--prompt-template",
            template,
        ],
        message,
    )


def test_other_prompt_templates(model: str, tiny_folder: Path, tmp_path: Path) -> None:
    refused(
        [
            "ldm",
            "img2img",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--model",
            model,
            "--prompt-template",
            "a {klass}",
        ],
        r"^--prompt-template 'a \{klass\}' has the unknown placeholder",
    )
    refused(
        [
            "ldm",
            "train",
            "--output-dir",
            str(tmp_path / "ldm"),
            "--config",
            json.dumps({"caption_template": "a {cls} in {style}"}),
        ],
        r"^--config caption_template .* unknown placeholder\(s\) \{style\}; it may use \{cls\} and \{domain\}",
    )


# ---------------------------------------------------------------- 7: other outputs, data and model paths


def test_other_outputs_must_not_be_folders(tmp_path: Path) -> None:
    refused(["results", str(tmp_path), "--out", str(tmp_path)], r"^--out .* is a folder; give a file path")
    refused(["results", str(tmp_path), "--plot", str(tmp_path)], r"^--plot .* is a folder")
    refused(["datasets", "show", "DigitsDG", "--out", str(tmp_path)], r"^--out .* is a folder")


@pytest.mark.parametrize(
    "dataset, holds", [("RotatedMNIST", "MNIST"), ("ColoredMNIST", "MNIST"), ("DigitsDG", "DigitsDG-offline")]
)
def test_data_dir_that_downloads_must_exist(tmp_path: Path, dataset: str, holds: str) -> None:
    missing = tmp_path / "dta"
    refused(
        ["datasets", "show", dataset, "--data-dir", str(missing)],
        rf"^--data-dir {re.escape(str(missing))} does not exist; create it \({holds}, .* is then fetched into it "
        r"once\) or pass the folder that already holds it$",
    )
    assert not missing.exists()


def test_an_existing_data_dir_still_reaches_the_offline_wheel(tmp_path: Path, monkeypatch) -> None:
    split = (torch.zeros(2, 28, 28, dtype=torch.uint8).numpy(), torch.arange(2).numpy())
    monkeypatch.setattr(mnist, "load_mnist_splits", lambda root: {"train": split, "val": split, "test": split})
    images, labels = mnist.load_all_mnist(tmp_path)
    assert images.shape == (6, 28, 28) and labels.tolist() == [0, 1] * 3


@pytest.mark.parametrize(
    "typo", ["./mdl", "~/no/such/model", "runs/ldm", "a/b/ldm", "sd-v1-5.ckpt", "org/model.safetensors", "single_name"]
)
def test_model_path_typos_fail_at_once(tmp_path: Path, monkeypatch, typo: str) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with mock.patch.object(DiffusionPipeline, "load_config", side_effect=AssertionError("asked the hub")):
        message = (
            rf"^model folder '{re.escape(typo)}' does not exist; check the path \(an LDM is 'embedded', a "
            r"diffusers model folder, or a Hugging Face Hub id 'org/name'\)$"
        )
        with pytest.raises(UserError, match=message):
            LatentDiffusion.from_pretrained(typo, device="cpu")


def test_hub_ids_still_reach_the_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    offline = OSError("no connection")
    with mock.patch.object(DiffusionPipeline, "load_config", side_effect=offline) as load_config:
        for hub_id in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "org/model-v1.5"):
            with pytest.raises(UserError, match="is neither a local folder nor a reachable Hugging Face Hub model id"):
                LatentDiffusion.from_pretrained(hub_id, device="cpu")
    assert load_config.call_count == 2


def test_model_typo_on_the_command_line(tmp_path: Path) -> None:
    refused(["ldm", "sample", "a cat", "--model", str(tmp_path / "typo" / "ldm")], r"^model folder .* does not exist")


def test_a_model_folder_under_home_is_found(model: str, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(Path(model).parent))
    assert LatentDiffusion.from_pretrained("~/ldm", device="cpu").image_size == 32


# ---------------------------------------------------------------- 5: results over incomparable runs


def record(
    data_dir: str,
    environments: list[str],
    acc: float,
    dataset: str = "ImageFolder",
    algorithm: str = "ERM",
    hparams: str | None = None,
    hparams_seed: int = 0,
) -> dict:
    """One finished run's record, held out env 0, every accuracy `acc` (so any selection reports `acc`)."""
    r = {
        "step": 0,
        "step_time": 0.1,
        "environments": environments,
        "hparams": {"lr": 1e-3 * (1 + hparams_seed)},
        "args": {
            "dataset": dataset,
            "algorithm": algorithm,
            "test_envs": [0],
            "trial_seed": 0,
            "seed": 0,
            "hparams_seed": hparams_seed,
            "hparams": hparams,
            "data_dir": data_dir,
            "output_dir": f"runs/{data_dir}/{algorithm}/{hparams}/{hparams_seed}",
        },
    }
    for i in range(len(environments)):
        r[f"env{i}_in_acc"] = r[f"env{i}_out_acc"] = acc
    return r


def write_runs(root: Path, records: list[dict]) -> Path:
    for i, r in enumerate(records):
        (root / f"run{i}").mkdir(parents=True)
        (root / f"run{i}" / "results.jsonl").write_text(json.dumps(r) + "\n")
    return root


def test_results_keeps_image_folders_apart(tmp_path: Path) -> None:
    runs = write_runs(
        tmp_path / "sweep",
        [
            record("data/vlcs", ["caltech", "labelme", "sun"], 0.5),
            record("data/office", ["art", "clipart", "product", "real"], 0.7),
            record("data/office/", ["art", "clipart", "product", "real"], 0.9, hparams_seed=1),  # same folder
            record("data/x", ["a", "b"], 0.3),
        ],
    )
    result = CliRunner().invoke(app, ["results", str(runs), "--selection", "oracle"])
    assert result.exit_code == 0, result.output
    out = result.output
    for folder, header, row in [
        (
            "data/vlcs",
            "| Algorithm | caltech    | labelme | sun | Avg |",
            "| ERM       | 50.0 ± 0.0 | X       | X   | X   |",
        ),
        (
            "data/office",
            "| Algorithm | art        | clipart | product | real | Avg |",
            "| ERM       | 90.0 ± 0.0 | X       | X       | X    | X   |",
        ),  # both runs on it: selection keeps the 2nd
        ("data/x", "| Algorithm | a          | b | Avg |", "| ERM       | 30.0 ± 0.0 | X | X   |"),
    ]:
        table = out.split(f"### Dataset: ImageFolder ({folder}), model selection method")[1].split("###")[0]
        assert header in table and row in table
    assert "| Algorithm | ImageFolder (data/vlcs) | ImageFolder (data/office) | ImageFolder (data/x) | Avg  |" in out
    assert "### Dataset: ImageFolder," not in out


def test_folder_datasets_split_and_packaged_ones_merge() -> None:
    pacs = ["art_painting", "cartoon", "photo", "sketch"]
    records = [
        record("/cluster/data", list(mnist.RotatedMNIST.ENVIRONMENTS), 0.9, "RotatedMNIST"),
        record("data", list(mnist.RotatedMNIST.ENVIRONMENTS), 0.7, "RotatedMNIST", hparams_seed=1),
        record("minis", pacs, 0.4, "PACS"),
        record("/data/domainbed", pacs, 0.8, "PACS"),
    ]
    groups = [(g.dataset, len(g.records)) for g in group_records(records)]
    assert groups == [("PACS (/data/domainbed)", 1), ("PACS (minis)", 1), ("RotatedMNIST", 2)]
    assert split_incomparable(split_incomparable(records)) == split_incomparable(records)
    assert split_incomparable(records)[0] is records[0]  # nothing to rename: the record itself


def test_a_data_folder_whose_domains_changed_is_refused() -> None:
    records = [record("data/x", ["a", "b"], 0.5), record("data/x", ["a", "b", "c"], 0.5, hparams_seed=1)]
    message = (
        r"^runs of ImageFolder list different domains \(a, b in runs/data/x/ERM/None/0; a, b, c in "
        r"runs/data/x/ERM/None/1\): the data folder changed between runs, so their accuracies are not comparable"
        r"\. Move the older runs out of the results folder, or rerun them$"
    )
    with pytest.raises(UserError, match=message):
        group_records(records)


def test_hparams_overrides_are_rows_of_their_own() -> None:
    envs = ["a", "b"]
    records = [
        record("d", envs, 0.5),
        record("d", envs, 0.6, hparams_seed=1),  # random search: one row
        record("d", envs, 0.7, hparams='{"lr": 0.01, "batch_size": 8}'),
        record("d", envs, 0.8, hparams='{"batch_size":8,"lr":0.01}', hparams_seed=1),  # same overrides
        record("d", envs, 0.9, algorithm="Fish", hparams='{"lr": 0.01}'),
    ]  # alone in its row: plain name
    rows = {g.algorithm: len(g.records) for g in group_records(records)}
    assert rows == {"ERM": 2, 'ERM {"batch_size": 8, "lr": 0.01}': 2, "Fish": 1}
    table = results_table(records, OracleSelection(), env_names={"ImageFolder": envs})
    assert '| ERM {"batch_size": 8, "lr": 0.01} | 80.0 ± 0.0 | X | X   |' in table
    assert "| ERM                               | 60.0 ± 0.0 | X | X   |" in table


@pytest.mark.parametrize(
    "command",
    [["ldm", "sample", "a photo"], ["ldm", "img2img"], ["ldm", "probe"], ["sweep", "launch", "--launcher", "dummy"]],
)
def test_ldm_max_batch_below_one_is_refused_before_anything_loads(tmp_path: Path, command: list[str]) -> None:
    refused(
        [*command, "--ldm-max-batch", "0", "--model" if command[0] == "ldm" else "--ldm", str(tmp_path / "none")],
        r"^--ldm-max-batch is the number of rows per LDM call: give 1 or more, got 0$",
    )
