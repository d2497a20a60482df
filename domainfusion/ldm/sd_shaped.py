"""Stable-Diffusion-shaped LDM folders with random weights: SD's memory and speed, without downloading SD.

Stable Diffusion cannot be downloaded on these machines, yet what a real run costs (peak memory per LDM call, time per
step, where a GPU's time goes) depends only on the architecture, not on the weights. This module writes diffusers
folders whose UNet, VAE and CLIP text encoder have exactly the published configs of SD 1.5 (UNet 859.5 M, VAE
83.7 M, CLIP ViT-L/14 text 123.1 M parameters) and SD 2.1 (768 px, v-prediction, OpenCLIP-ViT-H-shaped text encoder:
hidden 1024, 23 layers), with randomly initialised weights, stored in fp16 under the cache folder (never the repo).
The tokenizer is the offline MiniLM's WordPiece one capped at CLIP's 77 tokens: only sequence shapes matter here.

What it must not do: pass for a real model. Images from these folders are noise, so model_index.json carries
`RANDOM_WEIGHTS_KEY` and `LatentDiffusion.from_pretrained` warns when it loads such a folder; they serve memory and
speed measurements (benchmarks/sd_scale.py) and tests of full-size shapes only.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from ..errors import UserError
from ..utils import cache_dir, publish_dir
from .embedded import text_encoder_path
from .latent_diffusion import MAX_PROMPT_TOKENS, RANDOM_WEIGHTS_KEY

FOLDER_LAYOUT = 1  # bump when the written folders change (configs, dtype, files)
MODELS = ("unet", "vae", "text_encoder")

_SD_UNET = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
_CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=False,
    steps_offset=1,
)

# The published configs (runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1), written out here.
SD_CONFIGS: dict[str, dict] = {
    "sd15": {
        "unet": dict(_SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(_SD_VAE, sample_size=512),
        "text_encoder": dict(
            _CLIP_TEXT,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        "scheduler": (PNDMScheduler, dict(_SCHEDULE, skip_prk_steps=True)),
    },
    "sd21": {
        "unet": dict(
            _SD_UNET,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        "vae": dict(_SD_VAE, sample_size=768),
        "text_encoder": dict(
            _CLIP_TEXT,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        ),
        "scheduler": (DDIMScheduler, dict(_SCHEDULE, clip_sample=False, prediction_type="v_prediction")),
    },
}


def _check_kind(kind: str) -> dict:
    if kind not in SD_CONFIGS:
        raise UserError(f"unknown Stable Diffusion shape '{kind}'; expected one of {', '.join(SD_CONFIGS)}")
    return SD_CONFIGS[kind]


def build_sd_model(kind: str, name: str, configs: dict | None = None) -> torch.nn.Module:
    """`kind`'s UNet, VAE or text encoder (`name` in `MODELS`; `configs` instead of `SD_CONFIGS[kind]`) with torch's
    default random initialisation, built on the current default device: under `with torch.device("meta")` it
    allocates nothing (parameter counts, shapes)."""
    config = (configs or _check_kind(kind))[name]
    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[name](**config)


def sd_shaped_folder(
    kind: str = "sd15", resolution: int | None = None, cache: str | Path | None = None, seed: int = 0
) -> Path:
    """The folder of a random-weight `kind` ("sd15" or "sd21") model working at `resolution` px (default: the
    published 512 or 768; the architecture and parameter count do not depend on it, only the configs' sample
    sizes), written once under `<cache>/sd-shaped/<kind>-<resolution>px-<layout>-seed<seed>/` (default cache:
    `utils.cache_dir()`, i.e. $DOMAINFUSION_CACHE): fp16 weights, 2.0 GB (sd15) or 2.5 GB (sd21), ~30 s on a CPU."""
    configs = _check_kind(kind)
    resolution = resolution or configs["vae"]["sample_size"]
    if resolution % 64:
        raise UserError(f"resolution must be a multiple of 64 (the UNet halves the latent 3 times), got {resolution}")
    dest = Path(cache or cache_dir()) / "sd-shaped" / f"{kind}-{resolution}px-{FOLDER_LAYOUT}-seed{seed}"
    if (dest / "model_index.json").is_file():
        return dest
    configs = dict(
        configs,
        unet=dict(configs["unet"], sample_size=resolution // 8),
        vae=dict(configs["vae"], sample_size=resolution),
    )

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        # One model at a time, cast to fp16 before saving (nn.Module.to: diffusers' `to` warns on every cast): peak
        # RAM is about the UNet in fp32 (3.4 GB), not all three.
        for name in MODELS:
            torch.nn.Module.to(build_sd_model(kind, name, configs), torch.float16).save_pretrained(tmp / name)
        scheduler_class, scheduler_config = configs["scheduler"]
        scheduler_class(**scheduler_config).save_pretrained(tmp / "scheduler")
        tokenizer = AutoTokenizer.from_pretrained(text_encoder_path(), model_max_length=MAX_PROMPT_TOKENS)
        tokenizer.save_pretrained(tmp / "tokenizer")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            RANDOM_WEIGHTS_KEY: f"RANDOM WEIGHTS: {kind}-shaped (published configs) at {resolution} px, randomly "
            f"initialised with seed {seed}; for memory and speed measurements only, its images "
            "are noise",
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", scheduler_class.__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", type(tokenizer).__name__],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    return publish_dir(build, dest, replace=False)
