"""One frozen latent diffusion model behind one small API, whatever its size.

DomainFusion needs four things from an LDM: the VAE (encode with a gradient path for latent distillation, decode for
augmentation), the forward noising process, one UNet noise prediction, and SDEdit image-to-image. `LatentDiffusion`
provides exactly these for any Stable Diffusion 1.x/2.x folder in diffusers format *and* for our embedded tiny LDM,
which has the same layout (model_index.json + vae/ unet/ text_encoder/ tokenizer/ scheduler/) with a BERT text
encoder instead of CLIP. The component classes come from model_index.json, so neither model is special-cased.

Memory is bounded per call, not per caller: every VAE, UNet and text-encoder call sees at most `max_batch` rows
(images, or UNet rows: an image under classifier-free guidance is two), whatever batch a caller passes (a pool shard
of 1,024 images, a CDGA chunk, a probe batch); larger batches are processed in chunks, with the results of one call
up to float rounding.
Attention runs through diffusers' default `AttnProcessor2_0`, i.e. PyTorch's scaled_dot_product_attention (flash or
memory-efficient kernels on a GPU), in the UNet and in the VAE's middle block.

What it must not do: train or fine-tune anything (every module is frozen; the paper's point is one shared, frozen
LDM), or reimplement diffusers' sampling loops (img2img and text-to-image run diffusers' own pipelines, composed from
these same components).
"""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UserError

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
MAX_PROMPT_TOKENS = 77  # CLIP's context length; longer tokenizer limits only waste UNet cross-attention work
PIXEL_TOLERANCE = 1e-3  # resizing/normalising pipelines overshoot [0, 1] by rounding errors
# A Hugging Face Hub model id as diffusers models are published: 'org/name', each part starting with a letter or digit.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Endings of files people pass for a model (single-file checkpoints, configs), never of a hub id.
FILE_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml")
# Optional in a model folder: a JSON list of the looks the model's captions name ("printed black on paper"), for
# online augmentation's style-phrase candidates; models without one get a generic list (ldm/adapt.py).
STYLE_VOCABULARY_FILE = "style_vocabulary.json"
# A model_index.json key that marks a folder of randomly initialised weights (ldm/sd_shaped.py): loading it warns.
RANDOM_WEIGHTS_KEY = "_random_weights"
# The default `max_batch` in pixels per call: 16 images at 512 px (Stable Diffusion 1.x: a VAE decode of 16 images
# peaks at a few GB in fp16), 7 at 768, 64 at 256, and 4,096 at the embedded LDM's 32 px, more than any call of a
# default-hparams run makes (a 1,024-image pool shard × 4 candidates), so its runs are unchanged.
DEFAULT_BATCH_PIXELS = 16 * 512 * 512


