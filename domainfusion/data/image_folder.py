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


def check_images_readable(paths: Sequence[str]) -> None:
    """Open every image header (cheap) so an unreadable file is reported before training starts."""
    for path in paths:
        try:
            with Image.open(path) as im:
                im.size
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


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
        for i, domain in enumerate(domains):
            use_aug = hparams.get("data_augmentation", True) and i not in test_envs
            ds = _DomainFolder(str(folder / domain), classes, augment if use_aug else plain)
            check_images_readable([p for p, _ in ds.samples])
            self.datasets.append(ds)
        self.environments = domains
        self.class_names = classes
        self.num_classes = len(classes)
        self.input_shape = (3, size, size)


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
