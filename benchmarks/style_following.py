"""Can the LDM's img2img move an image to a new style? Style spread and colour following of SDEdit candidates.

DomainFusion's augmentation can only widen the source styles as far as its img2img candidates move: it keeps the
candidate style farthest from the source's. This script measures, on real images of every DigitsDG-offline domain,
at several SDEdit strengths (1.0 = text-to-image from pure noise):

- how far a candidate's style moves from its source image (style = per-channel RGB mean and std, 6 numbers in
  [0, 1]; the distance is L2), against the distance between the source domain and the other domains;
- the style spread of N candidates that differ only by seed (the class prompt, as the augmentation's default) and of
  candidates that differ only by style words appended to the class prompt (same seed), and their ratio: ≈ 1 means
  the words add no more diversity than the noise;
- colour following: for "… white on {colour}" style words, how often the candidate's background (its median RGB)
  is closer to that colour than the plain class prompt's candidate with the same seed (chance: 50%), and which share
  of the distance to the colour the words close.

Usage:

    .venv/bin/python benchmarks/style_following.py --model embedded
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys

import torch

from domainfusion.data import get_dataset
from domainfusion.ldm import load_ldm
from domainfusion.ldm.adapt import default_prompt_template, to_ldm_images
from domainfusion.method import style_content

from common import write_report

# Background colours named in the embedded corpus's captions (`ldm/corpus.py:colour_name` bins), with an RGB value
# inside each bin, and a contrasting digit colour.
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "blue": (0.12, 0.12, 0.86),
    "yellow": (0.9, 0.86, 0.16),
    "white": (0.94, 0.94, 0.94),
    "purple": (0.59, 0.16, 0.78),
    "dark green": (0.08, 0.4, 0.08),
}
DIGIT_ON = {"white": "black", "yellow": "black"}
TEXTURES = ("white on paper", "inverted on a photo")


def style(images: torch.Tensor) -> torch.Tensor:
    """(B, 6): per-channel mean and std of RGB images in [0, 1], the augmentation's style statistics in pixel space."""
    return torch.cat(style_content.style(images), dim=1)


def mean_pairwise(styles: torch.Tensor) -> float:
    """Mean L2 distance over all pairs of a (K, B, 6) stack, per image (pairs along K), averaged over images."""
    pairs = list(itertools.combinations(range(len(styles)), 2))
    return torch.stack([(styles[a] - styles[b]).norm(dim=1) for a, b in pairs]).mean().item()


def background(images: torch.Tensor) -> torch.Tensor:
    """(B, 3): median RGB; the digit covers a minority of the pixels."""
    return images.flatten(2).median(dim=2).values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default="DigitsDG")
    p.add_argument("--images", type=int, default=16, help="images per domain")
    p.add_argument("--seeds", type=int, default=4, help="candidates per image that differ only by seed")
    p.add_argument("--strengths", default="0.5,0.8,1.0")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    a = p.parse_args()
    torch.manual_seed(0)
    ldm = load_ldm(a.model, "auto")
    ds = get_dataset(a.dataset, a.data_dir, [], {"data_augmentation": False})
    template = default_prompt_template(a.dataset)
    phrases = [f"{DIGIT_ON.get(c, 'white')} on {c}" for c in COLOURS] + list(TEXTURES)
    strengths = [float(s) for s in a.strengths.split(",")]

    sources = {}
    for env, name in enumerate(ds.ENVIRONMENTS):
        picks = torch.randperm(len(ds[env]), generator=torch.Generator().manual_seed(env))[: a.images]
        x = torch.stack([ds[env][int(i)][0] for i in picks])
        sources[name] = (
            to_ldm_images(x.to(ldm.device), ldm.image_size),
            [template.format(cls=ds.class_names[int(ds[env][int(i)][1])]) for i in picks],
        )
    domain_styles = {name: style(x.float().cpu()) for name, (x, _) in sources.items()}

    rows = []
    for name, (x, prompts) in sources.items():
        src = domain_styles[name]
        others = [(src[:, None] - s[None]).norm(dim=2).mean().item() for n, s in domain_styles.items() if n != name]
        within = (src[:, None] - src[None]).norm(dim=2).sum().item() / (len(src) * (len(src) - 1))
        for strength in strengths:

            def candidates(words: str | None, seed: int) -> torch.Tensor:
                texts = prompts if words is None else [f"{t}, {words}" for t in prompts]
                return (
                    ldm.img2img(
                        x, texts, strength=strength, num_inference_steps=a.steps, guidance_scale=a.guidance, seed=seed
                    )
                    .float()
                    .cpu()
                )

            plain = [candidates(None, 1000 * s) for s in range(a.seeds)]
            worded = {w: candidates(w, 0) for w in phrases}
            plain_styles = torch.stack([style(c) for c in plain])
            moved = (plain_styles - src[None]).norm(dim=2).mean().item()
            seed_spread = mean_pairwise(plain_styles)
            word_spread = mean_pairwise(torch.stack([style(c) for c in worded.values()]))
            hits, closer, gaps = [], [], []
            for rgb, phrase in zip(COLOURS.values(), phrases):
                target = torch.tensor(rgb)
                d_plain = (background(plain[0]) - target).norm(dim=1)
                d_word = (background(worded[phrase]) - target).norm(dim=1)
                hits.append((d_word < d_plain).float())
                closer.append(d_plain - d_word)
                gaps.append(d_plain)
            rows.append(
                f"| {name} | {strength:g} | {within:.3f} | {min(others):.3f}–{max(others):.3f} | {moved:.3f} | "
                f"{seed_spread:.3f} | {word_spread:.3f} | {word_spread / seed_spread:.2f} | "
                f"{100 * torch.cat(hits).mean().item():.0f}% | "
                f"{100 * torch.cat(closer).mean().item() / torch.cat(gaps).mean().item():+.0f}% |"
            )
            print(rows[-1], flush=True)

    body = (
        f"{a.images} images per domain, img2img with {a.steps} DDIM steps at strength 1 (int(steps · strength) run), "
        f"guidance {a.guidance:g}, model `{a.model}`. Style = per-channel RGB mean and std (6 numbers in [0, 1]), "
        f"distances are L2. Seed spread: {a.seeds} candidates of the class prompt that differ only by seed. Word "
        f"spread: {len(phrases)} candidates with the same seed and style words appended to the class prompt "
        f"({', '.join(repr(w) for w in phrases)}). Colour following: the candidate's median RGB is closer to the named "
        f"background colour than the plain class prompt's candidate with the same seed (chance 50%); gap closed is "
        f"the mean distance gained as a share of the plain candidate's mean distance to the colour (100% = the "
        f"background takes the named colour).\n\n"
        "| domain | strength | within-domain style distance | to the other domains | candidate moved from source | "
        "seed spread | word spread | word / seed | colour followed | gap to the colour closed |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_report(f"style-following-{a.model}", shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
