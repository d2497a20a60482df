"""Does the latent-distillation loss reward confidence? L_LD as a function of the confidence c on real images.

Latent distillation feeds c · x to the LDM, so its gradient pushes the classifier's true-class confidence c towards
whatever brightness the LDM's class-conditional density finds most natural. method.md's intuition is that this is
c = 1 (a dark image needs "much detail rebuilt"). This script measures L_LD (SDS form, w(t) = 1 − ᾱ_t, t ~ U[0.02 T,
0.98 T], the same t and ε for every c) for c in a grid, with the right class prompt and with a wrong one, on 64 images
of each DigitsDG-offline domain; then the direction LD actually pushes c, the mean ∂L_LD/∂c through the VAE (the
SDS gradient, as training computes it), for both `ld_reference`s: the drawn noise (method.md) and the unconditional
prediction (classifier score distillation). A negative value raises the confidence. Usage:

    .venv/bin/python benchmarks/ld_diagnostic.py --model embedded
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from domainfusion.data import get_dataset
from domainfusion.ldm import load_ldm
from domainfusion.ldm.adapt import default_prompt_template, to_ldm_images

from common import write_report

CONFIDENCES = (0.02, 0.1, 0.3, 0.6, 1.0)
GRADIENT_CONFIDENCES = (0.1, 0.3, 0.6, 0.9)


@torch.no_grad()
def ld_loss(ldm, images: torch.Tensor, embeds: torch.Tensor, draws) -> float:
    """Mean over the draws of ½‖w(t)(ε̂ − ε)‖² / B, the SDS-form L_LD value."""
    z = ldm.encode(images)
    total = 0.0
    for t, noise in draws:
        w = (1 - ldm.alphas_cumprod[t]).view(-1, 1, 1, 1)
        eps_hat = ldm.predict_noise(ldm.add_noise(z, noise, t), t, embeds)
        total += 0.5 * (w * (eps_hat - noise)).pow(2).sum().item() / len(z)
    return total / len(draws)


def ld_slope(ldm, images: torch.Tensor, c: float, embeds: torch.Tensor, uncond: torch.Tensor | None, draws) -> float:
    """Mean over images and draws of ∂L_LD/∂c at confidence c, with r = ε (uncond None) or r = ε̂_∅."""
    conf = torch.full((len(images),), c, requires_grad=True)
    z = ldm.encode(conf.view(-1, 1, 1, 1) * images)
    g = torch.zeros_like(z)
    with torch.no_grad():
        for t, noise in draws:
            z_t = ldm.add_noise(z, noise, t)
            reference = noise if uncond is None else ldm.predict_noise(z_t, t, uncond.expand_as(embeds))
            g += (1 - ldm.alphas_cumprod[t]).view(-1, 1, 1, 1) * (ldm.predict_noise(z_t, t, embeds) - reference)
    (grad,) = torch.autograd.grad((z * g / len(draws)).sum(), conf)
    return grad.mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--draws", type=int, default=8)
    a = p.parse_args()
    torch.manual_seed(0)
    ldm = load_ldm(a.model, "cpu")
    ds = get_dataset("DigitsDG", a.data_dir, [], {"data_augmentation": False})
    template = default_prompt_template("DigitsDG")
    lines = [
        "| domain | prompt | " + " | ".join(f"c = {c:g}" for c in CONFIDENCES) + " | argmin c |",
        "|---|---|" + "---|" * (len(CONFIDENCES) + 1),
    ]
    slopes = [
        "| domain | reference | " + " | ".join(f"c = {c:g}" for c in GRADIENT_CONFIDENCES) + " |",
        "|---|---|" + "---|" * len(GRADIENT_CONFIDENCES),
    ]
    uncond = ldm.encode_prompts([""])
    for env, name in enumerate(ds.environments):
        pick = torch.randperm(len(ds[env]))[: a.images]
        x = to_ldm_images(torch.stack([ds[env][i][0] for i in pick]), ldm.image_size)
        y = [int(ds[env][i][1]) for i in pick]
        g = torch.Generator().manual_seed(env)
        draws = [
            (torch.randint(20, 981, (len(y),), generator=g), torch.randn(len(y), 4, 8, 8, generator=g))
            for _ in range(a.draws)
        ]
        for label, classes in (("true class", y), ("wrong class (y + 3)", [(k + 3) % 10 for k in y])):
            embeds = ldm.encode_prompts([template.format(cls=k) for k in classes])
            values = [ld_loss(ldm, c * x, embeds, draws) for c in CONFIDENCES]
            best = CONFIDENCES[min(range(len(values)), key=values.__getitem__)]
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {best:g} |")
        embeds = ldm.encode_prompts([template.format(cls=k) for k in y])
        for label, reference in (("noise ε", None), ("uncond ε̂_∅", uncond)):
            values = [ld_slope(ldm, x, c, embeds, reference, draws) for c in GRADIENT_CONFIDENCES]
            slopes.append(f"| {name} | {label} | " + " | ".join(f"{v:+.2f}" for v in values) + " |")
    body = (
        f"L_LD (SDS value) on {a.images} images per domain, {a.draws} (t, ε) draws shared across c, model "
        f"`{a.model}`.\n\n" + "\n".join(lines) + "\n\nMean ∂L_LD/∂c (SDS gradient through the VAE, same images "
        "and draws, true-class prompt): negative raises the classifier's confidence, positive lowers it.\n\n"
        + "\n".join(slopes)
        + "\n"
    )
    write_report("ld-diagnostic", shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
