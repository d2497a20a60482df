"""Where a DG dataset meets an LDM: class prompts, and images moved between the classifier's space and the LDM's.

The prompts' wording is declared on each dataset class (`data/base.py`); a name the registry does not know gets the
generic wording.

A classifier sees (B, C, H, W) images in [0, 1] with the dataset's channels (1 for RotatedMNIST, 2 for ColoredMNIST,
3 otherwise) and size; an LDM sees RGB at its own resolution. Both maps are linear in the pixels (channel copy or
selection, bilinear resize), so latent distillation's c·x commutes with them and gradients flow through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..data import dataset_traits
from ..errors import UserError
from ..images import from_rgb, to_rgb, to_uint8

if TYPE_CHECKING:
    from .latent_diffusion import LatentDiffusion


def default_prompt_template(dataset: str) -> str:
    """The class prompt of a dataset ("{cls}" placeholder): the embedded LDM's caption prefix for digits, SD's usual
    wording otherwise."""
    return dataset_traits(dataset).PROMPT_TEMPLATE


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    antialias = x.shape[-1] > size[-1]
    return F.interpolate(x, size=size, mode="bilinear", antialias=antialias, align_corners=False)


def to_ldm_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, h, w) in [0, 1], C in {1, 2, 3} -> (B, 3, resolution, resolution); 1 channel = grey, 2 = red/green."""
    return _resize(to_rgb(x), (resolution, resolution)).clamp(0, 1)


def from_ldm_images(x: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The inverse direction: LDM RGB images -> the dataset's (C, H, W) (grey = channel mean, red/green kept)."""
    channels, height, width = input_shape
    return from_rgb(_resize(x, (height, width)), channels).clamp(0, 1).contiguous()


def encode_dataset_images(ldm: LatentDiffusion, images: torch.Tensor) -> torch.Tensor:
    """The latents of dataset images (uint8, or float in [0, 1]; the dataset's channels and size), converted to the
    LDM's RGB at its resolution one `max_batch` part at a time: only the latents are kept (a 1,024-image chunk at
    512 px is 3.2 GB in fp32)."""

    def ldm_input(x: torch.Tensor) -> torch.Tensor:
        x = x.to(ldm.device)
        return to_ldm_images(x.float().div(255) if x.dtype == torch.uint8 else x.float(), ldm.image_size)

    return torch.cat([ldm.encode(ldm_input(images[part])) for part in ldm.chunks(len(images))])


def img2img_dataset_images(
    ldm: LatentDiffusion, latents: torch.Tensor, input_shape: tuple[int, int, int], **img2img_args
) -> torch.Tensor:
    """uint8 images of the dataset's (C, H, W) by `ldm.img2img` from `latents`, each decoded batch converted as it
    comes (image i seeded seed + i, as in any img2img call)."""
    return ldm.img2img(
        None, latents=latents, convert=lambda x: to_uint8(from_ldm_images(x, input_shape)), **img2img_args
    )


# The LDM may see images at most this many times smaller than the dataset's: beyond it, distillation and
# augmentation would act on thumbnails and the synthetic images would come back as blurred upscales.
MAX_DOWNSCALE = 2.0


def check_resolution(ldm_size: int, input_shape: tuple[int, int, int], ldm_name: str) -> None:
    """Refuse, before any generation, an LDM whose resolution is far below the dataset's images."""
    side = max(input_shape[1:])
    if side > MAX_DOWNSCALE * ldm_size:
        raise UserError(
            f"--ldm {ldm_name} works at {ldm_size}x{ldm_size} px but the images are {input_shape[1]}x{input_shape[2]}: "
            f"they would be shrunk {side / ldm_size:.1f}x before the LDM sees them. Use an LDM trained at "
            f">= {-(-side // int(MAX_DOWNSCALE))} px (e.g. Stable Diffusion), or train at the LDM's size with "
            f"--image-size {ldm_size} (image-folder datasets)."
        )


def domain_prompt(dataset: str, domain: str, cls: str) -> str:
    """A prompt naming both the class and the domain's look, e.g. 'a sketch of a dog' or, for digits,
    'a photo of the digit 3, handwritten inverted on a photo'; undescribed domains are described by their name."""
    traits = dataset_traits(dataset)
    description = traits.DOMAIN_DESCRIPTIONS.get(domain, traits.UNDESCRIBED_DOMAIN.format(domain=domain))
    return traits.DOMAIN_PROMPT_TEMPLATE.format(cls=cls, description=description)


# Common looks for models that ship no style vocabulary (Stable Diffusion): renditions as in ImageNet-R and
# DomainNet's kinds of images, written down before any benchmark ran. Fixed, never derived from a held-out domain.
GENERIC_STYLES = (
    "a photo",
    "a black and white photo",
    "a blurry photo",
    "a close-up photo",
    "a painting",
    "an oil painting",
    "a watercolor painting",
    "a pencil sketch",
    "a charcoal drawing",
    "a line drawing",
    "a cartoon",
    "an anime drawing",
    "a clipart image",
    "a comic",
    "pixel art",
    "a 3d render",
    "a toy",
    "a sculpture",
    "an origami",
    "an embroidery",
    "a tattoo",
    "graffiti",
    "a mosaic",
    "a stained glass window",
    "a quick doodle",
    "an infographic",
)


def style_vocabulary(dataset: str, domains: list[str], model_vocabulary: list[str] | None) -> list[str]:
    """The style phrases online augmentation may prompt with: the model's own vocabulary (or `GENERIC_STYLES`) minus
    any phrase that is the name or the description of one of the dataset's domains, held out or not, so the list
    never names the held-out domain and does not depend on which domain is held out."""
    known = dataset_traits(dataset).DOMAIN_DESCRIPTIONS
    taken = {d.lower() for d in domains} | {known.get(d, "").lower() for d in domains}
    kept = [s for s in (model_vocabulary or GENERIC_STYLES) if s.lower() not in taken]
    if not kept:
        raise UserError(
            "every phrase of the style vocabulary names a domain of the dataset: give the LDM folder a "
            "style_vocabulary.json with other looks, or use aug_style_words=none"
        )
    return kept


def style_prompt(class_prompt: str, style: str) -> str:
    """A class prompt in a given look, in the embedded captions' form: 'a photo of the digit 3, printed black on
    paper', 'a photo of a dog, a watercolor painting'."""
    return f"{class_prompt}, {style}"
