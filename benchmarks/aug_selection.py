"""What online augmentation's choices do to the pool, refresh by refresh: selection gain, candidate movement, drift.

On a fixed, seeded set of DigitsDG-offline images (the same number from each domain), each configuration of the
augmentation (style/content space, candidate prompts and strengths, what a refresh edits) runs `--refreshes`
refreshes of a pool holding those images, with the embedded LDM, and measures per refresh:
- selection: the picked style's distance from the source against the average candidate's (a random pick gets the
  average in expectation), and the picked content's similarity against the average's, in the configuration's space;
- movement: every candidate's style distance from its source in one common space (the VAE encoder's deep
  features), so configurations compare; and the share of candidates whose label the judge still reads;
- drift: the pool image's content similarity (VAE latent, as the v1 measurement) with the real image it descends
  from, and the share the judge reads as their label.
The judge is `ldm_quality.py`'s (trained on corpus-style renderings of MNIST digits the LDM never saw); label keeping
counts only the images whose real original the judge reads correctly. Usage:

    .venv/bin/python benchmarks/aug_selection.py --images-per-domain 32 --refreshes 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from ldm_quality import judge_data, predict, train_judge

from domainfusion import hparams as registry
from domainfusion.data.digits_dg import build_digits_dg
from domainfusion.data.pool import SyntheticPool
from domainfusion.ldm import load_ldm
from domainfusion.ldm.adapt import style_prompt, style_vocabulary, to_ldm_images
from domainfusion.ldm.corpus import build_corpus, digit_prompt, split_corpus
from domainfusion.method.online_augmentation import AugSettings, OnlineAugmentation
from domainfusion.method.style_content import candidate_scores, content, content_similarity

from common import write_report

ENVS = ["mnist", "mnist_m", "syn", "optdigits"]
PAPER = {"style_space": "latent", "style_words": "none", "strength_spread": 0.0, "refresh_from": "pool"}
CONFIGS = {
    "paper (latent, class prompt, pool)": PAPER,
    "deep features": {**PAPER, "style_space": "vae_features"},
    "vocabulary + spread 0.2": {**PAPER, "style_words": "vocabulary", "strength_spread": 0.2},
    "deep + vocabulary + spread": {
        **PAPER,
        "style_space": "vae_features",
        "style_words": "vocabulary",
        "strength_spread": 0.2,
    },
    "paper, refresh from source": {**PAPER, "refresh_from": "source"},
    "v2 (deep + vocabulary + spread + source)": {
        "style_space": "vae_features",
        "style_words": "vocabulary",
        "strength_spread": 0.2,
        "refresh_from": "source",
    },
}


def sample_images(data_dir: str, per_domain: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images (N, 3, 32, 32), labels, domain of each), `per_domain` from each domain, seeded."""
    rng = np.random.RandomState(seed)
    images, labels, domains = [], [], []
    for domain, (x, y) in build_digits_dg(data_dir).items():
        pick = rng.permutation(len(x))[:per_domain]
        images.append(torch.as_tensor(x[pick]).permute(0, 3, 1, 2))
        labels.append(torch.as_tensor(y[pick]).long())
        domains += [domain] * per_domain
    return torch.cat(images), torch.cat(labels), domains


