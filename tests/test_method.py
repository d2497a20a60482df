"""The DomainFusion method on tiny random LDMs: latent-distillation gradients (exact and finite differences), AdaIN
style/content algebra and selection, pool refresh bookkeeping, and a frozen LDM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from domainfusion import hparams as registry
from domainfusion.data.image_folder import ImageFolderDataset
from domainfusion.data.pool import SyntheticPool, subset_chunks
from domainfusion.errors import UserError
from domainfusion.images import to_uint8
from domainfusion.ldm import LatentDiffusion
from domainfusion.ldm.adapt import from_ldm_images, to_ldm_images
from domainfusion.method import style_content as sc
from domainfusion.method.latent_distillation import LatentDistillation, LDSettings
from domainfusion.method.online_augmentation import AugSettings, OnlineAugmentation

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


def aug_settings(**changes) -> AugSettings:
    """The registry's default augmentation settings, with `changes`."""
    return dataclasses.replace(AugSettings.from_hparams(DEFAULTS, "style_content"), **changes)


# The paper's reading of the four augmentation knobs (the registry defaults to the v2 bundle).
PAPER_AUG = {"style_space": "latent", "style_words": "none", "strength_spread": 0.0, "refresh_from": "pool"}


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
        eps_hat = ldm.predict_noise(
            ldm.add_noise(out.latents, noise, t), t, ldm.encode_prompts([PROMPTS[i] for i in y])
        )
    w = (1 - ldm.alphas_cumprod[t]).view(-1, 1, 1, 1)
    n = out.latents.numel()  # the loss is a mean over the B·C·h·w latent elements
    torch.testing.assert_close(grad_z, w * (eps_hat - noise) / n, rtol=0, atol=0)
    # The loss value is ½ mean g², and the gradient reaches the logits only through the true-class confidence.
    torch.testing.assert_close(out.loss, 0.5 * (w * (eps_hat - noise)).pow(2).mean())
    (grad_logits,) = torch.autograd.grad(out.loss, logits)
    # Chain rule by hand: ∂L/∂c_b = <∂L/∂z_b, ∂E(c·x_b)/∂c_b> through the VAE, then c = softmax(logits)_y gives
    # ∂c/∂logits = c·(onehot(y) − softmax(logits)). Fails if c were another class's probability, detached, or the
    # image were not darkened by c.
    c = out.confidence.detach().requires_grad_()
    (dl_dc,) = torch.autograd.grad(ldm.encode(c.view(-1, 1, 1, 1) * x), c, grad_outputs=grad_z)
    assert (dl_dc.abs() > 1e-9).all()
    p = logits.detach().softmax(1)
    expected = (dl_dc * c.detach())[:, None] * (torch.nn.functional.one_hot(y, len(PROMPTS)) - p)
    torch.testing.assert_close(grad_logits, expected, rtol=1e-4, atol=1e-10)


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
    torch.testing.assert_close(grad_z, w * (eps_y - eps_uncond) / out.latents.numel(), rtol=1e-5, atol=1e-9)
    assert (eps_y - eps_uncond).abs().max() > 1e-3  # the tiny UNet does read the prompt


def test_uncond_reference_vanishes_when_the_prompt_is_the_empty_one(ldm: LatentDiffusion) -> None:
    x, _ = batch(3)
    logits = torch.randn(3, 2, requires_grad=True)
    out = LatentDistillation(ldm, ["", "a photo of a dog"], ld_settings(reference="uncond"))(
        logits, x, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(0)
    )
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


