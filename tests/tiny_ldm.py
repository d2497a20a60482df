"""Tiny randomly initialised LDM components of the real classes (diffusers VAE/UNet, BERT or CLIP text encoder),
shared by the LDM-layer and method tests so they run offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from domainfusion.ldm import LatentDiffusion

BERT_VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] a photo of the dog cat house sketch painting ##s".split()
# The tiny byte-level BPE vocabulary of transformers' own CLIP tokenizer tests.
CLIP_VOCAB = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "s",
    "t",
    "i",
    "d",
    "n",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
]

# Generation settings small enough for a test: batch 4 per domain, a quarter of the images in the pool, 2 candidates.
TINY_GENERATION = {
    "data_augmentation": False,
    "batch_size": 4,
    "synthetic_fraction": 0.25,
    "img2img_steps": 4,
    "aug_candidates": 2,
    "aug_pool_fraction": 0.25,
    "ld_batch_size": 4,
}


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """A seeded batch of random 32×32 RGB images in [0, 1]."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny_vae_unet(cross_attention_dim: int = 32) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """An f=4 VAE (32×32 images → 8×8×4 latents) and a two-level cross-attention UNet on those latents.

    The VAE's scaling factor gives unit-variance latents, as Stable Diffusion's 0.18215 does for its VAE; with the
    default, noise would swamp the latents at any img2img strength.
    """
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():
        vae.register_to_config(scaling_factor=1 / vae.encode(images(8) * 2 - 1).latent_dist.mean.std().item())
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    return vae, unet


def bert_components(tmp: Path, **scheduler_kwargs) -> dict:
    """Embedded-LDM-shaped components: BERT text encoder + WordPiece tokenizer, DDPM schedule."""
    vae, unet = tiny_vae_unet()
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(BERT_VOCAB) + "\n")
    text_encoder = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=len(BERT_VOCAB),
            use_attention_mask=True,
        )
    )
    return dict(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=BertTokenizer(str(vocab), model_max_length=16),
        scheduler=DDPMScheduler(num_train_timesteps=1000, **scheduler_kwargs),
    )


def clip_components(tmp: Path) -> dict:
    """Stable-Diffusion-1.x-shaped components: CLIP text encoder + BPE tokenizer (77 tokens)."""
    vae, unet = tiny_vae_unet()
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CLIP_VOCAB)}))
    (tmp / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(
        str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(CLIP_VOCAB),
            projection_dim=32,
            max_position_embeddings=77,
            bos_token_id=21,
            eos_token_id=22,
            pad_token_id=22,
        )
    )
    return dict(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),
    )


def save_tiny_ldm(dest: Path, kind: str = "bert") -> Path:
    """Write a tiny LDM folder ('bert' = embedded-shaped, 'clip' = Stable-Diffusion-1.x-shaped) and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    components = bert_components(dest) if kind == "bert" else clip_components(dest)
    LatentDiffusion(**components, device="cpu").save_pretrained(dest / "ldm")
    return dest / "ldm"
