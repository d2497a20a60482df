"""Featurizers: DomainBed's choice by input size, ImageNet normalisation inside ResNet, pretrained loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from domainfusion.errors import UserError
from domainfusion.models import MNIST_CNN, Featurizer, ResNet

HP = {"resnet18": True, "resnet_dropout": 0.0}


def test_small_images_use_the_mnist_cnn():
    f = Featurizer((3, 32, 32), HP)
    assert isinstance(f, MNIST_CNN)
    assert f(torch.rand(5, 3, 32, 32)).shape == (5, 128)
    assert Featurizer((2, 28, 28), HP)(torch.rand(4, 2, 28, 28)).shape == (4, 128)
    assert (
        sum(p.numel() for p in f.parameters())
        == 3 * 64 * 9 + 64 + 64 * 128 * 9 + 2 * 128 * 128 * 9 + 3 * 128 + 2 * 64 + 6 * 128
    )


def test_resnet_normalises_inputs_itself_and_freezes_batchnorm():
    torch.manual_seed(0)
    ours = ResNet((3, 64, 64), HP).eval()
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(
        {**ours.network.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    )
    ref.fc = torch.nn.Identity()
    ref.eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(ours(x), ref((x - mean) / std), atol=1e-5)
    ours.train()
    assert all(not m.training for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_pretrained_from_file_and_clear_error_when_absent(tmp_path: Path, monkeypatch):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = ResNet((3, 64, 64), HP, pretrained=str(path))
    assert torch.equal(loaded.network.conv1.weight, ref.conv1.weight)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError, match="no resnet18 ImageNet weights at .*resnet18-f37072fd.pth"):
        ResNet((3, 64, 64), HP, pretrained="imagenet")
    with pytest.raises(UserError, match="no such file"):
        ResNet((3, 64, 64), HP, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("input_shape", [(3, 32, 32), (3, 64, 64)], ids=["mnist_cnn", "resnet18"])
def test_algorithm_weights_round_trip_through_safetensors(input_shape, tmp_path: Path):
    """Every tensor (BatchNorm counters of the ResNet's aliased submodules included) comes back exactly."""
    from domainfusion.algorithms import algorithm_class
    from domainfusion.utils import load_module, save_module

    hp = {"resnet18": True, "resnet_dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0, "nonlinear_classifier": False}
    torch.manual_seed(0)
    trained = algorithm_class("ERM")(input_shape, 3, 2, hp)
    with torch.no_grad():
        for t in trained.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.fill_(7)
    save_module(trained, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    fresh = algorithm_class("ERM")(input_shape, 3, 2, hp)
    load_module(fresh, tmp_path / "m.safetensors")
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="does not match"):
        load_module(
            algorithm_class("ERM")(input_shape, 3, 2, {**hp, "nonlinear_classifier": True}), tmp_path / "m.safetensors"
        )