@pytest.mark.parametrize("reference", ["noise", "uncond"])
def test_full_gradient_in_parts_of_max_batch_equals_one_call(ldm_folder: Path, reference: str) -> None:
    ldm64 = LatentDiffusion.from_pretrained(ldm_folder, device="cpu", dtype=torch.float64)
    ld = LatentDistillation(ldm64, PROMPTS, ld_settings(grad="full", reference=reference))
    x, y = batch(3)
    results = []
    for max_batch in (64, 2):
        ldm64.max_batch, rows = max_batch, []
        hook = ldm64.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        logits = torch.randn(3, len(PROMPTS), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        logits.requires_grad_()
        out = ld(logits, x.double(), y, torch.Generator().manual_seed(3))
        out.loss.backward()
        hook.remove()
        calls = 1 if max_batch == 64 else {"noise": 2, "uncond": 3}[reference]  # 2 + 1 images, or 1 image (2 rows)
        assert max(rows) <= max_batch and len(rows) == calls
        results.append((out.loss.detach(), logits.grad))
    torch.testing.assert_close(results[0], results[1])


def loss_through_the_encoder_graph(
    ld: LatentDistillation, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """L_LD as it was computed before the JVP: z = E(c·x₀) with the VAE encoder's autograd graph kept."""
    ldm = ld.ldm
    c = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    z = ldm.encode(c.view(-1, 1, 1, 1) * to_ldm_images(x, ldm.image_size))
    t = torch.randint(ld.t_range[0], ld.t_range[1] + 1, (len(z),), generator=generator)
    noise = torch.randn(z.shape, generator=generator)
    w, n = ld.weights(t), z.numel()
    if ld.settings.grad == "full":
        eps_hat = ldm.predict_noise(ldm.add_noise(z, noise, t), t, ld.prompt_embeds[y])
        return 0.5 * (w * (eps_hat - noise).pow(2)).sum() / n
    with torch.no_grad():
        g = w * (ldm.predict_noise(ldm.add_noise(z, noise, t), t, ld.prompt_embeds[y]) - noise)
    return ((z - z.detach()) * g).sum() / n + 0.5 * g.pow(2).sum() / n


class Saved:
    """A tensor autograd saved for the backward pass, counted while the graph holds it."""

    live = peak = 0

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.bytes = tensor, tensor.numel() * tensor.element_size()
        Saved.live += self.bytes
        Saved.peak = max(Saved.peak, Saved.live)

    def __del__(self) -> None:
        Saved.live -= self.bytes


def saved_tensor_bytes(fn):
    """(fn(), peak bytes of saved tensors while fn ran, bytes still saved when it returned)."""
    Saved.live = Saved.peak = 0
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        out = fn()
    return out, Saved.peak, Saved.live


@pytest.mark.parametrize("grad", ["sds", "full"])
def test_forward_mode_encode_gives_the_graph_gradient_and_saves_little(ldm: LatentDiffusion, grad: str) -> None:
    """The classifier's parameter gradient of L_LD by the JVP through the encoder equals the one by backpropagating
    through the encoder's graph, while autograd keeps a fraction of the bytes for the backward pass (the encoder's
    activations are never saved; what the step's backward pass meets is ∂z/∂c: "full" backpropagates through the
    UNet inside the call)."""
    x, y = batch(4)
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, len(PROMPTS)))
    ld = LatentDistillation(ldm, PROMPTS, ld_settings(grad=grad))
    grads, peak, held = [], [], []
    for compute in (
        lambda logits: ld(logits, x, y, torch.Generator().manual_seed(5)).loss,
        lambda logits: loss_through_the_encoder_graph(ld, logits, x, y, torch.Generator().manual_seed(5)),
    ):
        logits = classifier(x)
        loss, peak_bytes, held_bytes = saved_tensor_bytes(lambda: compute(logits))
        grads.append(torch.autograd.grad(loss, list(classifier.parameters())))
        peak.append(peak_bytes)
        held.append(held_bytes)
    for jvp, graph in zip(*grads):
        torch.testing.assert_close(jvp, graph, rtol=1e-4, atol=1e-6 * graph.abs().max().item())
    assert grads[0][0].abs().max() > 0
    assert held[0] < held[1] / 20 and peak[0] < (peak[1] / 20 if grad == "sds" else peak[1]), (peak, held)


