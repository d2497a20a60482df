"""The DomainFusion method on tiny random LDMs: latent-distillation gradients (exact and finite differences), AdaIN
style/content algebra and selection, pool refresh bookkeeping, and a frozen LDM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from domainfusion import hparams as registry
from domainfusion.ldm import LatentDiffusion
from domainfusion.ldm.adapt import from_ldm_images, to_ldm_images
from domainfusion.method import style_content as sc
from domainfusion.method.latent_distillation import LatentDistillation, LDSettings
from domainfusion.method.online_augmentation import AugSettings, OnlineAugmentation, SyntheticPool, subset_chunks
from tiny_ldm import save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
DEFAULTS = registry.default_hparams("DomainFusion", "DigitsDG")
PROMPTS = ["a photo of a dog", "a photo of a cat", "a sketch of a house"]


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory) -> Path:
    return save_tiny_ldm(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ldm(ldm_folder: Path) -> LatentDiffusion:
    return LatentDiffusion.from_pretrained(ldm_folder, device="cpu")


def ld_settings(**changes) -> LDSettings:
    """The registry's default LD settings, with `changes`."""
    return dataclasses.replace(LDSettings.from_hparams(DEFAULTS), **changes)


def batch(n: int = 4, channels: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.randint(len(PROMPTS), (n,), generator=g)


# ------------------------------------------------------------------------------------------- latent distillation


def test_sds_gradient_wrt_latent_is_weighted_noise_residual(ldm: LatentDiffusion) -> None:
    x, y = batch(4)
    logits = torch.randn(4, len(PROMPTS), requires_grad=True)
    ld = LatentDistillation(ldm, PROMPTS, ld_settings())
    out = ld(logits, x, y, torch.Generator().manual_seed(7))
    (grad_z,) = torch.autograd.grad(out.loss, out.latents, retain_graph=True)
    # Replay the same draws: t first, then ε, from the same seed.
    g = torch.Generator().manual_seed(7)
    t = torch.randint(ld.t_range[0], ld.t_range[1] + 1, (4,), generator=g)
    noise = torch.randn(out.latents.shape, generator=g)
    assert torch.equal(t, out.timesteps)
    with torch.no_grad():
        eps_hat = ldm.predict_noise(ldm.add_noise(out.latents, noise, t), t, ldm.encode_prompts([PROMPTS[i] for i in y]))
    w = (1 - ldm.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad_z, w * (eps_hat - noise) / 4, rtol=0, atol=0)
    # The loss value is ½‖g‖²/B, and the gradient reaches the logits only through the true-class confidence.
    torch.testing.assert_close(out.loss, 0.5 * (w * (eps_hat - noise)).pow(2).sum() / 4)
    (grad_logits,) = torch.autograd.grad(out.loss, logits)
    assert grad_logits.abs().sum() > 0
    torch.testing.assert_close(grad_logits.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)  # softmax Jacobian


def test_sds_loss_and_gradient_vanish_when_the_unet_predicts_the_noise(ldm: LatentDiffusion, monkeypatch) -> None:
    drawn = {}
    add_noise = ldm.add_noise

    def recording_add_noise(z, noise, t):
        drawn["noise"] = noise
        return add_noise(z, noise, t)

    monkeypatch.setattr(ldm, "add_noise", recording_add_noise)
    monkeypatch.setattr(ldm, "predict_noise", lambda z_t, t, embeds, guidance=1.0: drawn["noise"].clone())
    x, y = batch(3)
    logits = torch.randn(3, len(PROMPTS), requires_grad=True)
    out = LatentDistillation(ldm, PROMPTS, ld_settings())(logits, x, y, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_uncond_reference_gradient_is_the_class_score_difference(ldm: LatentDiffusion) -> None:
    x, y = batch(4)
    logits = torch.randn(4, len(PROMPTS), requires_grad=True)
    ld = LatentDistillation(ldm, PROMPTS, ld_settings(reference="uncond"))
    out = ld(logits, x, y, torch.Generator().manual_seed(7))
    (grad_z,) = torch.autograd.grad(out.loss, out.latents)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(ld.t_range[0], ld.t_range[1] + 1, (4,), generator=g)
    noise = torch.randn(out.latents.shape, generator=g)
    with torch.no_grad():
        z_t = ldm.add_noise(out.latents, noise, t)
        eps_y = ldm.predict_noise(z_t, t, ldm.encode_prompts([PROMPTS[i] for i in y]))
        eps_uncond = ldm.predict_noise(z_t, t, ldm.encode_prompts([""] * 4))
    w = (1 - ldm.alphas_cumprod[t]).view(-1, 1, 1, 1)
    # The drawn noise cancels: only the prompt's effect on the prediction is distilled.
    torch.testing.assert_close(grad_z, w * (eps_y - eps_uncond) / 4, rtol=1e-5, atol=1e-7)
    assert (eps_y - eps_uncond).abs().max() > 1e-3  # the tiny UNet does read the prompt


def test_uncond_reference_vanishes_when_the_prompt_is_the_empty_one(ldm: LatentDiffusion) -> None:
    x, _ = batch(3)
    logits = torch.randn(3, 2, requires_grad=True)
    out = LatentDistillation(ldm, ["", "a photo of a dog"], ld_settings(reference="uncond"))(
        logits, x, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("reference", ["noise", "uncond"])
def test_full_gradient_matches_finite_differences(ldm_folder: Path, reference: str) -> None:
    ldm64 = LatentDiffusion.from_pretrained(ldm_folder, device="cpu", dtype=torch.float64)
    ld = LatentDistillation(ldm64, PROMPTS, ld_settings(grad="full", t_min=0.3, t_max=0.6, reference=reference))
    x, y = batch(2)
    x = x.double()

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return ld(logits, x, y, torch.Generator().manual_seed(3)).loss

    logits = torch.randn(2, len(PROMPTS), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (logits,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_confidence_darkens_the_image_fed_to_the_vae(ldm: LatentDiffusion, monkeypatch) -> None:
    seen = {}
    encode = ldm.encode
    monkeypatch.setattr(ldm, "encode", lambda images: seen.setdefault("x", images) is not None and encode(images))
    x, y = batch(2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = LatentDistillation(ldm, PROMPTS, ld_settings())(logits, x, torch.tensor([0, 1]), torch.Generator())
    expected_c = torch.tensor([torch.e ** 2 / (torch.e ** 2 + 2), 1 / 3])
    torch.testing.assert_close(out.confidence, expected_c)
    torch.testing.assert_close(seen["x"], expected_c.view(-1, 1, 1, 1) * x)


# ------------------------------------------------------------------------------------------- style and content


def test_adain_of_own_style_and_content_reconstructs() -> None:
    z = torch.randn(3, 4, 8, 8) * 3 + 1
    mean, std = sc.style(z)
    torch.testing.assert_close(sc.adain(sc.content(z), mean, std), z, atol=1e-5, rtol=1e-5)
    c = sc.content(z)
    torch.testing.assert_close(c.mean(dim=(2, 3)), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.std(dim=(2, 3), unbiased=False), torch.ones(3, 4), atol=1e-4, rtol=0)


def test_selection_picks_most_different_style_and_most_similar_content() -> None:
    g = torch.Generator().manual_seed(0)
    source = torch.randn(2, 4, 8, 8, generator=g)
    base = sc.content(source)
    noise = torch.randn(2, 3, 4, 8, 8, generator=g)
    # Candidate k: content = source content + noise of size k-dependent; style = shifted by a k-dependent amount.
    content_noise = torch.tensor([[2.0, 0.1, 1.0], [1.0, 3.0, 0.05]]).view(2, 3, 1, 1, 1)
    style_shift = torch.tensor([[0.5, 1.0, 4.0], [6.0, 0.2, 1.0]]).view(2, 3, 1, 1, 1)
    candidates = (base[:, None] + content_noise * noise) * (1 + style_shift) + style_shift
    style_pick, content_pick = sc.select_style_content(source, candidates)
    assert style_pick.tolist() == [2, 0]
    assert content_pick.tolist() == [1, 2]
    new = sc.recombine(candidates, style_pick, content_pick)
    mean, std = sc.style(new)
    exp_mean, exp_std = sc.style(candidates[torch.arange(2), style_pick])
    torch.testing.assert_close(mean, exp_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, exp_std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.content(new), sc.content(candidates[torch.arange(2), content_pick]),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("channels,size", [(1, 28), (2, 28), (3, 32), (3, 64)])
def test_dataset_ldm_image_maps(channels: int, size: int) -> None:
    x, _ = batch(2, channels, size)
    rgb = to_ldm_images(x, 32)
    assert rgb.shape == (2, 3, 32, 32)
    back = from_ldm_images(rgb, (channels, size, size))
    assert back.shape == x.shape
    if size == 32:
        torch.testing.assert_close(back, x)
    if channels == 2:
        assert torch.count_nonzero(rgb[:, 2]) == 0


# ------------------------------------------------------------------------------------------- synthetic pool


def tensor_dataset(n: int, channels: int = 1, size: int = 28) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(n)
    return torch.utils.data.TensorDataset(torch.rand(n, channels, size, size, generator=g),
                                          torch.randint(len(PROMPTS), (n,), generator=g))


def test_pool_subset_is_seeded_and_traceable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("domainfusion.method.online_augmentation.SHARD_SIZE", 4)
    sets = [tensor_dataset(10), tensor_dataset(15)]
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks(sets, 0.4, seed=1))
    assert len(pool) == 10 and len(pool.manifest["shards"]) == 3  # 4 + 4 + 2
    images, labels = pool.read(torch.arange(10))
    sources = torch.cat([s for _, _, s in pool.shards()])
    again = torch.cat([s for _, _, s in subset_chunks(sets, 0.4, seed=1)])
    assert torch.equal(sources, again) and len(sources.unique()) == 10
    for i, src in enumerate(sources.tolist()):
        x, y = sets[0][src] if src < 10 else sets[1][src - 10]
        assert torch.equal(images[i], (x * 255).round().to(torch.uint8)) and labels[i] == y


def test_refresh_replaces_every_image_once_keeps_labels_and_counts(tmp_path: Path, ldm: LatentDiffusion,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr("domainfusion.method.online_augmentation.SHARD_SIZE", 4)
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(9)], 1.0, seed=0))
    before_images, before_labels = pool.read(torch.arange(9))
    before_sources = torch.cat([s for _, _, s in pool.shards()])
    settings = dataclasses.replace(AugSettings.from_hparams(DEFAULTS, "style_content"), candidates=3, strength=0.5,
                                   steps=4)
    aug = OnlineAugmentation(ldm, pool, [[p] for p in PROMPTS], (1, 28, 28), settings, seed=0,
                             grid_dir=tmp_path / "grids")
    calls = []
    img2img = ldm.img2img
    monkeypatch.setattr(ldm, "img2img", lambda images, prompts, **kw: calls.append(prompts) or img2img(images, prompts, **kw))
    encode = ldm.encode
    encoded = []
    monkeypatch.setattr(ldm, "encode", lambda x: encoded.append(len(x)) or encode(x))
    assert aug.due(0.0)
    assert aug.refresh() == 27
    assert pool.generated == 27 and pool.refreshes == 1 and len(pool) == 9
    assert sum(len(p) for p in calls) == 27  # N candidates per image, each image once
    assert sum(encoded) == 9  # each pool image is VAE-encoded once, not once per candidate
    after_images, after_labels = pool.read(torch.arange(9))
    assert torch.equal(after_labels, before_labels)
    assert torch.equal(torch.cat([s for _, _, s in pool.shards()]), before_sources)
    assert all(not torch.equal(a, b) for a, b in zip(after_images, before_images))
    prompts_per_image = [p for chunk in calls for p in chunk[::3]]
    assert prompts_per_image == [PROMPTS[int(y)] for y in before_labels]
    assert (tmp_path / "grids" / "refresh-000.png").is_file()
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["gen-000001", "manifest.json"]
    assert not aug.due(0.99) and aug.due(1.0)


def test_style_words_cycle_through_the_styles_by_pool_position(tmp_path: Path, ldm: LatentDiffusion,
                                                                monkeypatch) -> None:
    monkeypatch.setattr("domainfusion.method.online_augmentation.SHARD_SIZE", 4)
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(7)], 1.0, seed=0))
    labels = pool.labels.tolist()
    styles = [[f"{p}, style {k}" for k in range(3)] for p in PROMPTS]
    settings = dataclasses.replace(AugSettings.from_hparams(DEFAULTS, "style_content"), candidates=2, strength=0.5,
                                   steps=4, style_words="source_domains")
    aug = OnlineAugmentation(ldm, pool, styles, (1, 28, 28), settings, seed=0)
    calls = []
    img2img = ldm.img2img
    monkeypatch.setattr(ldm, "img2img", lambda images, prompts, **kw: calls.append(prompts) or img2img(images, prompts, **kw))
    aug.refresh()
    assert [len(c) for c in calls] == [8, 6]  # two shards (4 + 3 images), 2 candidates each
    # Image p's candidate j uses style (p + j) mod 3, also across the shard boundary (p = 4, 5, 6).
    expected = [f"{PROMPTS[labels[p]]}, style {(p + j) % 3}" for p in range(7) for j in range(2)]
    assert [p for c in calls for p in c] == expected
    assert torch.equal(pool.labels, torch.tensor(labels))


def test_pool_sampling_is_seeded(tmp_path: Path) -> None:
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(20, 3, 32)], 1.0, seed=0))
    a = pool.sample(8, torch.Generator().manual_seed(5))
    b = pool.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.float32 and a[0].shape == (8, 3, 32, 32) and 0 <= a[0].min() <= a[0].max() <= 1
