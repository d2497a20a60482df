"""Time and peak memory of a Stable Diffusion run's parts against ERM, with the full-size SD 1.5 architecture.

The LDM is the SD-1.5-shaped folder of `domainfusion.ldm.sd_shaped` (published configs, random weights: time and
memory do not depend on the weights). PACS-shaped inputs: 3 source domains × `--batch` random 224 px images, 7
classes. Each configuration runs in a subprocess of its own, which reports:
- `erm`: one ERM step (ResNet-50), seconds per step;
- `ld`: one DomainFusion_LD step (CE on the 3·B images + λ·L_LD on `--ld-batch` of them: VAE encoder JVP + UNet),
  seconds per step, plus the LD loss alone and its encoder JVP alone (where the time goes);
- `refresh`: one online-augmentation refresh of a `--pool`-image pool (N candidates by img2img, deep-feature
  style/content, decode: the registry's defaults), seconds per pool image;
- `cdga`: CDGA's generation of `--pool` images (one variant each), seconds per image;
- `dsi`: one step of DSI's per-domain fine-tune of the full UNet (`--batch` latents, AdamW, an EMA copy, the
  scheduler's loss; `--gradient-checkpointing` as `dsi_finetune_gradient_checkpointing`), seconds per step;
and, for each, the peak memory of the measured part: peak RSS of the process (VmHWM, reset after setup through
/proc/self/clear_refs) on a CPU, `torch.cuda.max_memory_allocated` on a GPU, beside what was resident after setup
(weights, optimiser). `--count-flops` also counts the part's FLOPs (torch's FlopCounterMode, one extra untimed run)
and reports the achieved FLOP/s. Precision "bf16" runs the LDM in bfloat16 and the classifier's step under bf16
autocast; "fp32" runs both in fp32.

Derived in the report: DomainFusion's step = LD step + the refresh amortised over its period (pool = aug_pool_fraction
of the sources, refreshed every aug_every_epochs: per step, aug_pool_fraction · 3B · (s per refreshed image) / T),
its ratio to ERM's step, and the GPU-hours of a DomainBed PACS sweep (4 test envs × 20 hparams × 3 trials × 5,001
steps) at the measured step times. Usage (a CPU at reduced batch and resolution; a GPU at full size):

    .venv/bin/python benchmarks/sd_scale.py --batch 1 --resolution 128 --precision fp32 --pool 1 \\
        --candidates 2 --img2img-steps 2 --steps 1 --warmup 0 --name sd-scale-smoke
    .venv/bin/python benchmarks/sd_scale.py --batch 32 --resolution 512,256 --precision fp32,bf16 --count-flops
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from domainfusion import hparams as registry
from domainfusion.algorithms import RunContext, algorithm_class
from domainfusion.ldm import LatentDiffusion
from domainfusion.ldm.adapt import to_ldm_images
from domainfusion.ldm.sd_shaped import sd_shaped_folder
from domainfusion.ldm.training import ema_update, unet_loss
from domainfusion.method.latent_distillation import encode_linearised

from common import write_report

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]  # the last one held out
# The LDM's dtype; "bf16" also runs the classifier's step under bf16 autocast, "fp16" is what `domainfusion train`
# does on a GPU (LDM in fp16, classifier in fp32).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEASURES = ("erm", "ld", "refresh", "cdga", "dsi")
SWEEP_RUNS, SWEEP_STEPS = 4 * 20 * 3, 5001  # DomainBed PACS: test envs × hparams × trials, steps per run
# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, checked in order.
BF16_PEAKS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)]


# ----------------------------------------------------------------------------------------------- one configuration


class Meter:
    """Wall time (synchronised on a GPU) and the peak memory of what runs after `reset`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def resident_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated() / 1e9
        return _proc_status_kb("VmRSS") / 1e6

    def reset(self) -> None:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) restarts from the current RSS

    def peak_gb(self) -> float:
        self.sync()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 1e9
        return _proc_status_kb("VmHWM") / 1e6

    def seconds(self, fn, repeats: int = 1) -> float:
        """Mean wall seconds of `fn()` over `repeats` runs."""
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeats


def _proc_status_kb(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1])


