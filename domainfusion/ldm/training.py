"""`domainfusion ldm train`'s trainer: pre-train the embedded LDM on the digit corpus, or train / fine-tune an LDM on
a dataset. What it trains on is prepared by `training_data.py`; the run's settings are `train_config.LDMTrainConfig`.

Three resumable stages, each on a CPU budget (the embedded preset must finish in 90 minutes on 2 cores):
1. VAE: L1 reconstruction + L1 on image gradients (a cheap, download-free stand-in for LPIPS: it keeps edges sharp)
   + Stable Diffusion's tiny KL weight; then `scaling_factor` = 1 / std of the training latents, as SD did.
2. Latent cache: every training image is encoded once (posterior mean and std), so the UNet stage never runs the
   VAE; a fresh posterior sample is still drawn per step from the cached mean and std.
3. UNet: MSE against the scheduler's own prediction target (ε; v for v-prediction models such as SD 2.x at 768 px;
   x₀ for "sample") with Min-SNR-gamma weighting (faster convergence per step, which is what a CPU budget needs), AdamW
   with warmup + cosine LR, an EMA copy of the weights (the one that is saved and sampled), and caption dropout to
   the empty prompt so classifier-free guidance works, and optionally style dropout to the bare class prompt (so that
   prompt means the class in any style, as latent distillation and the probe use it). For a full-size UNet on a GPU
   (DSI's fine-tunes of Stable Diffusion): bf16 or fp16 autocast (`unet_precision`; fp16 with dynamic loss scaling,
   as its gradients are trained on) and gradient checkpointing (`unet_gradient_checkpointing`).

Every random draw of step k comes from a generator seeded by (seed, stage, k) and batches from per-epoch seeded
permutations, so a run killed and resumed from its last checkpoint ends bit-identical (on CPU) to one that never
stopped. Checkpoints (safetensors weights, torch-saved optimizer state, JSON step) are written to a temp folder and
renamed. The result is a normal diffusers folder (`<output_dir>/ldm`) that `LatentDiffusion.from_pretrained` reads.

Fine-tuning (`init_from`: 'embedded', a diffusers folder or a hub id) starts every trained module and the EMA copy
from those weights. DSI's per-domain models use `vae_steps=0`: the VAE and its `scaling_factor` stay the shared
model's, because (a) the UNet was trained in that latent space (a moved VAE shifts the latents under it), (b) a
domain's style lives in what the UNet generates, while the VAE only has to reconstruct (and one shared encoder lets
a test image be encoded once for all source models), and (c) on a CPU the VAE step costs more than the UNet step.
`vae_steps > 0` fine-tunes it too (keeping its scale). Training data can be any torch dataset
(`training_data.dataset_training_data`), e.g. a run's in-splits: `train_ldm(config, data)`, or `train_or_reuse` for a
caller that owns the output folder and wants a finished model whatever the folder held (DSI).

What it must not do: touch MNIST val/test or DigitsDG images when pre-training (the corpus guarantees that), or train
the text encoder (it is frozen, shared with the classifier prompts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config_fields import changed_fields
from ..errors import UserError
from ..utils import atomic_write_text, publish_dir
from .embedded import assemble_ldm_folder, build_embedded_models, embedded_ldm_path, load_text_encoder, weight_bytes
from .grids import sample_grid, save_grid
from .latent_diffusion import LatentDiffusion
from .train_config import LDMTrainConfig
from .training_data import TrainingData, load_training_data

# The embedded LDM's recipe (v2), sized to train on a 2-core CPU with nothing else running (its stage times are in
# docs/ldm_corpus.md): the VAE stage in bf16 autocast, the UNet in fp32. Never run 2 torch threads beside another CPU
# job: OpenMP spin-waiting then makes each step many times slower.
PRESETS: dict[str, dict[str, Any]] = {
    "embedded": dict(
        data="corpus",
        corpus_size=100_000,
        vae_steps=4000,
        vae_batch_size=32,
        vae_precision="bf16",
        unet_steps=6000,
        unet_batch_size=64,
        style_dropout=0.15,
        checkpoint_every=500,
        sample_every=1000,
    ),
}
# Mixed precision per stage: autocast, the weights and optimiser stay fp32. fp16 (with loss scaling) is offered for
# the UNet stage only, the one fine-tuned at full size (DSI); the VAE stage keeps the embedded recipe's choices.
PRECISIONS = ("fp32", "bf16")
UNET_PRECISIONS = (*PRECISIONS, "fp16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a diffusers scheduler says the UNet predicts


def _to_model_range(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    return images_u8.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The CPU generator of one training step: depends only on (seed, stage, step), hence exact resumption."""
    state = np.random.SeedSequence([seed, {"vae": 1, "unet": 2}[stage], step]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of step `step`: slices of a per-epoch seeded permutation (the last partial batch is dropped)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator, kl_weight: float, edge_weight: float
) -> torch.Tensor:
    """L1 + edge_weight * L1 of finite differences + kl_weight * KL per pixel, on x in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    l1 = (recon - x).abs().mean()
    edge = (recon.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (recon.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    kl = posterior.kl().mean() / x[0].numel()
    return l1 + edge_weight * edge + kl_weight * kl


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images_u8: torch.Tensor, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB, [0, 1] range) of decode(posterior mean): the VAE quality gate."""
    device = next(vae.parameters()).device
    scores = []
    for batch in images_u8.split(batch_size):
        x = _to_model_range(batch, device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        scores.append(-10 * torch.log10(mse))
    return float(torch.cat(scores).mean())


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images_u8: torch.Tensor, batch_size: int = 256, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior (mean, std) of every image, float32 on the CPU."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for batch in tqdm(images_u8.split(batch_size), desc="encode latents", disable=not progress, leave=False):
        posterior = vae.encode(_to_model_range(batch, device)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def prediction_type(scheduler: DDPMScheduler) -> str:
    """The scheduler's `prediction_type`: the model was trained to predict it, so a fine-tune must keep it."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise UserError(f"cannot train a UNet with prediction_type {kind!r}; known: {', '.join(PREDICTION_TYPES)}")
    return kind


def unet_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    embeds: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE against the scheduler's prediction target at uniform timesteps: ε, v = √ᾱ·ε − √(1 − ᾱ)·z₀, or z₀;
    Min-SNR-gamma weighted (Hang et al. 2023) when gamma is set, min(snr, γ) divided by snr, snr + 1 or 1
    respectively (each target's error is that multiple of the z₀ error, so all three weight timesteps alike)."""
    kind = prediction_type(scheduler)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
    pred = unet(scheduler.add_noise(z0, noise, t), t, embeds).sample
    if kind == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    else:
        target = noise if kind == "epsilon" else z0
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return mse.mean()
    a = scheduler.alphas_cumprod.to(z0.device)[t]
    snr = a / (1 - a)
    return (mse * snr.clamp(max=snr_gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": 1.0}[kind]).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with the usual warmup, min(decay, (1 + step) / (10 + step)), so early averages are not stuck at init."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


# ---------------------------------------------------------------------------------------------------- checkpoints


def publish_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through a temp name in the same folder, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _checkpoint_dir(out: Path, stage: str, step: int) -> Path:
    return out / "checkpoints" / f"{stage}-{step:07d}"


def latest_checkpoint(out: Path, stage: str) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint of a stage (temp folders never match)."""
    found = sorted((out / "checkpoints").glob(f"{stage}-[0-9][0-9][0-9][0-9][0-9][0-9][0-9]"))
    found = [p for p in found if (p / "state.json").is_file()]
    return (int(found[-1].name.split("-")[1]), found[-1]) if found else None


def _write_checkpoint(
    out: Path,
    stage: str,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    keep: int,
) -> Path:
    """Write weights (safetensors), optimizer state, the step and the fp16 loss scale atomically; keep only the
    newest `keep`."""

    def build(tmp: Path) -> None:
        for name, module in modules.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"stage": stage, "step": step, **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
        (tmp / "state.json").write_text(json.dumps(state))

    path = publish_dir(build, _checkpoint_dir(out, stage, step))
    for old in sorted((out / "checkpoints").glob(f"{stage}-[0-9]*[0-9]"))[:-keep]:
        shutil.rmtree(old)
    return path


def _load_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> None:
    for name, module in modules.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scaler.is_enabled():
        scaler.load_state_dict(json.loads((path / "state.json").read_text())["grad_scaler"])


# ---------------------------------------------------------------------------------------------------- training


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _forget_log_after(out: Path, stage: str, step: int) -> None:
    """Drop the log records a killed run wrote after its last checkpoint: the resumed run writes them again."""
    log = out / "log.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines()]
        kept = [r for r in records if r["stage"] != stage or r["step"] <= step]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))


def _run_stage(
    stage: str,
    out: Path,
    config: LDMTrainConfig,
    total: int,
    peak_lr: float,
    modules: dict[str, torch.nn.Module],
    trained: torch.nn.Module,
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    after_step: Callable[[int], None] = lambda step: None,
    after_checkpoint: Callable[[], None] = lambda: None,
) -> float:
    """The optimisation loop shared by both stages; resumes from the stage's last checkpoint. Returns s/step.
    Under fp16 the loss is scaled dynamically (fp16 gradients underflow), and unscaled before clipping."""
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=config.weight_decay)
    precision = {"vae": config.vae_precision, "unet": config.unet_precision}[stage]
    scaler = torch.amp.GradScaler(params[0].device.type, enabled=precision == "fp16")
    start = 0
    found = latest_checkpoint(out, stage)
    if found is not None:
        start, path = found
        _load_checkpoint(path, modules, optimizer, scaler)
    _forget_log_after(out, stage, start)
    window: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, total), desc=f"{stage} training", disable=not config.progress, initial=start, total=total)
    for step in bar:
        lr = learning_rate(step, total, peak_lr, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(step, step_generator(config.seed, stage, step))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed (the scale is then lowered)
        scaler.update()
        after_step(step)
        window.append(loss.item())
        done = step + 1
        if done % config.log_every == 0 or done == total:
            _log(out, {"stage": stage, "step": done, "loss": float(np.mean(window)), "lr": lr})
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        if done % config.checkpoint_every == 0 or done == total:
            _write_checkpoint(out, stage, done, modules, optimizer, scaler, config.keep_checkpoints)
            after_checkpoint()
    return (time.perf_counter() - t0) / max(1, total - start)


def changed_settings(out: Path, config: LDMTrainConfig) -> list[str]:
    """The settings (result-free ones aside) in which `config` differs from the run saved in `out`."""
    return changed_fields(json.loads((out / "config.json").read_text()), config, LDMTrainConfig(output_dir=""))


def _check_resumable(out: Path, config: LDMTrainConfig) -> None:
    """Refuse to mix two runs in one folder: a used folder needs resume=True and the same settings."""
    if not (out / "config.json").is_file():
        return
    if not config.resume:
        raise UserError(f"{out} already holds an LDM training run; resume it (--resume) or choose another output dir")
    changed = changed_settings(out, config)
    if changed:
        raise UserError(
            f"cannot resume {out}: settings differ from the saved run ({', '.join(changed)}); "
            "use the same settings or another output dir"
        )


class WallClock:
    """A training run's wall time summed over its invocations, saved (`wall_s.json`) at every checkpoint: a resumed
    run adds its own time to what the killed ones had spent up to their last checkpoint (work a kill threw away
    after that is redone, and counted, by the resumed run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.earlier = float(json.loads(path.read_text())["wall_s"]) if path.is_file() else 0.0
        self.started = time.perf_counter()

    def this_invocation(self) -> float:
        return time.perf_counter() - self.started

    def total(self) -> float:
        return self.earlier + self.this_invocation()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"wall_s": self.total()}))


def finished_wall_s(out: Path) -> float:
    """The wall time of the finished run in `out`, all invocations (a run finished before `wall_s` was recorded
    counts its last invocation)."""
    summary = json.loads((out / "summary.json").read_text())
    return float(summary.get("wall_s", summary["wall_s_this_invocation"]))


def _custom_data_config(config: LDMTrainConfig, data: TrainingData) -> LDMTrainConfig:
    """`config` as saved for a run on caller-given `data`: config.json then names exactly these images."""
    return dataclasses.replace(config, data="custom", data_fingerprint=data.fingerprint)


def _initial_models(config: LDMTrainConfig, device: torch.device):
    """(vae, unet, text_encoder, tokenizer, scheduler): loaded from `init_from`, or built from the embedded configs
    (with `model_overrides`) under the run's seed."""
    if config.init_from:
        path = embedded_ldm_path() if config.init_from == "embedded" else config.init_from
        base = LatentDiffusion.from_pretrained(path, device=device, dtype=torch.float32)
        return base.vae, base.unet, base.text_encoder, base.tokenizer, base.scheduler
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        vae, unet, scheduler = build_embedded_models(config.model_overrides)
    return (vae, unet, *load_text_encoder(), scheduler)


def train_ldm(config: LDMTrainConfig, data: TrainingData | None = None) -> Path:
    """Run (or resume) the three stages and return the trained diffusers folder `<output_dir>/ldm`.

    `data` replaces the data named by the config (e.g. a run's in-split, built with `dataset_training_data`); its
    fingerprint goes into config.json, so a resumed run must see the same images. summary.json's `wall_s` is the
    time of all invocations (see `WallClock`)."""
    if data is not None:
        config = _custom_data_config(config, data)
    _check_precisions(config)
    out = Path(config.output_dir)
    final = out / "ldm"
    _check_resumable(out, config)
    if (final / "model_index.json").is_file():
        return final
    clock = WallClock(out / "wall_s.json")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    vae, unet, text_encoder, tokenizer, scheduler = _initial_models(config, device)
    prediction_type(scheduler)  # refused before the run's folder is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    data = data if data is not None else load_training_data(config, resolution)
    summary: dict[str, Any] = {
        "images": len(data.images),
        "unique_captions": len(set(data.captions)),
        "vae_unet_fp16_bytes": weight_bytes(vae, unet),
    }
    vae = _vae_stage(config, out, vae, data, device, summary, clock.save)
    ema_unet = copy.deepcopy(unet)
    ldm = LatentDiffusion(vae, ema_unet, text_encoder, tokenizer, scheduler, device=device, dtype=torch.float32)
    _unet_stage(config, out, ldm, unet, data, summary, clock.save)
    _sample(ldm, data, config, out / "samples" / "final.png")
    check = data.check_images[:8].permute(0, 3, 1, 2).float() / 255
    save_grid(
        [check, ldm.decode(ldm.encode(check))], out / "samples" / "vae-reconstructions.png", ["input", "reconstruction"]
    )
    if config.init_from:
        publish_dir(lambda tmp: ldm.save_pretrained(tmp), final)
    else:
        assemble_ldm_folder(final, vae, ema_unet, scheduler)
    summary.update(wall_s=clock.total(), wall_s_this_invocation=clock.this_invocation())
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return final


class TrainedLDM(NamedTuple):
    """A finished training run: its diffusers folder and its wall time over all invocations."""

    folder: Path
    wall_s: float


def train_or_reuse(config: LDMTrainConfig, data: TrainingData) -> TrainedLDM:
    """Train on caller-given `data` into `config.output_dir`, a folder the caller owns, deciding what its contents
    are worth: a finished run with the same settings and data is reused, a killed one resumed from its last
    checkpoint, and a run with other settings or data (e.g. an earlier run's hparams), which `train_ldm` would refuse,
    is deleted and trained again from the start."""
    config = dataclasses.replace(config, resume=True)
    out = Path(config.output_dir)
    if (out / "config.json").is_file() and changed_settings(out, _custom_data_config(config, data)):
        shutil.rmtree(out)
    folder = train_ldm(config, data)
    return TrainedLDM(folder, finished_wall_s(out))


def _vae_stage(
    config: LDMTrainConfig,
    out: Path,
    vae: AutoencoderKL,
    data: TrainingData,
    device: torch.device,
    summary: dict[str, Any],
    after_checkpoint: Callable[[], None],
) -> AutoencoderKL:
    """Stage 1: train the VAE (skipped for a fine-tune with vae_steps=0), set its scale, save it to `out/vae`;
    a restart finds `out/vae` and reuses it. Returns the frozen VAE."""
    vae_dir = out / "vae"
    if (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir)
    elif config.vae_steps > 0 or not config.init_from:
        vae.to(device).requires_grad_(True).train()
        n = len(data.images)

        def vae_step(step: int, g: torch.Generator) -> torch.Tensor:
            x = _to_model_range(data.images[batch_indices(n, config.vae_batch_size, step, config.seed)], device)
            with _autocast(device, config.vae_precision):
                return vae_loss(vae, x, g, config.vae_kl_weight, config.vae_edge_weight)

        summary["vae_s_per_step"] = _run_stage(
            "vae",
            out,
            config,
            config.vae_steps,
            config.vae_lr,
            {"vae": vae},
            vae,
            vae_step,
            after_checkpoint=after_checkpoint,
        )
        vae.requires_grad_(False).eval()
        if not config.init_from:  # a fine-tuned VAE keeps its scale: the UNet was trained in that latent space
            sample = data.images[torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))]
            mean, std = encode_latents(vae, sample[: config.scale_samples])
            z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(config.seed))
            vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        publish_dir(lambda tmp: vae.save_pretrained(tmp), vae_dir)
    vae.to(device).requires_grad_(False).eval()
    summary["scaling_factor"] = float(vae.config.scaling_factor)
    summary["vae_psnr_db"] = vae_psnr(vae, data.check_images)
    return vae