def run_config(
    ldm,
    changes: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    refreshes: int,
    judge,
    readable: torch.Tensor,
    folder: Path,
) -> list[dict]:
    """Per refresh: the measures of the module docstring, as means over images."""
    settings = dataclasses.replace(
        AugSettings.from_hparams(registry.default_hparams("DomainFusion", "DigitsDG"), "style_content"), **changes
    )
    chunk = [(images, labels, torch.arange(len(images)))]
    pool = SyntheticPool.create(folder / "pool", chunk)
    origin = SyntheticPool.create(folder / "origin", chunk)
    classes = [digit_prompt(k) for k in range(10)]
    if settings.style_words == "vocabulary":
        styles = style_vocabulary("DigitsDG", ENVS, ldm.style_vocabulary)
        prompts = [[style_prompt(c, s) for s in styles] for c in classes]
    else:
        prompts = [[c] for c in classes]
    aug = OnlineAugmentation(ldm, pool, prompts, (3, 32, 32), settings, seed=0, origin=origin)
    outs = []
    transform = aug.transform
    aug.transform = lambda *a: outs.append(transform(*a)) or outs[-1]
    real = to_ldm_images(images.float() / 255, ldm.image_size)
    real_features, real_latents = ldm.encode_features(real).float(), ldm.encode(real).float()
    rows = []
    for k in range(refreshes):
        outs.clear()
        aug.refresh()
        out = outs[0]  # the pool fits one shard: one transform per refresh
        b, n = out.candidates.shape[:2]
        decoded = ldm.decode(out.candidates.flatten(0, 1))
        distance, _ = candidate_scores(real_features, ldm.encode_features(decoded).float().unflatten(0, (b, n)))
        candidate_kept = (predict(judge, decoded).view(b, n) == labels[:, None])[readable].float().mean().item()
        now = pool.read(torch.arange(len(images)))[0].float() / 255
        drift = content_similarity(content(ldm.encode(now).float()), content(real_latents))
        kept = (predict(judge, now) == labels)[readable].float().mean().item()
        stats = {key: value.float().mean().item() for key, value in out.stats.items()}
        rows.append(
            {
                "refresh": k,
                **stats,
                "candidate_style_distance_common": distance.mean().item(),
                "candidate_label_kept": candidate_kept,
                "pool_content_similarity_to_real": drift.mean().item(),
                "pool_label_kept": kept,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images-per-domain", type=int, default=32)
    p.add_argument("--refreshes", type=int, default=6)
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="aug-selection")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    ldm = load_ldm("embedded", "cpu")
    _, held_corpus = split_corpus(build_corpus(a.data_dir))
    judge_train, _ = judge_data(a.data_dir, held_corpus)
    judge = train_judge(judge_train, a.judge_epochs)
    images, labels, domains = sample_images(a.data_dir, a.images_per_domain, a.seed)
    readable = predict(judge, images.float() / 255) == labels
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, changes) in enumerate(CONFIGS.items()):
            print(f"[{i + 1}/{len(CONFIGS)}] {name}", flush=True)
            results[name] = run_config(ldm, changes, images, labels, a.refreshes, judge, readable, Path(tmp) / str(i))
    defaults = registry.default_hparams("DomainFusion", "DigitsDG")
    per_domain = ", ".join(f"{d} {100 * readable[[x == d for x in domains]].float().mean():.0f}%" for d in ENVS)
    lines = [
        f"{len(images)} DigitsDG-offline images ({a.images_per_domain} per domain, seed {a.seed}), one pool shard, "
        f"{a.refreshes} refreshes per configuration; N = {defaults['aug_candidates']} candidates at strength "
        f"{defaults['img2img_strength']} (± the spread), {defaults['img2img_steps']} DDIM steps at strength 1, "
        f"guidance {defaults['img2img_guidance']}; embedded LDM on this CPU. The judge ({a.judge_epochs} epochs) "
        f"reads {100 * readable.float().mean():.1f}% of the real images ({per_domain}); label keeping counts those.",
        "",
        "## After the first refresh: selection and candidate movement",
        "",
        "| configuration | picked style dist. / average candidate's | picked content sim. | average content sim. | "
        "candidates' style distance (deep features) | candidates' label kept |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        r = rows[0]
        lines.append(
            f"| {name} | {r['style_distance_picked']:.3f} / {r['style_distance_mean']:.3f} "
            f"(×{r['style_distance_picked'] / r['style_distance_mean']:.2f}) | "
            f"{r['content_similarity_picked']:.3f} | {r['content_similarity_mean']:.3f} | "
            f"{r['candidate_style_distance_common']:.2f} | {100 * r['candidate_label_kept']:.1f}% |"
        )
    lines += [
        "",
        "## Drift over refreshes: pool image vs the real image it descends from",
        "",
        "content similarity (latent) / judge reads the label, after refresh "
        + ", ".join(str(k + 1) for k in range(a.refreshes)),
        "",
        "| configuration | " + " | ".join(f"refresh {k + 1}" for k in range(a.refreshes)) + " |",
        "|---|" + "---|" * a.refreshes,
    ]
    for name, rows in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{r['pool_content_similarity_to_real']:.3f} / {100 * r['pool_label_kept']:.0f}%" for r in rows
            )
            + " |"
        )
    out = Path(__file__).parent / "reports" / f"{a.name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