def test_confidence_darkens_the_image_fed_to_the_vae(ldm: LatentDiffusion, monkeypatch) -> None:
    seen = {}
    encode = ldm.encode
    monkeypatch.setattr(ldm, "encode", lambda images: seen.setdefault("x", images) is not None and encode(images))
    x, y = batch(2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = LatentDistillation(ldm, PROMPTS, ld_settings())(logits, x, torch.tensor([0, 1]), torch.Generator())
    expected_c = torch.tensor([torch.e**2 / (torch.e**2 + 2), 1 / 3])
    torch.testing.assert_close(out.confidence, expected_c)
    torch.testing.assert_close(seen["x"], expected_c.view(-1, 1, 1, 1) * x)


class StubLDM:
    """The parts of LatentDiffusion that latent distillation touches, with a chosen latent side and a UNet whose
    prediction misses the drawn noise by a fixed amount per class prompt (the prompt embedding's value)."""

    device, dtype, num_train_timesteps, image_size = torch.device("cpu"), torch.float64, 1000, 32

    def __init__(self, side: int, miss: list[float]) -> None:
        self.side, self.miss = side, torch.tensor(miss, dtype=torch.float64)
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.miss[: len(prompts)].view(-1, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        grey = torch.nn.functional.interpolate(x.double().mean(1, keepdim=True), size=(self.side, self.side))
        return grey.expand(-1, 4, -1, -1)

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.double() + 0 * z  # the prediction below then misses the noise by the class's amount exactly

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance: float = 1.0
    ) -> torch.Tensor:
        return z_t + embeds.reshape(-1, 1, 1, 1)


def test_ld_is_scale_free_across_latent_sizes() -> None:
    """Equal per-element error on an 8×8×4 and a 64×64×4 latent (embedded vs SD at 512 px) gives equal gradients."""
    x = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1])
    grads = []
    for side in (8, 64):
        ld = LatentDistillation(StubLDM(side, [0.3, 0.3]), ["a", "b"], ld_settings(weighting="uniform"))
        logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
        out = ld(logits, x, y, torch.Generator().manual_seed(0))
        assert out.latents.shape == (2, 4, side, side) and out.unet_evals == 2
        (grad,) = torch.autograd.grad(out.loss, logits)
        grads.append(grad)
        # ½ mean g² with g = 0.3 everywhere; ∂L/∂c_b = mean over b's elements of g · ∂z/∂c = 0.3 · 0.5 / B.
        torch.testing.assert_close(out.loss, torch.tensor(0.5 * 0.09, dtype=torch.float64))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64).softmax(1)
    dc = 0.3 * 0.5 / 2  # ∂L/∂c per image
    expected = torch.stack(
        [dc * c[0, 0] * (torch.tensor([1.0, 0.0]) - c[0]), dc * c[1, 1] * (torch.tensor([0.0, 1.0]) - c[1])]
    )
    torch.testing.assert_close(grads[0], expected.double())


def test_posterior_target_gradient_is_classifier_minus_ldm_posterior() -> None:
    """q = softmax(−e/τ) from per-class denoising errors e_k = miss_k²; ∂KL(q‖p)/∂logits = (p − q) / B."""
    miss = [0.0, 0.1, 0.2]
    ld = LatentDistillation(
        StubLDM(8, miss), ["a", "b", "c"], ld_settings(target="posterior", temperature=0.01, draws=3)
    )
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = ld(
        logits, torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([2, 0]), torch.Generator().manual_seed(0)
    )
    q = torch.tensor([0.0, -1.0, -4.0], dtype=torch.float64).softmax(0).expand(2, 3)  # −(0, .01, .04) / .01
    torch.testing.assert_close(out.posterior.double(), q)
    p = logits.detach().softmax(1)
    torch.testing.assert_close(out.loss, (q * (q.log() - p.log())).sum(1).mean())
    (grad,) = torch.autograd.grad(out.loss, logits)
    torch.testing.assert_close(grad, (p - q) / 2)
    assert out.unet_evals == 2 * 3 * 3  # images × candidate classes × draws


