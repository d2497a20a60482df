"""DomainBed-layout image folders: `ROOT/<domain>/<class>/<image>`, environments = sorted domain folders.

Differences from DomainBed, all deliberate:
- class indices come from the sorted union of class folders over all domains, so a class means the same index in
  every domain (DomainBed indexes each domain separately and silently mislabels when a class is missing);
- a domain missing a class is an error unless `allow_missing_classes` (PACS-mini and VLCS-mini need it);
- images are returned in [0, 1]; ImageNet normalisation is the first layer of the ResNet featurizer, so the
  numbers the network sees are DomainBed's while the diffusion layer still gets real pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from .base import MultipleDomainDataset


def load_image(path: str) -> Image.Image:
    """Decode one image as RGB; a broken file becomes a UserError that names it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


class _DomainFolder(ImageFolder):
    """One domain with the dataset-wide class → index mapping."""

    def __init__(self, root: str, classes: list[str], transform) -> None:
        self._classes = classes
        super().__init__(root, transform=transform, loader=load_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_domains(root: Path, allow_missing_classes: bool) -> tuple[list[str], list[str]]:
    """Validate the layout before any compute and return (sorted domains, sorted union of classes)."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data-dir pointing at the folder that holds it")
    domains = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith((".", "_")))
    if not domains:
        raise UserError(f"data folder {root} has no domain sub-folders (expected {root}/<domain>/<class>/<image>)")
    per_domain: dict[str, set[str]] = {}
    for domain in domains:
        classes = set()
        for c in os.scandir(root / domain):
            if c.is_dir() and any(_is_image(f.name) for f in os.scandir(c.path)):
                classes.add(c.name)
        if not classes:
            raise UserError(f"domain folder {root / domain} holds no images in class sub-folders")
        per_domain[domain] = classes
    all_classes = sorted(set().union(*per_domain.values()))
    missing = {d: sorted(set(all_classes) - c) for d, c in per_domain.items() if set(all_classes) - c}
    if missing and not allow_missing_classes:
        details = "; ".join(f"{d} lacks {m}" for d, m in missing.items())
        raise UserError(
            f"class folders differ across domains in {root}: {details}. Fix the folders (class names must match "
            f"exactly across domains) or pass --allow-missing-classes to train on the union of classes."
        )
    return domains, all_classes


# How much of a JPEG's end may follow its end-of-image marker (some writers pad with zeros or append metadata).
_JPEG_TAIL = 4096
MAX_LISTED = 5


def image_problem(path: str) -> str | None:
    """Why an image cannot be used (None when it can), found before training without decoding every pixel.

    The header must parse. Truncation, the usual damage (an interrupted download or copy), is caught per format:
    PNG chunks are CRC-checked to the end (`verify`), a JPEG without its end-of-image marker is decoded to
    confirm, and any other format is decoded in full. Damage inside a complete JPEG is only found when the
    training loader decodes it; that error names the file too.
    """
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            elif im.format != "JPEG":
                im.load()
            elif not _jpeg_ends_with_eoi(path):
                im.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
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
        domains, classes = scan_domains(folder, allow_missing_classes)
        if self.ENVIRONMENTS and len(self.ENVIRONMENTS) != len(domains):
            raise UserError(
                f"{type(self).__name__} expects {len(self.ENVIRONMENTS)} domain folders in {folder}, found "
                f"{len(domains)}: {domains}"
            )
        plain, augment = domainbed_transforms(size)
        all_bad: list[tuple[str, str]] = []
        for i, domain in enumerate(domains):
            use_aug = hparams.get("data_augmentation", True) and i not in test_envs
            ds = _DomainFolder(str(folder / domain), classes, augment if use_aug else plain)
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
    ds.imgs = ds.samples
    ds.targets = [t for _, t in ds.samples]
    if not ds.samples:
        raise UserError(f"every image in {ds.root} is unreadable")


class ImageFolderDataset(MultipleEnvironmentImageFolder):
    """Any DomainBed-layout folder given directly as --data-dir."""


class PACS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "S")
    SUBDIR = "PACS"


class VLCS(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("C", "L", "S", "V")
    SUBDIR = "VLCS"


class OfficeHome(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("A", "C", "P", "R")
    SUBDIR = "office_home"


class TerraIncognita(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("L100", "L38", "L43", "L46")
    SUBDIR = "terra_incognita"


class DomainNet(MultipleEnvironmentImageFolder):
    ENVIRONMENTS = ("clip", "info", "paint", "quick", "real", "sketch")
    SUBDIR = "domain_net"
    CHECKPOINT_FREQ = 1000
