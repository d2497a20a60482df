"""The knowledge probe (zero-shot diffusion classifier): right class on a constructed case, shared draws, pruning,
batching, per-domain results and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from domainfusion.errors import UserError
from domainfusion.ldm import LatentDiffusion
from domainfusion.ldm.probe import ProbeConfig, classify, denoising_errors, probe_dataset, probe_draws

from tiny_ldm import bert_components, images, save_tiny_ldm

PROMPTS = ["a photo of the dog", "a photo of the cat", "a photo of the house"]

pytestmark = pytest.mark.usefixtures("one_thread")


class OracleUNet(torch.nn.Module):
    """A UNet that knows one latent per prompt: under prompt k it predicts the noise that would have produced z_t
    from latent k, so its error is exactly 0 for an image whose latent is k's and grows with the distance otherwise."""

    def __init__(self, config, prompt_embeds: torch.Tensor, latents: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.prompt_embeds, self.latents, self.alphas = prompt_embeds, latents, alphas

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> SimpleNamespace:
        k = (cond[:, None] - self.prompt_embeds[None]).flatten(2).norm(dim=2).argmin(1)
        a = self.alphas[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(z - a.sqrt() * self.latents[k]) / (1 - a).sqrt())


@pytest.fixture
def oracle(tmp_path: Path) -> tuple[LatentDiffusion, torch.Tensor]:
    """(an LDM whose UNet is an `OracleUNet` for PROMPTS, one image per prompt whose latent is that prompt's)."""
    ldm = LatentDiffusion(**bert_components(tmp_path), device="cpu")
    x = images(3, seed=5)
    ldm.unet = OracleUNet(ldm.unet.config, ldm.encode_prompts(PROMPTS), ldm.encode(x), ldm.alphas_cumprod)
    return ldm, x


def test_the_probe_picks_the_prompt_whose_denoising_error_is_lowest(oracle):
    ldm, x = oracle
    config = ProbeConfig(draws=5, t_min=100, t_max=900)
    errors, calls = classify(ldm, x[[2, 0, 1]], PROMPTS, config)
    assert errors.argmin(1).tolist() == [2, 0, 1] and calls == 3 * 3 * 5
    assert errors[[0, 1, 2], [2, 0, 1]].abs().max() < 1e-6  # the true prompt's error is exactly zero
    assert (errors.min(1).values < errors.median(1).values).all()


def test_draws_are_shared_seeded_and_evenly_spaced():
    t, noise = probe_draws(ProbeConfig(draws=5, t_min=100, t_max=900, seed=3), (4, 8, 8), 1000)
    assert t.tolist() == [100, 300, 500, 700, 900] and noise.shape == (5, 4, 8, 8)
    assert torch.equal(noise, probe_draws(ProbeConfig(draws=5, seed=3), (4, 8, 8), 1000)[1])
    assert not torch.equal(noise, probe_draws(ProbeConfig(draws=5, seed=4), (4, 8, 8), 1000)[1])
    with pytest.raises(UserError, match="beyond"):
        probe_draws(ProbeConfig(t_max=1000), (4, 8, 8), 1000)


def test_top_k_pruning_keeps_the_answer_and_spends_fewer_unet_calls(oracle):
    ldm, x = oracle
    full, full_calls = classify(ldm, x, PROMPTS, ProbeConfig(draws=6))
    pruned, pruned_calls = classify(ldm, x, PROMPTS, ProbeConfig(draws=6, top_k=2, prune_after=2))
    assert pruned.argmin(1).tolist() == full.argmin(1).tolist() == [0, 1, 2]
    assert pruned_calls == 3 * 3 * 2 + 3 * 2 * 4 < full_calls == 3 * 3 * 6
    assert torch.isinf(pruned).sum(1).tolist() == [1, 1, 1]
    kept = ~torch.isinf(pruned)
    assert torch.allclose(pruned[kept], full[kept], atol=1e-6)  # kept classes are scored on the same six draws


def test_denoising_errors_do_not_depend_on_the_batch_size(tmp_path):
    ldm = LatentDiffusion(**bert_components(tmp_path), device="cpu")
    latents = ldm.encode(images(1)).repeat(2, 1, 1, 1)  # one image twice, its classes in two orders
    embeds = ldm.encode_prompts(PROMPTS)
    t, noise = probe_draws(ProbeConfig(draws=3), tuple(latents.shape[1:]), 1000)
    candidates = torch.tensor([[0, 1, 2], [2, 1, 0]])
    one = denoising_errors(ldm, latents, embeds, candidates, t, noise, batch_size=1)
    many = denoising_errors(ldm, latents, embeds, candidates, t, noise, batch_size=1000)
    assert one.shape == (2, 3, 3) and torch.allclose(one, many, atol=1e-5)
    assert torch.allclose(one[0], many[1].flip(0), atol=1e-5)  # same class, same draws: same numbers in any slot
    assert not torch.allclose(one[0, 0], one[0, 1])  # and different classes differ


def test_config_is_validated():
    for bad in (dict(draws=0), dict(t_min=500, t_max=100), dict(top_k=2, prune_after=6, draws=6), dict(top_k=0)):
        with pytest.raises(UserError):
            ProbeConfig(**bad)


def test_probe_dataset_reports_each_domain(oracle):
    ldm, x = oracle
    labels = torch.tensor([0, 1, 2])

    class TwoDomains(list):
        """What probe_dataset reads of a MultipleDomainDataset: environments, num_classes, one dataset per env."""

        environments, num_classes = ["a", "b"], 3

    dataset = TwoDomains([TensorDataset(x, labels), TensorDataset(x[[1, 2]], labels[[1, 2]])])
    results = probe_dataset(ldm, dataset, PROMPTS, images_per_domain=10, config=ProbeConfig(draws=4), progress=False)
    assert [r.domain for r in results] == ["a", "b"] and [r.images for r in results] == [3, 2]
    assert [r.accuracy for r in results] == [1.0, 1.0]
    assert results[1].per_class[1:] == [1.0, 1.0] and results[1].per_class[0] != results[1].per_class[0]  # NaN
    assert [r.unet_calls for r in results] == [3 * 3 * 4, 2 * 3 * 4]
    only_b = probe_dataset(ldm, dataset, PROMPTS, 10, ProbeConfig(draws=4), progress=False, domains=["b"])
    assert [r.domain for r in only_b] == ["b"] and only_b[0].per_class[1:] == results[1].per_class[1:]
    with pytest.raises(UserError, match="unknown domain"):
        probe_dataset(ldm, dataset, PROMPTS, 10, ProbeConfig(), progress=False, domains=["c"])
    with pytest.raises(UserError, match="class prompts"):
        probe_dataset(ldm, dataset, PROMPTS[:2], 10, ProbeConfig(), progress=False)


def test_cli_probe_prints_and_writes_every_domain(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from domainfusion.cli import app

    folder = save_tiny_ldm(tmp_path / "m")
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(
        app,
        [
            "ldm",
            "probe",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--model",
            str(folder),
            "--images-per-domain",
            "5",
            "--draws",
            "3",
            "--json-out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert [d["domain"] for d in payload["domains"]] == ["d0", "d1", "d2"]
    assert [d["images"] for d in payload["domains"]] == [5, 5, 5]
    assert all(d["unet_calls"] == 5 * 2 * 3 for d in payload["domains"])  # images x classes x draws
    assert payload["prompts"] == ["a photo of a cat", "a photo of a dog"]
    assert "d1" in res.output and "zero-shot" in res.output
    res = CliRunner().invoke(
        app,
        [
            "ldm",
            "probe",
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--model",
            str(folder),
            "--draws",
            "0",
        ],
    )
    assert res.exit_code != 0 and "draws" in str(res.exception)
