"""DomainBed's networks: the MNIST CNN for small images, torchvision ResNet-18/50 for 224 px, linear/MLP heads.

Inputs are images in [0, 1]; the ResNet featurizer applies ImageNet normalisation itself (see data/image_folder.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's IMAGENET1K_V1 files, the weights DomainBed's `pretrained=True` loads.
TORCH_CACHE_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}


class MNIST_CNN(nn.Module):
    """DomainBed's 4-layer conv net with GroupNorm; global average pooling makes it work for 28 or 32 px."""

    n_outputs = 128

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, 64)
        self.bn1 = nn.GroupNorm(8, 128)
        self.bn2 = nn.GroupNorm(8, 128)
        self.bn3 = nn.GroupNorm(8, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(F.relu(self.conv1(x)))
        x = self.bn1(F.relu(self.conv2(x)))
        x = self.bn2(F.relu(self.conv3(x)))
        x = self.bn3(F.relu(self.conv4(x)))
        return self.avgpool(x).flatten(1)


def resolve_pretrained(arch: str, pretrained: str) -> Path:
    """Find ImageNet weights: an explicit file, or 'imagenet' = torchvision's file in the torch hub cache."""
    if pretrained != "imagenet":
        path = Path(pretrained)
        if not path.is_file():
            raise UserError(f"--pretrained {pretrained}: no such file (give a .pth/.safetensors file or 'imagenet')")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_CACHE_FILES[arch]
    if not path.is_file():
        raise UserError(
            f"--pretrained imagenet: no {arch} ImageNet weights at {path}. Download torchvision's "
            f"{TORCH_CACHE_FILES[arch]} there (or pass its path to --pretrained), or train from scratch without "
            f"--pretrained."
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNet(nn.Module):
    """ResNet-18/50 trunk with frozen BatchNorm statistics and dropout on the features (DomainBed's ResNet)."""

    def __init__(self, input_shape: tuple[int, int, int], hparams: dict, pretrained: str | None = None) -> None:
        super().__init__()
        arch = "resnet18" if hparams["resnet18"] else "resnet50"
        self.network = getattr(torchvision.models, arch)(weights=None)
        self.n_outputs = 512 if arch == "resnet18" else 2048
        if not pretrained:
            warnings.warn(
                f"{arch} starts from random weights; DomainBed's numbers use ImageNet weights (--pretrained imagenet)",
                stacklevel=2,
            )
        else:
            state = load_state_dict_file(resolve_pretrained(arch, pretrained))
            missing, unexpected = self.network.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("fc.")] or unexpected:
                raise UserError(f"--pretrained {pretrained} does not hold {arch} weights (missing {missing[:3]}…)")
        if input_shape[0] != 3:
            old = self.network.conv1.weight.data.clone()
            self.network.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
            for i in range(input_shape[0]):
                self.network.conv1.weight.data[:, i] = old[:, i % 3]
        self.network.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout(hparams["resnet_dropout"])
        self.freeze_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = (x - self.mean) / self.std
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        self.freeze_bn()
        return self

    def freeze_bn(self) -> None:
        for m in self.network.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def Featurizer(input_shape: tuple[int, int, int], hparams: dict, pretrained: str | None = None) -> nn.Module:
    """DomainBed's rule: small images (≤ 32 px) → MNIST CNN, otherwise ResNet."""
    if input_shape[1] <= 32 and input_shape[2] <= 32:
        if pretrained:
            raise UserError("--pretrained applies to the ResNet featurizer (224 px images), not the small-image CNN")
        return MNIST_CNN(input_shape)
    return ResNet(input_shape, hparams, pretrained)


def Classifier(in_features: int, out_features: int, is_nonlinear: bool = False) -> nn.Module:
    if is_nonlinear:
        return nn.Sequential(
            nn.Linear(in_features, in_features // 2),
            nn.ReLU(),
            nn.Linear(in_features // 2, in_features // 4),
            nn.ReLU(),
            nn.Linear(in_features // 4, out_features),
        )
    return nn.Linear(in_features, out_features)