def flops_of(fn) -> float:
    """FLOPs of one `fn()` as torch's FlopCounterMode counts them (matrix multiplications and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_configuration(cfg: dict) -> dict:
    """Measure `cfg["what"]` as the module docstring says; returns the numbers of one report row."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what, b = cfg["what"], cfg["batch"]
    meter = Meter(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["precision"] == "bf16" else nullcontext()
    if what == "dsi":
        return finetune_step(cfg, device, meter, autocast)
    g = torch.Generator().manual_seed(0)
    name = {"erm": "ERM", "ld": "DomainFusion_LD", "refresh": "DomainFusion_Aug", "cdga": "CDGA"}[what]
    hp = {**registry.default_hparams(name, "PACS"), "batch_size": b}
    # Images per source split: the refresh's pool is `pool` of the 3n; CDGA generates from all 3n (n ≥ pool / 3).
    n = -(-cfg["pool"] // 3) if what == "cdga" else max(b, cfg["pool"])
    hp.update({"ld_batch_size": min(cfg["ld_batch"], 3 * b)} if what == "ld" else {})
    hp.update(
        {"aug_pool_fraction": cfg["pool"] / (3 * n), "aug_candidates": cfg["candidates"]} if what == "refresh" else {}
    )
    hp.update({"img2img_steps": cfg["img2img_steps"]} if what in ("refresh", "cdga") else {})
    splits = [
        torch.utils.data.TensorDataset(torch.rand(n, 3, 224, 224, generator=g), torch.arange(n) % 7) for _ in range(3)
    ]
    minibatches = [
        (torch.rand(b, 3, 224, 224, generator=g).to(device), torch.randint(7, (b,), generator=g).to(device))
        for _ in range(3)
    ]
    out: dict = {"images": 3 * n if what == "cdga" else cfg["pool"]}
    with tempfile.TemporaryDirectory() as tmp:
        context = None
        if what != "erm":
            folder = sd_shaped_folder("sd15", resolution=cfg["resolution"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the random-weights warning: known, this is a speed benchmark
                ldm = LatentDiffusion.from_pretrained(
                    folder, device=device, dtype=DTYPES[cfg["precision"]], max_batch=cfg["max_batch"]
                )
            out["max_batch"] = ldm.max_batch
            context = dataclasses.replace(
                RunContext.for_data(
                    splits,
                    PACS_CLASSES,
                    PACS_DOMAINS[:3],
                    output_dir=tmp,
                    batch_size=b,
                    dataset="PACS",
                    env_names=PACS_DOMAINS,
                    ldm_model=str(folder),
                    device=device,
                ),
                _ldm=ldm,
            )
        meter.sync()
        if what == "cdga":  # generation happens while the algorithm is built (the ResNet-50 is built first)
            meter.reset()
            algorithm = algorithm_class(name)((3, 224, 224), 7, 3, hp, context=context)
            out["seconds"] = algorithm.generation_s.item() / out["images"]
            out["peak_gb"] = meter.peak_gb()
            out["resident_gb"] = meter.resident_gb()
            if cfg["count_flops"]:  # a second generation, into a pool folder of its own
                again = dataclasses.replace(context, output_dir=Path(tmp) / "flops")
                out["flops"] = flops_of(lambda: algorithm_class(name)((3, 224, 224), 7, 3, hp, context=again))
                out["flops"] /= out["images"]
            return out
        algorithm = algorithm_class(name)((3, 224, 224), 7, 3, hp, context=context).to(device)
        if what == "refresh":
            for _ in range(cfg["warmup"]):
                algorithm.augmentation.refresh()
            out["resident_gb"] = meter.resident_gb()
            meter.reset()
            out["seconds"] = meter.seconds(algorithm.augmentation.refresh) / cfg["pool"]
            out["peak_gb"] = meter.peak_gb()
            if cfg["count_flops"]:
                out["flops"] = flops_of(algorithm.augmentation.refresh) / cfg["pool"]
            return out

        def step() -> None:
            with autocast:
                algorithm.update(minibatches)

        for _ in range(cfg["warmup"]):
            step()
        out["resident_gb"] = meter.resident_gb()
        meter.reset()
        out["seconds"] = meter.seconds(step, cfg["steps"])
        out["peak_gb"] = meter.peak_gb()
        if cfg["count_flops"]:
            out["flops"] = flops_of(step)
        if what == "ld":  # where the time goes: the LD loss (encoder JVP + UNet), and the encoder JVP alone
            k = hp["ld_batch_size"]
            x, y = torch.cat([x for x, _ in minibatches])[:k], torch.cat([y for _, y in minibatches])[:k]
            with torch.no_grad():
                logits = algorithm.predict(x)
            generator = torch.Generator().manual_seed(1)
            ld = algorithm.ld
            images = to_ldm_images(x, ldm.image_size)
            confidence = logits.softmax(1)[:, 0]
            with autocast:
                out["ld_loss_seconds"] = meter.seconds(lambda: ld(logits, x, y, generator), cfg["steps"])
                out["jvp_seconds"] = meter.seconds(lambda: encode_linearised(ldm, confidence, images), cfg["steps"])
    return out


def finetune_step(cfg: dict, device: torch.device, meter: Meter, autocast) -> dict:
    """One step of DSI's UNet fine-tune as `ldm.training` runs it: fp32 weights (bf16 under autocast), AdamW, an EMA
    copy, the scheduler's prediction-type loss on latents (DSI encodes its domain once, before the steps)."""
    folder = sd_shaped_folder("sd15", resolution=cfg["resolution"])
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).to(device)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = cfg["resolution"] // 8
    z0 = torch.randn(cfg["batch"], 4, side, side, generator=g).to(device)
    embeds = torch.randn(cfg["batch"], 77, unet.config.cross_attention_dim, generator=g).to(device)
    steps = iter(range(10**9))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = unet_loss(unet, scheduler, z0, embeds, g, snr_gamma=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, 0.999, next(steps))

    step()  # AdamW's state exists from the first step on: it is part of what stays resident
    for _ in range(cfg["warmup"]):
        step()
    out = {"resident_gb": meter.resident_gb()}
    meter.reset()
    out["seconds"] = meter.seconds(step, cfg["steps"])
    out["peak_gb"] = meter.peak_gb()
    if cfg["count_flops"]:
        out["flops"] = flops_of(step)
    return out


# ------------------------------------------------------------------------------------------------ the whole report


def measure(cfg: dict) -> dict:
    """`cfg` measured in a fresh subprocess, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    print(
        "+",
        " ".join(f"{k}={v}" for k, v in cfg.items() if k in ("what", "resolution", "batch", "precision", "pool")),
        flush=True,
    )
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {**cfg, "error": f"exit code {proc.returncode}"}
    return {**cfg, **json.loads(proc.stdout.strip().splitlines()[-1])}


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def report(rows: list[dict], args: argparse.Namespace) -> str:
    device = rows[0].get("device", "cpu")
    peak = next((p for key, p in BF16_PEAKS if key in device), None)
    hp = registry.default_hparams("DomainFusion", "PACS")
    lines = [
        f"SD-1.5-shaped LDM (published configs, random weights; `domainfusion.ldm.sd_shaped`), PACS-shaped inputs: 3 "
        f"source domains × B images at 224 px, 7 classes, ResNet-50. Device: {device}. `max_batch` = LDM rows per "
        f"VAE/UNet call. LD sub-batch min({args.ld_batch}, 3B); refresh: pool of P images, {args.candidates} "
        f"candidates, {args.img2img_steps} DDIM steps at strength {hp['img2img_strength']}, guidance "
        f"{hp['img2img_guidance']}; CDGA: P images, one variant, "
        f"{args.img2img_steps} steps. Timings: mean of {args.steps} step(s) after {args.warmup} warm-up(s). Peak = "
        "the measured part's peak memory (peak RSS of its process on a CPU, max_memory_allocated on a GPU); "
        "resident = after setup (weights, optimiser state).",
        "",
        "| part | LDM px | B | P | precision | max_batch | seconds | peak GB | resident GB | GFLOP | achieved TFLOP/s |"
        " note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    unit = {"erm": "s/step", "ld": "s/step", "refresh": "s/pool image", "cdga": "s/image", "dsi": "s/step"}
    for r in rows:
        note = r.get("error", "")
        if r["what"] == "dsi" and "seconds" in r:
            note = "fine-tune step" + (", gradient checkpointing" if r["gradient_checkpointing"] else "")
        if r["what"] == "ld" and "ld_loss_seconds" in r:
            note = f"LD loss {r['ld_loss_seconds']:.3g} s, of which encoder JVP {r['jvp_seconds']:.3g} s"
        flops = r.get("flops")
        tflops = flops / r["seconds"] / 1e12 if flops and r.get("seconds") else None
        if tflops is not None and peak:
            note += f" ({100 * tflops * 1e12 / peak:.0f}% of the bf16 peak)"
        px = "—" if r["what"] == "erm" else r["resolution"]
        generates = r["what"] in ("refresh", "cdga")
        b, p = ("—", r.get("images", "—")) if generates else (r["batch"], "—")
        lines.append(
            f"| {r['what']} | {px} | {b} | {p} | {r['precision']} | {r.get('max_batch') or '—'} | "
            f"{fmt(r.get('seconds'))} {unit[r['what']]} | {fmt(r.get('peak_gb'))} | "
            f"{fmt(r.get('resident_gb'))} | {fmt(flops / 1e9 if flops else None)} | {fmt(tflops)} | {note} |"
        )
    measured = [r for r in rows if "seconds" in r]
    if not any(r["what"] == "ld" for r in measured):
        return "\n".join(lines) + "\n"
    fraction, period = hp["aug_pool_fraction"], hp["aug_every_epochs"]
    lines += [
        "",
        f"Derived, at the registry's DomainFusion defaults: DomainFusion's step = LD step + the refresh "
        f"amortised ({fraction} · 3B · s per refreshed image / {period} epoch); sweep hours on this device = "
        f"{SWEEP_RUNS} runs × {SWEEP_STEPS} steps × step time (CDGA's generation before training adds s/image × "
        "the source images).",
        "",
        "| LDM px | B | precision | ERM s/step | DomainFusion s/step | ratio | LD step | refresh/step | "
        "ERM sweep h | DomainFusion sweep h |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ld in (r for r in measured if r["what"] == "ld"):
        erm = next(
            (
                r
                for r in measured
                if r["what"] == "erm" and (r["batch"], r["precision"]) == (ld["batch"], ld["precision"])
            ),
            None,
        )
        refresh = next(
            (
                r
                for r in reversed(measured)
                if r["what"] == "refresh" and (r["resolution"], r["precision"]) == (ld["resolution"], ld["precision"])
            ),
            None,
        )
        if erm is None or refresh is None:
            continue
        amortised = fraction * 3 * ld["batch"] * refresh["seconds"] / period
        df = ld["seconds"] + amortised
        hours = SWEEP_RUNS * SWEEP_STEPS / 3600
        lines.append(
            f"| {ld['resolution']} | {ld['batch']} | {ld['precision']} | {erm['seconds']:.3g} | {df:.3g} | "
            f"{df / erm['seconds']:.2f}× | {ld['seconds']:.3g} | {amortised:.3g} | "
            f"{hours * erm['seconds']:.0f} | {hours * df:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="32", help="images per source domain per step (comma list)")
    p.add_argument("--resolution", default="512,256", help="LDM resolution in px (comma list, multiples of 64)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, fp16 (GPU), bf16")
    p.add_argument("--pool", default="32", help="refresh pool / CDGA images (comma list: memory must not grow)")
    p.add_argument("--measure", default=",".join(MEASURES), help=f"comma list of {', '.join(MEASURES)}")
    p.add_argument("--ld-batch", type=int, default=32, help="LD sub-batch (ld_batch_size), at most 3·batch")
    p.add_argument("--candidates", type=int, default=4, help="refresh candidates per image (aug_candidates)")
    p.add_argument("--img2img-steps", type=int, default=20, help="DDIM steps at strength 1 (img2img_steps)")
    p.add_argument("--max-batch", type=int, default=None, help="LatentDiffusion max_batch (default: the model's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (or refreshes) first")
    p.add_argument("--count-flops", action="store_true", help="also count FLOPs (one extra untimed run)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="dsi: recompute UNet activations")
    p.add_argument("--name", default="sd-scale")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        cfg = json.loads(a.worker)
        torch.manual_seed(0)
        out = run_configuration(cfg)
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        print(json.dumps(out))
        return
    lists = {k: [int(v) for v in getattr(a, k).split(",")] for k in ("batch", "resolution", "pool")}
    precisions, measures = a.precision.split(","), a.measure.split(",")
    for resolution in lists["resolution"]:  # built once, before any timing (about 30 s and 2 GB each)
        sd_shaped_folder("sd15", resolution=resolution)
    common = {
        "ld_batch": a.ld_batch,
        "candidates": a.candidates,
        "img2img_steps": a.img2img_steps,
        "max_batch": a.max_batch,
        "steps": a.steps,
        "warmup": a.warmup,
        "count_flops": a.count_flops,
        "gradient_checkpointing": a.gradient_checkpointing,
    }
    configs = []
    for precision in precisions:
        configs += [
            {"what": "erm", "resolution": None, "batch": b, "precision": precision, "pool": 0}
            for b in lists["batch"]
            if "erm" in measures
        ]
        for resolution in lists["resolution"]:
            configs += [
                {"what": "ld", "resolution": resolution, "batch": b, "precision": precision, "pool": 0}
                for b in lists["batch"]
                if "ld" in measures
            ]
            # A refresh and CDGA's generation do not depend on the classifier's batch.
            configs += [
                {"what": what, "resolution": resolution, "batch": 1, "precision": precision, "pool": pool}
                for what in ("refresh", "cdga")
                if what in measures
                for pool in lists["pool"]
            ]
            configs += [
                {"what": "dsi", "resolution": resolution, "batch": b, "precision": precision, "pool": 0}
                for b in lists["batch"]
                if "dsi" in measures
            ]
    start = time.time()
    rows = [measure({**common, **cfg}) for cfg in configs]
    body = report(rows, a) + f"\nWall time of the whole benchmark: {(time.time() - start) / 60:.1f} min.\n"
    command = shlex.join([sys.executable, *sys.argv])
    (Path(__file__).parent / "reports" / f"{a.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(body)
    write_report(a.name, command, body)


if __name__ == "__main__":
    main()