def test_posterior_target_judges_the_top_k_classes_and_always_the_label() -> None:
    ld = LatentDistillation(
        StubLDM(8, [0.0, 0.1, 0.2, 0.3, 0.4]),
        list("abcde"),
        ld_settings(target="posterior", temperature=0.01, draws=1, top_k=2),
    )
    logits = torch.tensor(
        [[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True
    )
    out = ld(
        logits, torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 0]), torch.Generator().manual_seed(0)
    )
    assert out.candidates.tolist() == [[0, 1], [4, 0]]  # image 1's label 0 replaces its second-best class
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.count_nonzero(grad[0, 2:]) == 0 and torch.count_nonzero(grad[1, 1:4]) == 0
    sub = logits.detach().gather(1, out.candidates).softmax(1)
    torch.testing.assert_close(grad.gather(1, out.candidates), (sub - out.posterior.double()) / 2)
    assert out.unet_evals == 2 * 2 * 1


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
    torch.testing.assert_close(
        sc.content(new), sc.content(candidates[torch.arange(2), content_pick]), atol=1e-4, rtol=1e-4
    )


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
    return torch.utils.data.TensorDataset(
        torch.rand(n, channels, size, size, generator=g), torch.randint(len(PROMPTS), (n,), generator=g)
    )


def test_pool_subset_is_seeded_and_traceable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("domainfusion.data.pool.SHARD_SIZE", 4)
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


def test_images_for_the_ldm_are_reproducible_under_random_augmentation(tiny_folder: Path, monkeypatch) -> None:
    """An image folder with DomainBed's training augmentation (random crop, flip, colour jitter, greyscale): two
    passes of `subset_chunks` give identical pixels, whatever the global RNG holds and with or without loader
    workers, and leave the global RNG as they found it; the augmentation is really applied (≠ the plain images)."""
    monkeypatch.setattr("domainfusion.data.pool.SHARD_SIZE", 8)

    def envs(augment: bool) -> list:
        return ImageFolderDataset(tiny_folder, [], {"data_augmentation": augment}, image_size=16).datasets

    def pixels(datasets: list, num_workers: int = 0, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        chunks = list(subset_chunks(datasets, 0.5, seed=3, num_workers=num_workers))
        assert torch.equal(torch.get_rng_state(), state)  # the run's global RNG stream is left alone
        assert [len(images) for images, _, _ in chunks] == [8, 8, 2]  # 18 of 36 images, SHARD_SIZE = 8
        return torch.cat([images for images, _, _ in chunks])

    augmented = envs(True)
    first = pixels(augmented)
    assert torch.equal(pixels(augmented, global_seed=1), first)
    assert torch.equal(pixels(augmented, num_workers=2), first)
    assert not torch.equal(pixels(envs(False)), first)


def test_refresh_replaces_every_image_once_keeps_labels_and_counts(
    tmp_path: Path, ldm: LatentDiffusion, monkeypatch
) -> None:
    monkeypatch.setattr("domainfusion.data.pool.SHARD_SIZE", 4)
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(9)], 1.0, seed=0))
    before_images, before_labels = pool.read(torch.arange(9))
    before_sources = torch.cat([s for _, _, s in pool.shards()])
    settings = aug_settings(candidates=3, strength=0.5, steps=4, **PAPER_AUG)
    aug = OnlineAugmentation(
        ldm, pool, [[p] for p in PROMPTS], (1, 28, 28), settings, seed=0, grid_dir=tmp_path / "grids"
    )
    calls = []
    img2img = ldm.img2img
    monkeypatch.setattr(
        ldm, "img2img", lambda images, prompts, **kw: calls.append(prompts) or img2img(images, prompts, **kw)
    )
    encode = ldm.encode
    encoded = []
    monkeypatch.setattr(ldm, "encode", lambda x: encoded.append(len(x)) or encode(x))
    transformed = []  # (inputs, labels, first position, output) of each transform call
    transform = aug.transform

    def recording_transform(images, labels, first, *args):
        transformed.append((images, labels, first, transform(images, labels, first, *args)))
        return transformed[-1][-1]

    monkeypatch.setattr(aug, "transform", recording_transform)
    assert aug.due(0.0)
    assert aug.refresh() == 27
    assert pool.generated == 27 and pool.refreshes == 1 and len(pool) == 9
    assert sum(len(p) for p in calls) == 27  # N candidates per image, each image once
    assert sum(encoded) == 9  # each pool image is VAE-encoded once, not once per candidate
    after_images, after_labels = pool.read(torch.arange(9))
    assert torch.equal(after_labels, before_labels)
    assert torch.equal(torch.cat([s for _, _, s in pool.shards()]), before_sources)
    # Position p now holds what the refresh made of the image that was at p: the decoded AdaIN mix of the candidates
    # picked by the selection rule (style farthest, content closest to the input's latent), in the dataset's shape.
    # Fails if a refresh kept the input, wrote one candidate, or shuffled positions.
    assert [first for _, _, first, _ in transformed] == [0, 4, 8]
    inputs, input_labels, _, outs = zip(*transformed)
    assert torch.equal(to_uint8(torch.cat(inputs)), before_images)
    assert torch.equal(torch.cat(input_labels), before_labels)
    for x, out in zip(inputs, outs):
        candidates = out.candidates  # (B, N, 4, h, w) the candidate latents made from x
        picks = sc.select_style_content(encode(to_ldm_images(x, ldm.image_size)), candidates)
        assert torch.equal(picks[0], out.style_pick) and torch.equal(picks[1], out.content_pick)
        torch.testing.assert_close(out.results, ldm.decode(sc.recombine(candidates, *picks)))
    assert torch.equal(after_images, to_uint8(from_ldm_images(torch.cat([o.results for o in outs]), (1, 28, 28))))
    assert [len(p) for p in calls] == [4] * 3 + [4] * 3 + [
        1
    ] * 3  # per shard (4 + 4 + 1 images), one call per candidate
    shards = [before_labels[:4], before_labels[4:8], before_labels[8:]]
    assert calls == [[PROMPTS[int(y)] for y in labels] for labels in shards for _ in range(3)]
    assert (tmp_path / "grids" / "refresh-000.png").is_file()
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["gen-000001", "manifest.json"]
    assert not aug.due(0.99) and aug.due(1.0)


