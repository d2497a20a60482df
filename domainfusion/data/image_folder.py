"""DomainBed-layout image folders: `ROOT/<domain>/<class>/<image>`, environments = sorted domain folders.

Differences from DomainBed, all deliberate:
- class indices come from the sorted union of class folders over all domains, so a class means the same index in
  every domain (DomainBed indexes each domain separately and silently mislabels when a class is missing);
- a domain missing a class is an error unless `allow_missing_classes` (PACS-mini and VLCS-mini need it);
- hidden entries (`.ipynb_checkpoints`, `.DS_Store`, macOS `._x.jpg`) are never data, and symlinked folders below
  a domain folder are refused (torchvision follows them: a link loop repeats images across the in/out splits, a
  link to a parent folder mislabels them); symlinked image files are read;
- 16-bit greyscale is scaled to 8 bit and transparency is composited on white (PIL's `convert("RGB")` clips the
  first to white and drops the second, keeping whatever colour hides under transparent pixels);
- images are returned in [0, 1]; ImageNet normalisation is the first layer of the ResNet featurizer, so the
  numbers the network sees are DomainBed's while the diffusion layer still gets real pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from .base import MultipleDomainDataset

# Why a file cannot be decoded (UnidentifiedImageError is an OSError; an image over twice PIL's MAX_IMAGE_PIXELS
# raises DecompressionBombError, which is not).
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")  # PNG greyscale of 16 bits opens as I;16 (older Pillow: I)
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
BACKGROUND = 255  # white: the page viewers and browsers show behind transparent pixels
MAX_LISTED = 5


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: 16-bit values scaled by 255/65535, transparency over `BACKGROUND`."""
    if im.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) * (255 / 65535)
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255
        return Image.fromarray(np.rint(rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8))
    return im.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode one image as RGB (see `to_rgb`); a broken file becomes a UserError that names it."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except _UNREADABLE as e:
        raise UserError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


class _DomainFolder(Dataset):
    """One domain's (image, label) samples; labels use the dataset-wide class → index mapping."""

    def __init__(self, root: str, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.root = root
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(load_image(path)), target


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _class_images(folder: str, links: list[str]) -> list[str]:
    """Image paths below one class folder in torchvision's order (sorted folder paths, then sorted names), so the
    in/out splits are DomainBed's. Hidden folders are pruned; symlinked folders go to `links` and are not entered."""
    found = []
    for dirpath, dirs, files in os.walk(folder):  # followlinks=False
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        links += [os.path.join(dirpath, d) for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        found += [(dirpath, f) for f in files if _is_image(f)]
    return [os.path.join(d, f) for d, f in sorted(found)]


def scan_layout(root: Path, allow_missing_classes: bool) -> dict[str, dict[str, list[str]]]:
    """Validate the layout before any compute; return domain → class → image paths, domains and classes sorted.

    Domain folders may be symlinks (they name a whole domain and are entered once); below them symlinked folders
    are refused, because following them repeats or mislabels images without a trace.
    """
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data-dir pointing at the folder that holds it")
    domains = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith((".", "_")))
    if not domains:
        raise UserError(f"data folder {root} has no domain sub-folders (expected {root}/<domain>/<class>/<image>)")
    layout: dict[str, dict[str, list[str]]] = {}
    links: list[str] = []
    for domain in domains:
        layout[domain] = {}
        for c in sorted(os.scandir(root / domain), key=lambda e: e.name):
            if c.name.startswith(".") or not c.is_dir():
                continue
            if c.is_symlink():
                links.append(c.path)
            elif images := _class_images(c.path, links):
                layout[domain][c.name] = images
    if links:
        more = f" (and {len(links) - MAX_LISTED} more)" if len(links) > MAX_LISTED else ""
        raise UserError(
            f"symlinked folder(s) in {root}: {', '.join(links[:MAX_LISTED])}{more}. Folders below a domain folder "
            f"must be real folders (a link loop would repeat images across the in/out splits, a link to a parent "
            f"would mislabel them): remove the links or copy what they point to; symlinked image files are fine."
        )
    for domain, classes in layout.items():
        if not classes:
            raise UserError(f"domain folder {root / domain} holds no images in class sub-folders")
    all_classes = layout_classes(layout)
    if len(all_classes) < 2:
        raise UserError(
            f"data folder {root} has one class folder ({all_classes[0]}) in all its domains: a classifier needs at "
            f"least 2 classes (expected {root}/<domain>/<class>/<image>)"
        )
    missing = {d: sorted(set(all_classes) - set(c)) for d, c in layout.items() if set(all_classes) - set(c)}
    if missing and not allow_missing_classes:
        details = "; ".join(f"{d} lacks {m}" for d, m in missing.items())
        raise UserError(
            f"class folders differ across domains in {root}: {details}. Fix the folders (class names must match "
            f"exactly across domains) or pass --allow-missing-classes to train on the union of classes."
        )
    return layout


def layout_classes(layout: dict[str, dict[str, list[str]]]) -> list[str]:
    """The sorted union of class names over domains: one index per class name in every domain."""
    return sorted(set().union(*layout.values()))


def scan_domains(root: Path, allow_missing_classes: bool) -> tuple[list[str], list[str]]:
    """(sorted domains, sorted union of classes) of a validated layout (see `scan_layout`)."""
    layout = scan_layout(root, allow_missing_classes)
    return list(layout), layout_classes(layout)


# How much of a JPEG's end may follow its end-of-image marker (some writers pad with zeros or append metadata).
_JPEG_TAIL = 4096


def image_problem(path: str) -> str | None:
    """Why an image cannot be used (None when it can), found before training without decoding every pixel.

    The header must parse and the image must stay under PIL's decompression-bomb limit. Truncation, the usual
    damage (an interrupted download or copy), is caught per format: PNG chunks are CRC-checked to the end
    (`verify`), a JPEG without its end-of-image marker is decoded to confirm, and any other format is decoded in
    full. Damage inside a complete JPEG is only found when the training loader decodes it; that error names the
    file too.
    """
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            elif im.format != "JPEG":
                im.load()
            elif not _jpeg_ends_with_eoi(path):
                im.load()
    except _UNREADABLE as e:
        return str(e) or type(e).__name__
    return None


def _jpeg_ends_with_eoi(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _JPEG_TAIL))
        return b"\xff\xd9" in f.read()


