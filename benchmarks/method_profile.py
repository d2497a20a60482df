"""Where DomainFusion's extra time goes, relative to ERM, at default hparams on DigitsDG-offline.

Runs ERM and DomainFusion in this process on identical batches and measures, per training step:
- ERM's step, DomainFusion's step without refreshes, and one pool refresh (amortised over its period);
- inside DomainFusion: latent distillation alone (VAE encode + UNet forward + the backward pass through the VAE
  encoder down to the logits), and reading the synthetic images from disk (they replace source images, so the
  classifier's own work per step is ERM's).
The LDM's share of the extra time = (LD + amortised refresh) / (DomainFusion step − ERM step). Usage:

    .venv/bin/python benchmarks/method_profile.py --steps 20 --test-env 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from domainfusion import hparams as registry
from domainfusion.algorithms import RunContext, algorithm_class
from domainfusion.data import get_dataset
from domainfusion.data.loaders import InfiniteDataLoader, split_dataset
from domainfusion.utils import seed_everything, seed_hash

from common import REPO, write_report


def build(name: str, dataset, in_splits, train_envs, out: Path, hp_overrides: dict):
    hp = {**registry.default_hparams(name, "DigitsDG"), **hp_overrides}
    hp = {k: v for k, v in hp.items() if k in registry.specs(name, "DigitsDG")}
    context = RunContext(
        dataset="DigitsDG",
        output_dir=out,
        train_splits=[in_splits[i] for i in train_envs],
        train_env_names=[dataset.environments[i] for i in train_envs],
        env_names=list(dataset.environments),
        class_names=list(dataset.class_names),
        steps_per_epoch=sum(len(in_splits[i]) for i in train_envs) / (hp["batch_size"] * len(train_envs)),
        seed=0,
    )
    seed_everything(0)
    return algorithm_class(name)(dataset.input_shape, dataset.num_classes, len(train_envs), hp, context=context), hp


def mean_time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--test-env", type=int, default=1)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--hparams", default="{}", help="JSON overrides for both algorithms")
    p.add_argument("--name", default="method-profile")
    a = p.parse_args()
    overrides = json.loads(a.hparams)
    dataset = get_dataset("DigitsDG", a.data_dir, [a.test_env], {"data_augmentation": False})
    in_splits = [split_dataset(env, int(len(env) * 0.2), seed_hash(0, i))[1] for i, env in enumerate(dataset)]
    train_envs = [i for i in range(len(dataset)) if i != a.test_env]
    tmp = Path(tempfile.mkdtemp())
    erm, hp = build("ERM", dataset, in_splits, train_envs, tmp / "erm", overrides)
    t0 = time.perf_counter()
    df, df_hp = build("DomainFusion", dataset, in_splits, train_envs, tmp / "df", overrides)
    setup_s = time.perf_counter() - t0
    loaders = [
        InfiniteDataLoader(in_splits[i], None, hp["batch_size"], 0, torch.Generator().manual_seed(i))
        for i in train_envs
    ]
    batches = [[next(iter(loader)) for loader in loaders] for _ in range(4)]
    counter = iter(range(10**9))

    def step(alg):
        return lambda: alg.update(batches[next(counter) % len(batches)])

    t0 = time.perf_counter()
    df.before_step()  # refresh 0, timed on its own
    refresh_s = time.perf_counter() - t0
    df.before_step = lambda: None  # the steps below exclude refreshes; they are amortised separately
    erm_step = mean_time(step(erm), a.steps)
    df_step = mean_time(step(df), a.steps)

    x, y = batches[0][0]
    logits = torch.randn(len(x), dataset.num_classes)

    def ld_only():
        leaf = logits.clone().requires_grad_()
        keep = torch.randperm(len(x))[: df.ld.settings.batch_size]
        df.ld(leaf[keep], x[keep], y[keep], torch.Generator().manual_seed(0)).loss.backward()

    n_synthetic = round(df_hp["synthetic_fraction"] * hp["batch_size"] * len(train_envs))

    def synthetic_batch():
        df.pool.sample(n_synthetic, torch.Generator().manual_seed(0))

    ld_s = mean_time(ld_only, a.steps)
    synthetic_s = mean_time(synthetic_batch, a.steps)
    period = df.augmentation.settings.every_epochs * df.context.steps_per_epoch
    refresh_per_step = refresh_s / period
    df_total = df_step + refresh_per_step
    extra = df_total - erm_step
    ldm_share = (ld_s + refresh_per_step) / extra
    rows = [
        ("ERM step", erm_step),
        ("DomainFusion step (no refresh)", df_step),
        ("pool refresh, amortised per step", refresh_per_step),
        ("DomainFusion step, total", df_total),
        ("extra over ERM", extra),
        ("  latent distillation (VAE encode + UNet + VAE backward)", ld_s),
        ("  pool refresh (img2img + VAE encode/decode + shard I/O)", refresh_per_step),
        ("  synthetic images: pool read (they replace source images)", synthetic_s),
        ("  rest (not attributed)", extra - ld_s - refresh_per_step - synthetic_s),
    ]
    body = (
        f"DigitsDG-offline, held-out env {a.test_env}, default hparams + {a.hparams}: batch {hp['batch_size']} "
        f"per domain × {len(train_envs)} domains, LD sub-batch {df_hp['ld_batch_size']}, {n_synthetic} of the "
        f"step's images from the pool, pool {len(df.pool)} images × N={df_hp['aug_candidates']} candidates "
        f"every {df_hp['aug_every_epochs']} epoch(s) = every {period:.1f} steps; {torch.get_num_threads()} torch "
        f"threads; means over {a.steps} steps after one warm-up step. One refresh took {refresh_s:.1f} s; "
        f"building DomainFusion (LDM load + pool copy) {setup_s:.1f} s.\n\n"
        "| what | seconds per step |\n|---|---|\n"
        + "\n".join(f"| {k} | {v:.3f} |" for k, v in rows)
        + f"\n\n**DomainFusion / ERM step time: {df_total / erm_step:.2f}×** (target ≤ 1.5×). "
        f"**Share of the extra time inside UNet/VAE calls: {100 * ldm_share:.0f}%** (target ≥ 80%).\n"
    )
    (REPO / "benchmarks" / "reports" / f"{a.name}.json").write_text(json.dumps(dict(rows), indent=2))
    write_report(a.name, shlex.join([sys.executable, *sys.argv]), body)


if __name__ == "__main__":
    main()