def test_style_words_cycle_through_the_styles_by_pool_position(
    tmp_path: Path, ldm: LatentDiffusion, monkeypatch
) -> None:
    monkeypatch.setattr("domainfusion.data.pool.SHARD_SIZE", 4)
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(7)], 1.0, seed=0))
    labels = pool.labels.tolist()
    styles = [[f"{p}, style {k}" for k in range(3)] for p in PROMPTS]
    settings = aug_settings(candidates=2, strength=0.5, steps=4, **{**PAPER_AUG, "style_words": "source_domains"})
    aug = OnlineAugmentation(ldm, pool, styles, (1, 28, 28), settings, seed=0)
    calls = []
    img2img = ldm.img2img
    monkeypatch.setattr(
        ldm, "img2img", lambda images, prompts, **kw: calls.append(prompts) or img2img(images, prompts, **kw)
    )
    aug.refresh()
    assert [len(c) for c in calls] == [4, 4, 3, 3]  # two shards (4 + 3 images), one call per candidate (2)
    # Image p's candidate j uses style (p + j) mod 3, also across the shard boundary (p = 4, 5, 6).
    expected = [
        [f"{PROMPTS[labels[p]]}, style {(p + j) % 3}" for p in shard]
        for shard in (range(4), range(4, 7))
        for j in range(2)
    ]
    assert calls == expected
    calls.clear()
    aug.refresh()  # refresh 1 moves on by N styles: candidate j of image p uses style (p + j + 2) mod 3
    assert calls[0] == [f"{PROMPTS[labels[p]]}, style {(p + 2) % 3}" for p in range(4)]
    assert torch.equal(pool.labels, torch.tensor(labels))