def find_bad_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) for every unusable image in `paths`."""
    return [(p, why) for p in paths if (why := image_problem(p)) is not None]


def bad_images_error(bad: Sequence[tuple[str, str]]) -> UserError:
    listed = "; ".join(f"{path}: {why}" for path, why in bad[:MAX_LISTED])
    more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    return UserError(
        f"cannot read {len(bad)} image(s): {listed}{more}. Remove or replace them, or pass --skip-bad-images to "
        f"train without them (they are counted in results.jsonl and listed in OUTPUT_DIR/skipped_images.txt)."
    )


def domainbed_transforms(size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """DomainBed's eval and train-augmentation transforms, minus the final Normalize (see module docstring)."""
    plain = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.7, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            transforms.ToTensor(),
        ]
    )
    return plain, augment


class MultipleEnvironmentImageFolder(MultipleDomainDataset):
    CHECKPOINT_FREQ = 300
    SUBDIR: str = ""
    IMAGE_SIZE = 224

    def __init__(
        self,
        root: str | Path,
        test_envs: Sequence[int],
        hparams: dict,
        allow_missing_classes: bool = False,
        image_size: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        size = image_size or self.IMAGE_SIZE
        folder = Path(root) / self.SUBDIR if self.SUBDIR else Path(root)
        layout = scan_layout(folder, allow_missing_classes)
        domains, classes = list(layout), layout_classes(layout)
        index = {c: i for i, c in enumerate(classes)}
        if self.ENVIRONMENTS and len(self.ENVIRONMENTS) != len(domains):
            raise UserError(
                f"{type(self).__name__} expects {len(self.ENVIRONMENTS)} domain folders in {folder}, found "
                f"{len(domains)}: {domains}"
            )
        plain, augment = domainbed_transforms(size)
        all_bad: list[tuple[str, str]] = []
        for i, domain in enumerate(domains):
            use_aug = hparams.get("data_augmentation", True) and i not in test_envs
            samples = [(p, index[c]) for c, paths in layout[domain].items() for p in paths]
            ds = _DomainFolder(str(folder / domain), samples, augment if use_aug else plain)
            bad = find_bad_images([p for p, _ in ds.samples])
            if bad and skip_bad_images:
                _drop(ds, {p for p, _ in bad})
            all_bad += bad
            self.datasets.append(ds)
        if all_bad and not skip_bad_images:
            raise bad_images_error(all_bad)
        self.skipped_images = [p for p, _ in all_bad]
        self.environments = domains
        self.class_names = classes
        self.num_classes = len(classes)
        self.input_shape = (3, size, size)


def _drop(ds: _DomainFolder, paths: set[str]) -> None:
    """Remove samples before any split is drawn, so the splits are a deterministic function of the good images."""
    ds.samples = [s for s in ds.samples if s[0] not in paths]
    ds.targets = [t for _, t in ds.samples]
    if not ds.samples:
        raise UserError(f"every image in {ds.root} is unreadable")


class ImageFolderDataset(MultipleEnvironmentImageFolder):
    """Any DomainBed-layout folder given directly as --data-dir."""


class PACS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "S")
    SUBDIR = "PACS"
    DOMAIN_DESCRIPTIONS = {
        "art_painting": "an art painting",
        "cartoon": "a cartoon",
        "photo": "a photo",
        "sketch": "a sketch",
    }


class VLCS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("C", "L", "S", "V")
    SUBDIR = "VLCS"


class OfficeHome(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "R")
    SUBDIR = "office_home"
    DOMAIN_DESCRIPTIONS = {
        "Art": "an artistic image",
        "Clipart": "a clipart image",
        "Product": "a product photo",
        "Real World": "a photo",
        "Real_World": "a photo",
    }


class TerraIncognita(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("L100", "L38", "L43", "L46")
    SUBDIR = "terra_incognita"


class DomainNet(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("clip", "info", "paint", "quick", "real", "sketch")
    SUBDIR = "domain_net"
    CHECKPOINT_FREQ = 1000
    BATCH_SEARCH_MAX_LOG2 = 5.0
    DOMAIN_DESCRIPTIONS = {
        "clipart": "a clipart image",
        "infograph": "an infographic",
        "painting": "a painting",
        "quickdraw": "a quick drawing",
        "real": "a photo",
        "sketch": "a sketch",
    }