def _unet_stage(
    config: LDMTrainConfig,
    out: Path,
    ldm: LatentDiffusion,
    unet: UNet2DConditionModel,
    data: TrainingData,
    summary: dict[str, Any],
    after_checkpoint: Callable[[], None],
) -> None:
    """Stages 2 and 3: cache the latents once (`out/latents.safetensors`), then train `unet` on them while
    `ldm.unet` (its EMA copy) follows it and draws the sample grids."""
    device = ldm.device
    cache = out / "latents.safetensors"
    if not cache.is_file():
        mean, std = encode_latents(ldm.vae, data.images, progress=config.progress)
        publish_file(cache, lambda tmp: save_file({"mean": mean, "std": std}, tmp))
    latents = load_file(cache)
    mean, std = latents["mean"].to(device), latents["std"].to(device)
    unet.to(device).requires_grad_(True).train()
    if config.unet_gradient_checkpointing:  # only the trained copy: the EMA copy never runs with grad
        unet.enable_gradient_checkpointing()
    captions = sorted(set(data.captions))
    embeds = torch.cat([ldm.encode_prompts(captions[i : i + 256], cache=False) for i in range(0, len(captions), 256)])
    index_of = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([index_of[c] for c in data.captions], device=device)
    empty = ldm.encode_prompts([""])[0]
    if config.style_dropout:
        if data.class_captions is None:
            raise UserError(
                "style_dropout needs class prompts for the training images; this data has none (set it to 0)"
            )
        class_prompts = sorted(set(data.class_captions))
        class_embeds = ldm.encode_prompts(class_prompts)
        class_of = {c: i for i, c in enumerate(class_prompts)}
        class_index = torch.tensor([class_of[c] for c in data.class_captions], device=device)

    def unet_step(step: int, g: torch.Generator) -> torch.Tensor:
        idx = batch_indices(len(mean), config.unet_batch_size, step, config.seed).to(device)
        posterior_noise = torch.randn(mean[idx].shape, generator=g).to(device)
        z0 = ldm.scaling_factor * (mean[idx] + std[idx] * posterior_noise)
        u = torch.rand(len(idx), generator=g).to(device)
        cond = embeds[caption_index[idx]]
        if config.style_dropout:
            restyle = (u >= config.cond_dropout) & (u < config.cond_dropout + config.style_dropout)
            cond = torch.where(restyle[:, None, None], class_embeds[class_index[idx]], cond)
        cond = torch.where((u < config.cond_dropout)[:, None, None], empty, cond)
        with _autocast(device, config.unet_precision):
            return unet_loss(unet, ldm.scheduler, z0, cond, g, config.snr_gamma)

    def after_unet_step(step: int) -> None:
        ema_update(ldm.unet, unet, config.ema_decay, step)
        if config.sample_every and (step + 1) % config.sample_every == 0:
            _sample(ldm, data, config, out / "samples" / f"unet-{step + 1:07d}.png")

    summary["unet_s_per_step"] = _run_stage(
        "unet",
        out,
        config,
        config.unet_steps,
        config.unet_lr,
        {"unet": unet, "ema": ldm.unet},
        unet,
        unet_step,
        after_unet_step,
        after_checkpoint,
    )


def _check_precisions(config: LDMTrainConfig) -> None:
    """Refuse an unknown stage precision before the run's folder is written."""
    for name, known in (("vae_precision", PRECISIONS), ("unet_precision", UNET_PRECISIONS)):
        if getattr(config, name) not in known:
            raise UserError(f"unknown {name} {getattr(config, name)!r}; expected one of {', '.join(known)}")


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for a training stage: "fp32" (off), "bf16" or "fp16" (autocast; weights stay fp32)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def _sample(ldm: LatentDiffusion, data: TrainingData, config: LDMTrainConfig, out_png: Path) -> None:
    sample_grid(
        ldm,
        data.grid_prompts,
        out_png,
        n_seeds=config.sample_seeds,
        num_inference_steps=config.sample_steps,
        guidance_scale=config.sample_guidance,
        seed=config.seed,
    )