def test_refresh_works_in_parts_of_max_batch_images_with_the_same_pool(tmp_path: Path, ldm_folder: Path) -> None:
    """A refresh transforms a shard in parts of at most max_batch images, so no VAE/UNet call (nor the N decoded
    candidates it holds per image) grows with the shard; the refreshed pool is the one a whole-shard refresh makes."""
    pools, largest = [], []
    for max_batch in (None, 2):
        model = LatentDiffusion.from_pretrained(ldm_folder, device="cpu", max_batch=max_batch)
        rows: list[int] = []
        for module in (model.vae.encoder.conv_in, model.vae.decoder, model.unet):
            module.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
        pool = SyntheticPool.create(tmp_path / f"pool-{max_batch}", subset_chunks([tensor_dataset(7)], 1.0, seed=0))
        settings = aug_settings(candidates=3, steps=4, refresh_from="pool")  # deep-feature selection, guided
        OnlineAugmentation(model, pool, [[p] for p in PROMPTS], (1, 28, 28), settings, seed=0).refresh()
        pools.append(pool.read(torch.arange(7))[0])
        largest.append(max(rows))
    assert largest[1] <= 2 < largest[0]
    assert (pools[0].int() - pools[1].int()).abs().max() <= 1  # equal up to float rounding at the uint8 step


def test_pool_sampling_is_seeded(tmp_path: Path) -> None:
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(20, 3, 32)], 1.0, seed=0))
    a = pool.sample(8, torch.Generator().manual_seed(5))
    b = pool.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.float32 and a[0].shape == (8, 3, 32, 32) and 0 <= a[0].min() <= a[0].max() <= 1


def test_candidate_strengths_spread_evenly_and_clip() -> None:
    assert aug_settings(candidates=4, strength=0.5, strength_spread=0.0).strengths() == [0.5] * 4
    torch.testing.assert_close(
        torch.tensor(aug_settings(candidates=4, strength=0.5, strength_spread=0.3).strengths()),
        torch.tensor([0.2, 0.4, 0.6, 0.8]),
    )
    assert aug_settings(candidates=3, strength=0.9, strength_spread=0.2).strengths() == [0.7, 0.9, 1.0]
    assert aug_settings(candidates=1, strength=0.4, strength_spread=0.2).strengths() == [0.4]


@pytest.mark.parametrize("refresh_from", ["pool", "source"])
def test_refresh_edits_the_pool_image_or_always_the_real_one(
    tmp_path: Path, ldm: LatentDiffusion, monkeypatch, refresh_from: str
) -> None:
    chunks = list(subset_chunks([tensor_dataset(5)], 1.0, seed=0))
    pool = SyntheticPool.create(tmp_path / "pool", chunks)
    origin = SyntheticPool.create(tmp_path / "origin", chunks)
    real = origin.read(torch.arange(5))[0]
    settings = aug_settings(candidates=2, strength=0.6, steps=5, refresh_from=refresh_from, strength_spread=0.2)
    aug = OnlineAugmentation(ldm, pool, [[p] for p in PROMPTS], (1, 28, 28), settings, seed=0, origin=origin)
    seen, strengths = [], []
    transform, img2img = aug.transform, ldm.img2img
    monkeypatch.setattr(aug, "transform", lambda images, *a: seen.append(images.clone()) or transform(images, *a))
    monkeypatch.setattr(ldm, "img2img", lambda *a, **kw: strengths.append(kw["strength"]) or img2img(*a, **kw))
    previous = []
    for _ in range(3):
        previous.append(pool.read(torch.arange(5))[0])
        aug.refresh()
    expected = [real] * 3 if refresh_from == "source" else previous
    for images, inputs in zip(seen, expected):
        assert torch.equal((images * 255).round().to(torch.uint8), inputs)
    assert not torch.equal(pool.read(torch.arange(5))[0], real)
    assert torch.equal(origin.read(torch.arange(5))[0], real)  # the origin is never rewritten
    torch.testing.assert_close(torch.tensor(strengths), torch.tensor([0.4, 0.8] * 3))


