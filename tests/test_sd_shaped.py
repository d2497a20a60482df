"""Stable-Diffusion-shaped random-weight folders (ldm/sd_shaped.py): the published parameter counts, checked on the
meta device (nothing allocated), and the folder layout loading through `LatentDiffusion.from_pretrained` with a warning
that says the weights are random (on shrunk widths, so the test writes kilobytes, not 2 GB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from domainfusion.ldm import LatentDiffusion, sd_shaped
from domainfusion.ldm.latent_diffusion import RANDOM_WEIGHTS_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

# Parameter counts of the published checkpoints (UNet, VAE, text encoder).
PUBLISHED = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840)}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_configs_have_the_published_parameter_counts(kind: str) -> None:
    with torch.device("meta"):
        models = [sd_shaped.build_sd_model(kind, name) for name in sd_shaped.MODELS]
    assert all(p.is_meta for m in models for p in m.parameters())
    assert tuple(count(m) for m in models) == PUBLISHED[kind]


def shrunk(kind: str) -> dict:
    """`kind`'s configs with every width cut to 32 and 64 px images: the same classes, blocks and options."""
    configs = sd_shaped.SD_CONFIGS[kind]
    return dict(
        configs,
        unet=dict(
            configs["unet"], block_out_channels=(32,) * 4, attention_head_dim=2, cross_attention_dim=32, sample_size=8
        ),
        vae=dict(configs["vae"], block_out_channels=(32,) * 4, sample_size=64),
        text_encoder=dict(
            configs["text_encoder"],
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            projection_dim=32,
        ),
    )


@pytest.mark.parametrize("kind, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_folder_loads_through_the_common_loader_and_warns_it_is_random(
    kind: str, prediction: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sd_shaped.SD_CONFIGS, kind, shrunk(kind))
    folder = sd_shaped.sd_shaped_folder(kind, cache=tmp_path)
    assert folder.is_relative_to(tmp_path) and sd_shaped.sd_shaped_folder(kind, cache=tmp_path) == folder
    assert "RANDOM WEIGHTS" in json.loads((folder / "model_index.json").read_text())[RANDOM_WEIGHTS_KEY]
    for weights in folder.glob("*/*.safetensors"):  # fp16 on disk: half the space
        with safe_open(str(weights), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        ldm = LatentDiffusion.from_pretrained(folder, device="cpu")
    assert ldm.image_size == 64 and ldm.scheduler.config.prediction_type == prediction
    assert type(ldm.text_encoder).__name__ == "CLIPTextModel"
    z = ldm.encode(torch.rand(2, 3, 64, 64))
    eps = ldm.predict_noise(z, torch.tensor([10, 900]), ldm.encode_prompts(["a photo of a dog", "a sketch"]))
    assert z.shape == eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
