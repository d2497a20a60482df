"""What each LDM knows about each domain: zero-shot diffusion-classifier accuracy per domain (`domainfusion ldm probe`),
several models side by side, beside an ERM run's held-out accuracy.

A model is `embedded`, a diffusers folder, or `git:<commit>` (the embedded weights as committed then, e.g. the v1
LDM, materialised with the context length they were trained with). Usage:

    .venv/bin/python benchmarks/ldm_knowledge.py --models git:b5c10cc,embedded --images-per-domain 500 \
        --erm-reference "mnist=90.7,mnist_m=46.4,syn=29.5,optdigits=58.1"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from domainfusion import hparams as registry
from domainfusion.data import get_dataset
from domainfusion.ldm import load_ldm
from domainfusion.ldm.adapt import default_prompt_template
from domainfusion.ldm.embedded import WEIGHT_COMPONENTS, embedded_ldm_path
from domainfusion.ldm.probe import ProbeConfig, probe_dataset
from domainfusion.report.tables import selected_accuracies

from common import REPO, write_report

# Context length of the embedded weights before the v2 LDM (their tokenizer padded prompts to 16 tokens).
V1_CONTEXT = 16


def weights_from_git(commit: str, dest: Path) -> Path:
    """The package weights folder as committed at `commit` (vae/, unet/, scheduler/, provenance.json)."""
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", commit, "domainfusion/ldm/weights"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listing:
        target = dest / Path(name).relative_to("domainfusion/ldm/weights")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            subprocess.run(["git", "show", f"{commit}:{name}"], cwd=REPO, capture_output=True, check=True).stdout
        )
    assert all((dest / c).is_dir() for c in WEIGHT_COMPONENTS), f"{commit} has no embedded weights"
    return dest


def model_folder(model: str, scratch: Path) -> str:
    """A loadable model reference for `model` (see the module docstring)."""
    if not model.startswith("git:"):
        return model
    commit = model[4:]
    folder = embedded_ldm_path(scratch / commit, weights_from_git(commit, scratch / commit / "weights"))
    config = folder / "tokenizer" / "tokenizer_config.json"
    provenance = json.loads((scratch / commit / "weights" / "provenance.json").read_text())
    tokens = provenance.get("max_prompt_tokens", V1_CONTEXT)
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": tokens}, indent=2))
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="embedded", help="comma-separated: embedded, a folder, git:<commit>")
    p.add_argument("--dataset", default="DigitsDG")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images-per-domain", type=int, default=500)
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--t-min", type=int, default=100)
    p.add_argument("--t-max", type=int, default=900)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--domains", default=None, help="comma-separated domains to probe (default: all)")
    p.add_argument("--compare-run", default=None, help="an ERM run or sweep folder (training-domain validation)")
    p.add_argument(
        "--erm-reference",
        default=None,
        help="'domain=acc,...' from a committed report, when the runs themselves are not on this machine",
    )
    p.add_argument("--name", default="ldm-knowledge")
    a = p.parse_args()
    config = ProbeConfig(draws=a.draws, t_min=a.t_min, t_max=a.t_max, top_k=a.top_k)
    models = a.models.split(",")
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            ldm = load_ldm(model_folder(model, Path(scratch)), "auto")
            hp = {**registry.default_hparams("ERM", a.dataset), "data_augmentation": False}
            ds = get_dataset(a.dataset, a.data_dir, [], hp, image_size=ldm.image_size)
            prompts = [default_prompt_template(a.dataset).format(cls=c) for c in ds.class_names]
            results[model] = probe_dataset(
                ldm, ds, prompts, a.images_per_domain, config, domains=a.domains.split(",") if a.domains else None
            )
            print(model, [f"{r.domain} {100 * r.accuracy:.1f}" for r in results[model]], flush=True)
    domains = [r.domain for r in results[models[0]]]
    erm: dict[str, float] = {}
    erm_source = ""
    if a.compare_run:
        erm = {ds.environments[i]: acc for i, acc in selected_accuracies(a.compare_run, "ERM").items()}
        erm_source = f"ERM runs in `{a.compare_run}`, training-domain validation"
    elif a.erm_reference:
        erm = {k: float(v) / 100 for k, v in (item.split("=") for item in a.erm_reference.split(","))}
        erm_source = "ERM held-out accuracy as given by --erm-reference"
    header = ["domain"] + [f"`{m}`" for m in models] + (["ERM held out"] if erm else [])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, domain in enumerate(domains):
        cells = [f"{100 * results[m][i].accuracy:.1f}%" for m in models]
        cells += [f"{100 * erm[domain]:.1f}" if domain in erm else "-"] if erm else []
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    per_class = [
        "",
        "Per-class accuracy (digits 0-9), last model:",
        "",
        "| domain | " + " | ".join(str(c) for c in range(len(prompts))) + " |",
        "|---|" + "---|" * len(prompts),
    ]
    per_class += [
        f"| {r.domain} | " + " | ".join(f"{100 * v:.0f}" for v in r.per_class) + " |" for r in results[models[-1]]
    ]
    cost = [
        f"| `{m}` | {sum(r.unet_calls for r in results[m]):,} | {sum(r.seconds for r in results[m]):.0f} |"
        for m in models
    ]
    body = (
        f"Zero-shot diffusion-classifier accuracy on {a.dataset}: {a.images_per_domain} seeded random images per "
        f"domain; prompts {prompts[0]!r} … {prompts[-1]!r}; {a.draws} (t, ε) draws per image shared by every class, t "
        f"evenly spaced over [{a.t_min}, {a.t_max}]; prediction = the class with the lowest mean ε-MSE"
        f"{f'; top-{a.top_k} pruning' if a.top_k else ''}. Chance: {100 / len(prompts):.0f}%."
        f"{f' {erm_source}.' if erm else ''}\n\n"
        + "\n".join(rows)
        + "\n"
        + "\n".join(per_class)
        + "\n\n| model | UNet evaluations | seconds |\n|---|---|---|\n"
        + "\n".join(cost)
        + "\n"
    )
    json_path = REPO / "benchmarks" / "reports" / f"{a.name}.json"
    json_path.write_text(json.dumps({m: [r.__dict__ for r in rs] for m, rs in results.items()}, indent=2))
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
