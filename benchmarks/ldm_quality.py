"""Quality gates of an LDM on digits (issue 3): VAE PSNR, class-conditional samples, img2img, throughput.

The judge is a small CNN trained on corpus-style images of MNIST-train digits the LDM never saw (the corpus's
held-out 5,000 digits): 4,000 digits rendered 5 times each in fresh random corpus styles for training, the other
1,000 digits' own held-out corpus renderings to measure the judge itself. Usage:

    .venv/bin/python benchmarks/ldm_quality.py --model embedded --samples-per-digit 50
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import REPO, write_report
from domainfusion.data.digits_dg import build_digits_dg
from domainfusion.data.resources import load_mnist_splits
from domainfusion.ldm import load_ldm
from domainfusion.ldm.corpus import HELD_OUT, build_corpus, digit_prompt, generate_corpus, split_corpus
from domainfusion.ldm.grids import img2img_grid, sample_grid
from domainfusion.ldm.training import vae_psnr

DOCS_IMAGES = REPO / "docs" / "images"


class Judge(nn.Module):
    """A small, fast digit CNN for 32×32 RGB: three conv blocks with pooling, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(128 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).flatten(1))


def as_float(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> float (N, 3, 32, 32) in [0, 1]."""
    return torch.as_tensor(images_u8).permute(0, 3, 1, 2).float() / 255


def judge_data(data_dir: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) for the judge, from the corpus's held-out digits only (see the module docstring)."""
    images, labels = load_mnist_splits(data_dir)["train"]
    order = np.random.RandomState(0).permutation(len(images))  # the corpus's seeded draw order (seed 0, n = 50k)
    held = order[len(order) - HELD_OUT:]
    train_digits = held[:4000]
    styled = generate_corpus(images[train_digits], labels[train_digits], 20_000, seed=1)
    _, held_corpus = split_corpus(build_corpus(data_dir))
    test = (as_float(held_corpus.images[4000:]), torch.as_tensor(held_corpus.labels[4000:]))
    assert np.array_equal(held_corpus.labels, labels[held]), "corpus order changed: update judge_data"
    return (as_float(styled.images), torch.as_tensor(styled.labels)), test


def train_judge(train: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int = 0) -> Judge:
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    x, y = train
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            # Light colour/contrast jitter: the judge should read digits, not memorise the corpus palette.
            xb = x[idx]
            xb = (xb - 0.5) * torch.empty(len(xb), 1, 1, 1).uniform_(0.7, 1.3) + 0.5 + torch.empty(len(xb), 3, 1, 1).uniform_(-0.1, 0.1)
            loss = F.cross_entropy(judge(xb.clamp(0, 1)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([judge(b).argmax(1) for b in x.split(512)])


def colour_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-image (mean, std) of each RGB channel: a 6-d style descriptor in [0, 1] pixel space."""
    flat = x.flatten(2)
    return torch.cat([flat.mean(2), flat.std(2)], dim=1)


def timed(fn, n_images: int) -> float:
    start = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--samples-per-digit", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidances", default="1,2,4")
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--img2img-images", type=int, default=500)
    p.add_argument("--psnr-images", type=int, default=1000)
    p.add_argument("--name", default="ldm-quality")
    a = p.parse_args()
    torch.manual_seed(0)
    ldm = load_ldm(a.model, a.data_dir, "cpu")
    lines: list[str] = []
    results: dict[str, object] = {}

    # 1. VAE PSNR: held-out corpus and each DigitsDG-offline domain.
    _, held_corpus = split_corpus(build_corpus(a.data_dir))
    psnr = {"corpus held-out": vae_psnr(ldm.vae, torch.as_tensor(held_corpus.images[: a.psnr_images]))}
    rng = np.random.RandomState(0)
    for domain, (images, _) in build_digits_dg(a.data_dir).items():
        pick = rng.permutation(len(images))[: a.psnr_images]
        psnr[domain] = vae_psnr(ldm.vae, torch.as_tensor(images[pick]))
    results["vae_psnr_db"] = psnr
    lines += ["## VAE reconstruction (posterior mean → decode), PSNR in dB", "",
              "| images | PSNR |", "|---|---|"] + [f"| {k} ({a.psnr_images}) | {v:.2f} |" for k, v in psnr.items()]

    # 2. The judge.
    t0 = time.perf_counter()
    train, test = judge_data(a.data_dir)
    judge = train_judge(train, a.judge_epochs)
    judge_acc = (predict(judge, test[0]) == test[1]).float().mean().item()
    results["judge"] = {"train_images": len(train[0]), "test_images": len(test[0]), "test_acc": judge_acc,
                        "train_s": time.perf_counter() - t0}
    lines += ["", "## Judge", "", f"Small CNN trained on {len(train[0])} corpus-style images of 4,000 held-out "
              f"MNIST-train digits ({a.judge_epochs} epochs); accuracy on the other 1,000 held-out digits' corpus "
              f"images: **{100 * judge_acc:.1f}%**."]

    # 3. Class-conditional samples.
    lines += ["", f"## Samples: {a.samples_per_digit} per digit, DDIM {a.sample_steps} steps, prompt "
              f"'{digit_prompt(0).replace('0', 'k')}'", "", "| guidance | judged correct | worst digit |", "|---|---|---|"]
    prompts = [digit_prompt(k) for k in range(10) for _ in range(a.samples_per_digit)]
    targets = torch.arange(10).repeat_interleave(a.samples_per_digit)
    sample_acc = {}
    for guidance in [float(g) for g in a.guidances.split(",")]:
        start = time.perf_counter()
        samples = ldm.sample(prompts, num_inference_steps=a.sample_steps, guidance_scale=guidance, seed=0)
        wall = time.perf_counter() - start
        hit = (predict(judge, samples) == targets).float()
        per_digit = hit.view(10, -1).mean(1)
        sample_acc[guidance] = {"acc": hit.mean().item(), "per_digit": per_digit.tolist(), "wall_s": wall}
        worst = int(per_digit.argmin())
        lines.append(f"| {guidance:g} | {100 * hit.mean():.1f}% | {worst} ({100 * per_digit[worst]:.0f}%) |")
    results["samples"] = sample_acc
    best = max(sample_acc, key=lambda g: sample_acc[g]["acc"])
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    sample_grid(ldm, [digit_prompt(k) for k in range(10)], DOCS_IMAGES / "embedded_samples.png", n_seeds=8,
                num_inference_steps=a.sample_steps, guidance_scale=best)

    # 4. img2img on the judge's test digits (held-out corpus images).
    x, y = test[0][: a.img2img_images], test[1][: a.img2img_images]
    text = [digit_prompt(int(k)) for k in y]
    input_pred = (predict(judge, x) == y).float().mean().item()
    lines += ["", f"## img2img on {len(x)} held-out corpus images (judge on the inputs: {100 * input_pred:.1f}%)", "",
              "| strength | guidance | label kept | colour-stat distance to input | PSNR to input (dB) |",
              "|---|---|---|---|---|"]
    img2img_res = []
    for strength, guidance in ((0.0, 1.0), (0.02, 1.0), (0.3, 1.0), (0.5, 1.0), (0.5, 2.0), (0.7, 1.0)):
        out = ldm.img2img(x, text, strength=strength, num_inference_steps=20, guidance_scale=guidance, seed=0)
        kept = (predict(judge, out) == y).float().mean().item()
        dist = (colour_stats(out) - colour_stats(x)).norm(dim=1).mean().item()
        mse = (out - x).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnr_in = (-10 * torch.log10(mse)).mean().item()
        img2img_res.append({"strength": strength, "guidance": guidance, "label_kept": kept,
                            "colour_stat_distance": dist, "psnr_to_input": psnr_in})
        lines.append(f"| {strength:g} | {guidance:g} | {100 * kept:.1f}% | {dist:.4f} | {psnr_in:.2f} |")
    results["img2img"] = img2img_res
    img2img_grid(ldm, x[:8], text[:8], [0.0, 0.3, 0.5, 0.7, 0.9], DOCS_IMAGES / "embedded_img2img.png",
                 num_inference_steps=20)

    # 5. Throughput (batch 64, this process's torch threads).
    xb, tb = x[:64], text[:64]
    z = ldm.encode(xb)
    embeds = ldm.encode_prompts(tb)
    t = torch.full((64,), 500)
    with torch.no_grad():
        throughput = {
            "encode img/s": timed(lambda: [ldm.encode(xb) for _ in range(5)], 320),
            "decode img/s": timed(lambda: [ldm.decode(z) for _ in range(5)], 320),
            "UNet forward img/s": timed(lambda: [ldm.predict_noise(z, t, embeds) for _ in range(5)], 320),
            "img2img img/s (strength 0.5, 20 steps, no guidance)": timed(
                lambda: ldm.img2img(xb, tb, strength=0.5, num_inference_steps=20), 64),
        }
    results["throughput"] = throughput
    lines += ["", f"## Throughput (batch 64, {torch.get_num_threads()} torch threads)", "", "| operation | images/s |",
              "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in throughput.items()]

    gate_samples = sample_acc[best]["acc"] >= 0.9
    gate_img2img = next(r for r in img2img_res if r["strength"] == 0.5 and r["guidance"] == 1.0)["label_kept"] >= 0.9
    summary = (f"Gates: samples judged correct ≥ 90%: **{'PASS' if gate_samples else 'MISS'}** "
               f"({100 * sample_acc[best]['acc']:.1f}% at guidance {best:g}); img2img strength 0.5 keeps the label "
               f"≥ 90%: **{'PASS' if gate_img2img else 'MISS'}**.\n\n"
               "Grids: docs/images/embedded_samples.png (rows = digits, best guidance), "
               "docs/images/embedded_img2img.png (input, then strengths 0, 0.3, 0.5, 0.7, 0.9).\n\n")
    (REPO / "benchmarks" / "reports" / f"{a.name}.json").write_text(json.dumps(results, indent=2))
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), summary + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