def test_style_space_of_vae_features_selects_and_mixes_there(tmp_path: Path, ldm: LatentDiffusion) -> None:
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    pool = SyntheticPool.create(tmp_path / "pool", subset_chunks([tensor_dataset(3)], 1.0, seed=0))
    outs = {}
    for space in ("latent", "vae_features"):
        aug = OnlineAugmentation(
            ldm,
            pool,
            [[p] for p in PROMPTS],
            (1, 28, 28),
            aug_settings(
                candidates=4, strength=0.7, steps=5, style_space=space, refresh_from="pool", strength_spread=0.0
            ),
            seed=0,
        )
        outs[space] = out = aug.transform(x, torch.tensor([0, 1, 2]), first=0, seed=11)
        channels = 4 if space == "latent" else ldm.vae.config.block_out_channels[-1]
        feats = (
            out.candidates.flatten(0, 1)
            if space == "latent"
            else ldm.encode_features(ldm.decode(out.candidates.flatten(0, 1)))
        )
        assert feats.shape[1] == channels
        space_source = (
            ldm.encode(to_ldm_images(x, 32)) if space == "latent" else ldm.encode_features(to_ldm_images(x, 32))
        )
        style_pick, content_pick = sc.select_style_content(space_source, feats.unflatten(0, (3, 4)))
        assert torch.equal(out.style_pick, style_pick) and torch.equal(out.content_pick, content_pick)
        assert (out.stats["style_distance_picked"] >= out.stats["style_distance_mean"]).all()
        assert (out.stats["content_similarity_picked"] >= out.stats["content_similarity_mean"]).all()
        mixed = sc.recombine(feats.unflatten(0, (3, 4)), style_pick, content_pick)
        expected = ldm.decode(mixed if space == "latent" else ldm.latents_from_features(mixed))
        torch.testing.assert_close(out.results, expected)
    # Same seeds, same candidates: the two spaces differ only in where they select and mix.
    torch.testing.assert_close(outs["latent"].candidates, outs["vae_features"].candidates)


def test_encoder_split_into_features_and_the_rest_is_the_encoder(ldm: LatentDiffusion) -> None:
    x, _ = batch(3)
    features = ldm.encode_features(x)
    assert features.shape == (3, ldm.vae.config.block_out_channels[-1], 8, 8)
    torch.testing.assert_close(ldm.latents_from_features(features), ldm.encode(x), rtol=0, atol=0)


def test_style_vocabulary_never_names_a_domain_of_the_dataset() -> None:
    from domainfusion.ldm.adapt import GENERIC_STYLES, style_vocabulary

    pacs = style_vocabulary("PACS", ["art_painting", "cartoon", "photo", "sketch"], None)
    assert {"a photo", "a cartoon"} <= set(GENERIC_STYLES) and not {"a photo", "a cartoon"} & set(pacs)
    assert "a watercolor painting" in pacs and len(pacs) == len(GENERIC_STYLES) - 2
    own = ["printed", "handwritten white on black", "glowing red on blue"]
    assert style_vocabulary("DigitsDG", ["mnist", "mnist_m", "syn", "optdigits"], own) == ["glowing red on blue"]
    with pytest.raises(UserError, match="style_vocabulary.json"):
        style_vocabulary("DigitsDG", ["mnist", "syn"], ["printed"])


def test_model_folder_style_vocabulary_is_read_and_checked(ldm_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(ldm_folder, folder)
    assert LatentDiffusion.from_pretrained(folder, device="cpu").style_vocabulary is None
    (folder / "style_vocabulary.json").write_text('["a watercolor painting", "pixel art"]')
    model = LatentDiffusion.from_pretrained(folder, device="cpu")
    assert model.style_vocabulary == ["a watercolor painting", "pixel art"]
    model.save_pretrained(tmp_path / "saved")
    assert LatentDiffusion.from_pretrained(tmp_path / "saved", device="cpu").style_vocabulary == model.style_vocabulary
    (folder / "style_vocabulary.json").write_text('{"styles": 1}')
    with pytest.raises(UserError, match="style_vocabulary.json.*list of style phrases"):
        LatentDiffusion.from_pretrained(folder, device="cpu")