class LatentDiffusion:
    """A frozen Stable-Diffusion-style LDM: VAE + text-conditioned UNet + text encoder + noise schedule.

    `scheduler` is the training (noising) schedule, always a `DDPMScheduler` built from the model's scheduler config,
    the way diffusers' own training scripts do; sampling uses DDIM schedulers built from the same config.
    Latents are "scaled" latents (posterior × `scaling_factor`), the space the UNet was trained in.
    `max_batch` bounds the rows of every VAE/UNet/text-encoder call (default: `DEFAULT_BATCH_PIXELS` worth of images
    at the model's resolution).
    """

    def __init__(
        self,
        vae,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        style_vocabulary: list[str] | None = None,
        max_batch: int | None = None,
    ) -> None:
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if vae.config.latent_channels != 4:
            raise UserError(
                f"the VAE has {vae.config.latent_channels} latent channels; LatentDiffusion supports the "
                "Stable Diffusion 1.x/2.x layout with 4 (diffusers' img2img pipeline assumes 4)"
            )
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise UserError(
                f"the text encoder's hidden size ({text_encoder.config.hidden_size}) does not match the "
                f"UNet's cross_attention_dim ({unet.config.cross_attention_dim}): the components do not "
                "belong to the same model"
            )
        for module in (vae, unet, text_encoder):
            # nn.Module.to: diffusers' override (0.42) warns on every dtype cast, even with no fp32-only submodules.
            torch.nn.Module.to(module.requires_grad_(False).eval(), self.device, self.dtype)
        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        self.style_vocabulary = style_vocabulary
        # A private DDPM copy, so pipelines and callers never mutate the schedule the LD loss relies on. clip_sample
        # and steps_offset (which only affect sampling) get the values StableDiffusionPipeline would otherwise force
        # with a deprecation warning, so saved folders load warning-free in plain diffusers too.
        self.scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=False, steps_offset=1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_scale_factor
        if max_batch is not None and max_batch < 1:
            raise UserError(f"max_batch must be at least 1 (images per VAE/UNet call), got {max_batch}")
        self.max_batch = max_batch or max(1, DEFAULT_BATCH_PIXELS // self.image_size**2)
        self.latent_channels = int(vae.config.latent_channels)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._pipelines: dict[type, DiffusionPipeline] = {}

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
    ) -> LatentDiffusion:
        """Load a diffusers-format LDM from a local folder or a Hugging Face Hub id.

        Each component is loaded by the class model_index.json names (CLIPTextModel for Stable Diffusion, BertModel
        for the embedded LDM) with its own `from_pretrained(..., subfolder=...)`; no pipeline object is built, so
        unused components (safety checker, feature extractor) are never loaded or downloaded.
        """
        path = Path(path_or_id).expanduser()
        vocabulary = None
        if path.is_dir():
            index = _read_local_index(path)
            vocabulary = _read_style_vocabulary(path / STYLE_VOCABULARY_FILE)
        elif path.exists():
            raise UserError(
                f"'{path}' is a file; expected a diffusers model folder (model_index.json, "
                f"{', '.join(c + '/' for c in COMPONENTS)})"
            )
        elif _is_hub_id(str(path_or_id)):
            try:
                index = DiffusionPipeline.load_config(str(path_or_id))
            except OSError as e:
                reason = str(e).split("\n")[0]
                raise UserError(
                    f"'{path_or_id}' is neither a local folder nor a reachable Hugging Face Hub model id "
                    f"({type(e).__name__}: {reason})"
                ) from e
            missing = [c for c in COMPONENTS if not _declared(index, c)]
            if missing:
                raise UserError(
                    f"hub model '{path_or_id}' is not a Stable-Diffusion-style LDM: model_index.json "
                    f"declares no {', '.join(missing)}"
                )
        else:
            raise UserError(
                f"model folder '{path_or_id}' does not exist; check the path (an LDM is 'embedded', a "
                "diffusers model folder, or a Hugging Face Hub id 'org/name')"
            )
        source = str(path) if path.is_dir() else str(path_or_id)
        if index.get(RANDOM_WEIGHTS_KEY):
            warnings.warn(f"{source}: {index[RANDOM_WEIGHTS_KEY]}", stacklevel=2)
        components = {name: _load_component(source, name, index[name]) for name in COMPONENTS}
        return cls(**components, device=device, dtype=dtype, style_vocabulary=vocabulary, max_batch=max_batch)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers folder (safetensors) that both `from_pretrained` and diffusers' pipelines can read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index: dict[str, object] = {
            "_class_name": StableDiffusionPipeline.__name__,
            "_diffusers_version": diffusers.__version__,
        }
        for name in COMPONENTS:
            component = getattr(self, name)
            component.save_pretrained(path / name)
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.style_vocabulary is not None:
            (path / STYLE_VOCABULARY_FILE).write_text(json.dumps(self.style_vocabulary, indent=0) + "\n")

    # ------------------------------------------------------------------ memory budget

    def batch_limit(self, guidance_scale: float = 1.0) -> int:
        """Images per call such that a call sees at most `max_batch` rows (two per image for the UNet under
        classifier-free guidance)."""
        return max(1, self.max_batch // (2 if guidance_scale > 1 else 1))

    def chunks(self, n: int, start: int = 0, guidance_scale: float = 1.0) -> list[slice]:
        """Consecutive slices covering start … start + n − 1, each at most `batch_limit(guidance_scale)` long: how
        every call here, and callers that hold per-image intermediates (online augmentation, CDGA), split a batch."""
        step, stop = self.batch_limit(guidance_scale), start + n
        return [slice(a, min(a + step, stop)) for a in range(start, stop, step)]

    # ------------------------------------------------------------------ VAE

    def check_images(self, images: torch.Tensor) -> None:
        """Reject anything but a float (B, 3, image_size, image_size) batch in [0, 1]: the VAE silently misbehaves
        on other ranges and the UNet on other sizes. A ValueError: callers (ours, or a Python user's) convert dataset
        images with `adapt.to_ldm_images`, so a wrong batch here is a bug, not a user's input."""
        s = self.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected an image batch of shape (B, 3, {s}, {s}), got {shape}")
        if images.shape[0] == 0:
            raise ValueError("expected a non-empty image batch")
        if tuple(images.shape[2:]) != (s, s):
            raise ValueError(
                f"this latent diffusion model works on {s}×{s} images, got "
                f"{images.shape[2]}×{images.shape[3]}; resize the images to {s}×{s}"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        lo, hi = images.detach().aminmax()
        if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
            raise ValueError(f"expected image values in [0, 1], got range [{lo.item():.3g}, {hi.item():.3g}]")

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [0, 1] → scaled latents (posterior mean, or a posterior sample), in `self.dtype`.

        Keeps the autograd graph when `images` require grad, and forward-mode tangents of dual `images` (latent
        distillation's JVP); the VAE's own parameters stay frozen. A posterior sample draws its noise for the whole
        batch at once, as diffusers' `sample` does, so chunking does not change it.
        """
        self.check_images(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            x = images.to(self.device, self.dtype) * 2 - 1
            posteriors = [self.vae.encode(x[rows]).latent_dist for rows in self.chunks(len(x))]
            z = torch.cat([p.mean for p in posteriors])
            if sample:
                noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + torch.cat([p.std for p in posteriors]) * noise
            return z * self.scaling_factor

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the VAE encoder's deepest feature map, the input of its middle block (B, C, h, w):
        the many-channel space online augmentation can split into style and content (C = 512 on Stable Diffusion,
        96 on the embedded LDM, against the latent's 4). `latents_from_features` finishes the encoder."""
        self.check_images(images)
        encoder = self.vae.encoder
        x = images.to(self.device, self.dtype) * 2 - 1
        features = []
        for rows in self.chunks(len(x)):
            h = encoder.conv_in(x[rows])
            for block in encoder.down_blocks:
                h = block(h)
            features.append(h)
        return torch.cat(features)

    @torch.no_grad()
    def latents_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The rest of `encode` from `encode_features`' map: middle block, output head, posterior mean, scaled.
        `latents_from_features(encode_features(x))` is `encode(x)`."""
        encoder = self.vae.encoder
        means = []
        for rows in self.chunks(len(features)):
            h = features[rows].to(self.dtype)
            moments = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            means.append(moments.chunk(2, dim=1)[0])
        return torch.cat(means) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → float32 images in [0, 1]."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        x = torch.cat([self.vae.decode(z[rows]).sample.float() for rows in self.chunks(len(z))])
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], cache: bool = True) -> torch.Tensor:
        """Prompts → text-encoder hidden states (B, L, D), each distinct string encoded once per model instance
        (`cache=False`: encoded now and not kept, for bulk callers that hold the result themselves, e.g. tens of
        thousands of training captions).

        Like diffusers' `encode_prompt`, an attention mask is passed only if the text encoder's config sets
        `use_attention_mask` (Stable Diffusion's CLIP was trained without one).
        """
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("expected a non-empty list of prompt strings")
        new = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if new:
            tokens = self.tokenizer(
                new,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
                max_length=min(self.tokenizer.model_max_length, MAX_PROMPT_TOKENS),
            )
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            hidden = torch.cat(
                [
                    self.text_encoder(ids[rows], attention_mask=mask[rows] if use_mask else None)[0]
                    for rows in self.chunks(len(ids))
                ]
            )
            encoded = {p: h[None].to(self.dtype) for p, h in zip(new, hidden)}
            if not cache:
                return torch.cat([encoded.get(p, self._prompt_cache.get(p)) for p in prompts])
            self._prompt_cache.update(encoded)
        return torch.cat([self._prompt_cache[p] for p in prompts])

    # ------------------------------------------------------------------ diffusion

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process z_t = √ᾱ_t z + √(1−ᾱ_t) ε (differentiable in `latents`)."""
        return self.scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float = 1.0,
        uncond_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's ε̂(z_t; prompt, t), with classifier-free guidance when `guidance_scale` > 1.

        Always returns ε, converting v- or x₀-prediction models (SD 2.x 768 is v-prediction) so that the LD loss
        means the same thing for every model. Differentiable in `noisy_latents` when it requires grad.
        """
        needs_grad = noisy_latents.requires_grad or prompt_embeds.requires_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            z = noisy_latents.to(self.device, self.dtype)
            t = torch.as_tensor(timesteps, device=self.device).reshape(-1).expand(z.shape[0])
            cond = prompt_embeds.to(self.device, self.dtype)
            guided = guidance_scale > 1
            if guided:
                uncond = self.encode_prompts([""]) if uncond_embeds is None else uncond_embeds
                uncond = uncond.to(self.device, self.dtype).expand_as(cond)
            outs = []
            for rows in self.chunks(len(z), guidance_scale=guidance_scale):
                zr, tr, cr = z[rows], t[rows], cond[rows]
                if guided:
                    out_uncond, out_cond = self.unet(
                        torch.cat([zr, zr]), torch.cat([tr, tr]), torch.cat([uncond[rows], cr])
                    ).sample.chunk(2)
                    outs.append(out_uncond + guidance_scale * (out_cond - out_uncond))
                else:
                    outs.append(self.unet(zr, tr, cr).sample)
            return self._as_epsilon(torch.cat(outs), z, t)

    def _as_epsilon(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the UNet output to ε according to the scheduler's `prediction_type`."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        a = self.alphas_cumprod[t].to(z.dtype).view(-1, 1, 1, 1)
        if kind == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * z
        if kind == "sample":
            return (z - a.sqrt() * out) / (1 - a).sqrt()
        raise UserError(f"unsupported scheduler prediction_type '{kind}' (expected epsilon, v_prediction or sample)")

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def img2img(
        self,
        images: torch.Tensor | None,
        prompts: list[str] | None = None,
        strength: float = 0.5,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int | list[int] | None = 0,
        batch_size: int = 64,
        prompt_embeds: torch.Tensor | None = None,
        output: str = "images",
        latents: torch.Tensor | None = None,
        convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SDEdit: noise each image's latent to `strength`, denoise with DDIM towards its prompt.

        Runs diffusers' `StableDiffusionImg2ImgPipeline`, fed with our posterior-mean latents, so strength → 0
        converges to `decode(encode(images))`. As in diffusers, only int(num_inference_steps · strength) steps run;
        when that is 0 the result is exactly `decode(encode(images))`. Image i uses a generator seeded `seed + i`
        (or `seed[i]` for a list of seeds), so results do not depend on `batch_size` (capped so that a UNet call
        stays within `max_batch` rows). Conditioning is one prompt per image, or `prompt_embeds` (B, L, D)
        for prompts no string spells (CDGA's interpolations between domain descriptions). `output="latents"` returns
        the scaled latents instead of [0, 1] images, and `latents` (already encoded, instead of `images`) lets a
        caller that needs the source latents anyway encode each image once (online augmentation works in latent
        space). `convert` maps each batch's decoded images as they come, so a caller that keeps them smaller (uint8 at
        the dataset's size) never holds the whole set at the LDM's resolution.
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"img2img strength must be in [0, 1], got {strength}")
        if output not in ("images", "latents"):
            raise ValueError(f"img2img output must be 'images' or 'latents', got {output!r}")
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("img2img needs either prompts or prompt_embeds (exactly one of them)")
        if (images is None) == (latents is None):
            raise ValueError("img2img needs either images or latents (exactly one of them)")
        n = len(images) if images is not None else len(latents)
        n_cond = len(prompts) if prompts is not None else len(prompt_embeds)
        if n_cond != n:
            raise ValueError(f"img2img needs one prompt per image, got {n_cond} prompts for {n} images")
        if isinstance(seed, list) and len(seed) != n:
            raise ValueError(f"img2img needs one seed per image, got {len(seed)} seeds for {n} images")
        if images is not None:
            self.check_images(images)
        batch_size = min(batch_size, self.batch_limit(guidance_scale))
        pipe = self._pipeline(StableDiffusionImg2ImgPipeline)
        out = []
        for start in range(0, n, batch_size):
            stop = start + batch_size
            z = (
                self.encode(images[start:stop])
                if images is not None
                else latents[start:stop].to(self.device, self.dtype)
            )
            if int(num_inference_steps * strength) > 0:
                embeds = self.encode_prompts(prompts[start:stop]) if prompts is not None else prompt_embeds[start:stop]
                z = pipe(
                    image=z,
                    strength=strength,
                    num_inference_steps=num_inference_steps,
                    **self._pipeline_args(embeds.to(self.device, self.dtype), start, guidance_scale, seed),
                )[0]
            out.append(z if output == "latents" else convert(self.decode(z)) if convert else self.decode(z))
        return torch.cat(out)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Text-to-image with diffusers' `StableDiffusionPipeline` (DDIM): images in [0, 1], image i seeded seed + i."""
        if not prompts:
            raise ValueError("sample needs a non-empty list of prompts")
        batch_size = min(batch_size, self.batch_limit(guidance_scale))
        pipe = self._pipeline(StableDiffusionPipeline)
        out = []
        for start in range(0, len(prompts), batch_size):
            latents = pipe(
                height=self.image_size,
                width=self.image_size,
                num_inference_steps=num_inference_steps,
                **self._pipeline_args(
                    self.encode_prompts(prompts[start : start + batch_size]), start, guidance_scale, seed
                ),
            )[0]
            out.append(self.decode(latents))
        return torch.cat(out)

    def _pipeline_args(
        self, embeds: torch.Tensor, offset: int, guidance_scale: float, seed: int | list[int] | None
    ) -> dict:
        """Arguments shared by both pipelines: precomputed embeddings (no tokenizer round trip, cache reused),
        per-image generators (image offset + i seeded `seed + offset + i`, or `seed[offset + i]`), and latent output
        (decoded by `decode`, so both paths share one decoder)."""
        uncond = self.encode_prompts([""]).expand_as(embeds) if guidance_scale > 1 else None
        seeds = (
            seed[offset : offset + len(embeds)]
            if isinstance(seed, list)
            else None
            if seed is None
            else [seed + offset + i for i in range(len(embeds))]
        )
        generators = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        return dict(
            prompt_embeds=embeds,
            negative_prompt_embeds=uncond,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )

    def _pipeline(self, pipeline_class: type) -> DiffusionPipeline:
        """Build (once) a diffusers pipeline sharing this model's modules, with its own DDIM scheduler."""
        if pipeline_class not in self._pipelines:
            pipe = pipeline_class(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=DDIMScheduler.from_config(self.scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[pipeline_class] = pipe
        return self._pipelines[pipeline_class]


def _is_hub_id(text: str) -> bool:
    """Whether a string that is no local folder should be looked up on the Hugging Face Hub: 'org/name', unless it
    looks like a path ('./m', '~/m', 'a/b/c', 'm.ckpt', or 'runs/m' where runs/ is a local folder). A mistyped path
    then fails at once, instead of after the hub client's retries (30 s offline)."""
    return (
        bool(HUB_ID.match(text)) and not text.lower().endswith(FILE_SUFFIXES) and not Path(text.split("/")[0]).is_dir()
    )


def _declared(index: dict, name: str) -> bool:
    """Whether model_index.json declares component `name` as a [library, class] pair."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and all(entry)


def _read_local_index(path: Path) -> dict:
    """Read and validate a local folder's model_index.json, naming everything that is missing."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(
            f"'{path}' is not a diffusers latent diffusion model folder: model_index.json is missing "
            f"(expected model_index.json and {', '.join(c + '/' for c in COMPONENTS)})"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{index_file}' is not valid JSON: {e}") from e
    missing = [f"{c}/" for c in COMPONENTS if not (_declared(index, c) and (path / c).is_dir())]
    if missing:
        raise UserError(
            f"'{path}' is not a complete diffusers latent diffusion model folder: missing "
            f"{', '.join(missing)} (a Stable-Diffusion-style folder has model_index.json and "
            f"{', '.join(c + '/' for c in COMPONENTS)})"
        )
    return index


def _read_style_vocabulary(path: Path) -> list[str] | None:
    """A folder's optional style vocabulary: a JSON list of non-empty strings, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        vocabulary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON: {e}; it must be a list of style phrases, or be removed") from e
    if not (isinstance(vocabulary, list) and vocabulary and all(isinstance(v, str) and v.strip() for v in vocabulary)):
        raise UserError(f"'{path}' must be a non-empty JSON list of style phrases, e.g. [\"a watercolor painting\"]")
    return vocabulary


# What a model folder's model_index.json may name per component: the library, the base class the named class must
# derive from, and an example for the error message. A folder is data: it must never make us import a module of its
# choosing (a same-named .py in the working directory would run) or build an arbitrary class.
ALLOWED_COMPONENTS = {
    "vae": ("diffusers", "ModelMixin", "AutoencoderKL"),
    "unet": ("diffusers", "ModelMixin", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "SchedulerMixin", "DDPMScheduler"),
    "text_encoder": ("transformers", "PreTrainedModel", "CLIPTextModel"),
    "tokenizer": ("transformers", "PreTrainedTokenizerBase", "CLIPTokenizer"),
}


def _load_component(path_or_id: str, name: str, entry: list[str]):
    """Load one component with the class model_index.json names for it, if that class is an allowed one."""
    library, class_name = entry
    allowed_library, base_name, example = ALLOWED_COMPONENTS[name]
    module = importlib.import_module(allowed_library)
    component_class = getattr(module, class_name, None) if library == allowed_library else None
    if not (isinstance(component_class, type) and issubclass(component_class, getattr(module, base_name))):
        raise UserError(
            f"model_index.json declares {name} as {library}.{class_name}; a {name} must be a "
            f"{allowed_library} {base_name} class (e.g. {example})"
        )
    try:
        return component_class.from_pretrained(path_or_id, subfolder=name)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {name}/ of '{path_or_id}' as {class_name}: {e}") from e
