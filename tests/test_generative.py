"""DomainFusion, its ablations and CDGA as algorithms: end to end through `train` on a PACS-layout folder with a tiny
Stable-Diffusion-shaped LDM, a frozen LDM, generated-image counting, and CDGA's prompt interpolation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from domainfusion import hparams as registry
from domainfusion.algorithms import RunContext, algorithm_class
from domainfusion.algorithms.erm import ERM
from domainfusion.errors import UserError
from domainfusion.ldm import LatentDiffusion
from domainfusion.ldm.adapt import GENERIC_STYLES, check_resolution, domain_prompt, style_vocabulary
from domainfusion.train import TrainArgs, train

from conftest import make_image_folder
from tiny_ldm import TINY_GENERATION, save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
FAST = {**TINY_GENERATION, "lr": 1e-3, "aug_every_epochs": 0.5}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_tiny_ldm(tmp_path_factory.mktemp("sd"), kind="clip")


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "PACS", {d: ["dog", "horse"] for d in PACS_DOMAINS}, per_class=4, size=16)
    return root


def tensor_context(tmp_path: Path, ldm_folder: Path, n: tuple[int, ...] = (6, 5), seed: int = 0) -> RunContext:
    g = torch.Generator().manual_seed(seed)
    splits = [
        torch.utils.data.TensorDataset(torch.rand(k, 3, 32, 32, generator=g), torch.randint(2, (k,), generator=g))
        for k in n
    ]
    return RunContext(
        dataset="PACS",
        output_dir=tmp_path,
        train_splits=splits,
        train_env_names=list(PACS_DOMAINS[: len(n)]),
        env_names=list(PACS_DOMAINS),
        class_names=["dog", "horse"],
        steps_per_epoch=2.0,
        seed=seed,
        ldm_model=str(ldm_folder),
    )


def build(name: str, context: RunContext, **overrides):
    hp = {**registry.default_hparams(name, "PACS"), **FAST, **overrides}
    hp = {k: v for k, v in hp.items() if k in registry.specs(name, "PACS")}
    return algorithm_class(name)((3, 32, 32), 2, len(context.train_splits), hp, context=context)


def minibatches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(2, (4,), generator=g)) for _ in range(2)]


def test_domainfusion_trains_end_to_end_on_pacs_layout_with_sd_shaped_ldm(
    pacs_root: Path, sd_folder: Path, tmp_path: Path
) -> None:
    args = TrainArgs(
        dataset="PACS",
        algorithm="DomainFusion",
        data_dir=str(pacs_root),
        ldm=str(sd_folder),
        output_dir=str(tmp_path / "run"),
        test_envs=[3],
        steps=8,
        checkpoint_freq=4,
        image_size=16,
        progress=False,
        hparams=json.dumps(FAST),
    )
    records = train(args)
    # 3 source domains × 8 images, 7 in the in-split → 21 source images, pool round(0.25 · 21) = 5; one epoch =
    # 21 / (4 · 3) = 1.75 steps, so with T = 0.5 epochs a refresh is due before every step (step s is at epoch
    # s / 1.75 ≥ 0.5 · s): 8 refreshes × 5 images × 2 candidates by the end.
    assert [r["step"] for r in records] == [0, 4, 7]
    assert [r["pool_refreshes"] for r in records] == [1, 5, 8]
    assert [r["generated_images"] for r in records] == [10, 50, 80]
    assert all(r["pool_size"] == 5 and 0 < r["confidence"] < 1 for r in records)
    # The logged loss is the objective CE + λ_LD · L_LD with the registry's λ_LD (FAST leaves it), not CE alone or an
    # unweighted sum; the means over a checkpoint interval keep the relation (it is linear).
    ld_weight = registry.default_hparams("DomainFusion", "PACS")["ld_weight"]
    assert all(r["loss"] == pytest.approx(r["ce_loss"] + ld_weight * r["ld_loss"], rel=1e-5, abs=0) for r in records)
    assert all(r["loss"] - r["ce_loss"] > 0.01 * r["loss"] for r in records)  # LD is a visible share of it
    assert (tmp_path / "run" / "pool_grids" / "refresh-007.png").is_file()
    assert (tmp_path / "run" / "done").is_file()
    assert "ld_loss" in json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])


def test_same_cli_command_on_real_pacs_mini(pacs_mini: Path, sd_folder: Path, tmp_path: Path) -> None:
    """The command documented for Stable Diffusion on PACS, with a tiny SD-shaped model on the real PACS-mini."""
    from typer.testing import CliRunner

    from domainfusion.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--dataset",
            "PACS",
            "--algorithm",
            "DomainFusion",
            "--data-dir",
            str(pacs_mini),
            "--ldm",
            str(sd_folder),
            "--test-envs",
            "0",
            "--allow-missing-classes",
            "--image-size",
            "32",
            "--steps",
            "3",
            "--checkpoint-freq",
            "2",
            "--hparams",
            json.dumps(FAST),
            "--output-dir",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert records[-1]["generated_images"] == records[-1]["pool_refreshes"] * records[-1]["pool_size"] * 2 > 0
    assert records[-1]["environments"] == list(PACS_DOMAINS)


def test_ldm_far_below_the_image_size_is_refused_before_training(
    pacs_root: Path, sd_folder: Path, tmp_path: Path
) -> None:
    args = TrainArgs(
        dataset="PACS",
        algorithm="DomainFusion",
        data_dir=str(pacs_root),
        ldm=str(sd_folder),
        output_dir=str(tmp_path / "run"),
        test_envs=[3],
        steps=2,
        image_size=80,
        progress=False,
        hparams=json.dumps(FAST),
    )
    with pytest.raises(UserError, match=r"works at 32x32 px but the images are 80x80.*shrunk 2.5x.*--image-size 32"):
        train(args)
    assert not (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "run" / "pool").exists()
    check_resolution(32, (3, 64, 64), "tiny")  # 2x smaller is within bounds


def test_synthetic_images_replace_source_images_evenly() -> None:
    from domainfusion.algorithms.generative import keep_source

    batches = [(torch.arange(5).float(), torch.arange(5)) for _ in range(3)]
    kept = keep_source(batches, 4)  # 15 images, 4 replaced: 2 off the first domain, 1 off each other one
    assert [len(y) for _, y in kept] == [3, 4, 4]
    assert kept[0][1].tolist() == [0, 1, 2]
    assert [len(y) for _, y in keep_source(batches, 0)] == [5, 5, 5]


def test_step_sees_as_many_images_as_erm(tmp_path: Path, sd_folder: Path, monkeypatch) -> None:
    algorithm = build("DomainFusion_Aug", tensor_context(tmp_path, sd_folder))
    seen = []
    predict = algorithm.predict
    monkeypatch.setattr(algorithm, "predict", lambda x: seen.append(len(x)) or predict(x))
    algorithm.update(minibatches(0))  # 2 domains × 4 images; 0.25 · 8 = 2 from the pool
    assert seen == [8]


def test_ldm_is_frozen(tmp_path: Path, sd_folder: Path) -> None:
    algorithm = build("DomainFusion", tensor_context(tmp_path, sd_folder))
    ldm: LatentDiffusion = algorithm.context.ldm()
    frozen = {
        f"{m}.{k}": v.clone() for m in ("vae", "unet", "text_encoder") for k, v in getattr(ldm, m).state_dict().items()
    }
    for step in range(3):
        algorithm.update(minibatches(step))
    after = {f"{m}.{k}": v for m in ("vae", "unet", "text_encoder") for k, v in getattr(ldm, m).state_dict().items()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(p.grad is None and not p.requires_grad for m in (ldm.vae, ldm.unet) for p in m.parameters())
    # The LDM is not part of the classifier's state: model.safetensors stays the classifier's size.
    assert not any(k.startswith(("vae", "unet", "ldm")) for k in algorithm.state_dict())


class MissLDM:
    """An LDM whose UNet misses the drawn noise by `miss[y]` everywhere under class y's prompt, with an identity
    "VAE" (z = the 32 px image, 3 channels): L_LD = ½ mean (miss·1)² in value, and with uniform weighting
    ∂L/∂z = miss[y] / n on each of the n = B·3·32·32 latent elements, so ∂L/∂c_b = miss[y_b] · mean(x_b) / B."""

    device, dtype, num_train_timesteps, image_size = torch.device("cpu"), torch.float32, 1000, 32
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def __init__(self, miss: list[float]) -> None:
        self.miss = torch.tensor(miss)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.miss[: len(prompts)].view(-1, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def predict_noise(self, z_t, t, embeds, guidance: float = 1.0) -> torch.Tensor:
        return z_t + embeds.reshape(-1, 1, 1, 1)


def test_ld_gradient_reaches_the_classifier_with_its_weight_and_direction(tmp_path: Path) -> None:
    """One step of DomainFusion_LD applies ∇θ (CE + λ·L_LD), L_LD's part known in closed form (MissLDM). With a miss
    > 0 for every class LD lowers every true-class confidence (a dark image is "easier"), against cross-entropy, so
    with λ large the step lowers the confidence that CE alone raises."""
    x, y = (torch.cat(parts) for parts in zip(*minibatches(0)))
    miss = [1.0, 2.0]

    def fresh(ld_weight: float) -> ERM:
        torch.manual_seed(0)  # the same initial classifier every time
        context = dataclasses.replace(tensor_context(tmp_path, Path("unused")), _ldm=MissLDM(miss))
        # ld_batch_size ≥ the 8 source images: LD sees all of them, in whatever order it draws them.
        return build("DomainFusion_LD", context, ld_weight=ld_weight, ld_weighting="uniform", ld_batch_size=16)

    def confidence(algorithm: ERM) -> torch.Tensor:  # mean true-class probability on the batch
        return algorithm.predict(x).softmax(1).gather(1, y[:, None]).squeeze(1)

    initial = fresh(0.0)
    params = list(initial.network.parameters())
    c = confidence(initial)
    # L_LD's gradient through c, as a linear surrogate with the same ∂/∂c: Σ_b miss[y_b] · mean(x_b) · c_b / B.
    surrogate = (torch.tensor(miss)[y] * x.mean((1, 2, 3)) * c).sum() / len(y)
    grad_ce = torch.autograd.grad(torch.nn.functional.cross_entropy(initial.predict(x), y), params)
    grad_ld = torch.autograd.grad(surrogate, params)
    weight = 50.0
    with_ld, ce_only = fresh(weight), fresh(0.0)
    values = with_ld.update(minibatches(0))
    assert values["ld_loss"] == pytest.approx(0.5 * torch.tensor(miss)[y].pow(2).mean().item(), rel=1e-6)
    applied = torch.cat([p.grad.flatten() for p in with_ld.network.parameters()])
    expected = torch.cat([(a + weight * b).flatten() for a, b in zip(grad_ce, grad_ld)])
    assert (applied - expected).norm() < 1e-4 * expected.norm()
    ce_only.update(minibatches(0))
    with torch.no_grad():
        assert confidence(ce_only).mean() > c.mean() > confidence(with_ld).mean()


def test_ablations_switch_parts_off(tmp_path: Path, sd_folder: Path) -> None:
    ld_only = build("DomainFusion_LD", tensor_context(tmp_path / "ld", sd_folder))
    assert ld_only.pool is None and ld_only.augmentation is None
    assert "ld_loss" in ld_only.update(minibatches(0)) and ld_only.checkpoint_stats()["generated_images"] == 0
    aug_only = build("DomainFusion_Aug", tensor_context(tmp_path / "aug", sd_folder))
    values = aug_only.update(minibatches(0))
    assert aug_only.ld is None and "ld_loss" not in values and values["loss"] == values["ce_loss"]
    assert aug_only.checkpoint_stats()["generated_images"] == 3 * 2  # pool 0.25 · 11 → 3 images, N = 2
    random_sel = build("DomainFusion_RandSel", tensor_context(tmp_path / "rand", sd_folder))
    assert random_sel.augmentation.settings.selection == "random"
    assert (
        build("DomainFusion", tensor_context(tmp_path / "df", sd_folder)).augmentation.settings.selection
        == "style_content"
    )


def test_style_words_name_only_the_source_domains(tmp_path: Path, sd_folder: Path) -> None:
    context = tensor_context(tmp_path, sd_folder, n=(6, 5))  # sources: the first two PACS domains
    held_out = [d for d in PACS_DOMAINS if d not in context.train_env_names]
    df = build("DomainFusion", context, aug_style_words="source_domains")
    assert df.augmentation.prompts == [
        [domain_prompt("PACS", d, c) for d in PACS_DOMAINS[:2]] for c in ("dog", "horse")
    ]
    assert not any(
        domain_prompt("PACS", d, c) in p
        for d in held_out
        for c in ("dog", "horse")
        for p in sum(df.augmentation.prompts, [])
    )
    plain = build("DomainFusion", tensor_context(tmp_path / "plain", sd_folder), aug_style_words="none")
    assert plain.augmentation.prompts == [[p] for p in context.class_prompts()]
    # The default: the class prompt in each look of the generic vocabulary (the tiny SD folder ships none), never a
    # look that is a PACS domain's name or description, held out or not.
    styled = build("DomainFusion", tensor_context(tmp_path / "styled", sd_folder))
    kept = style_vocabulary("PACS", list(PACS_DOMAINS), None)
    assert styled.augmentation.prompts == [[f"{p}, {s}" for s in kept] for p in context.class_prompts()]
    assert {"a photo", "a cartoon"} <= set(GENERIC_STYLES) and not {"a photo", "a cartoon"} & set(kept)


def test_variants_share_hparam_draws() -> None:
    full = registry.random_hparams("DomainFusion", "DigitsDG", 3)
    for variant in ("DomainFusion_LD", "DomainFusion_Aug", "DomainFusion_RandSel"):
        assert registry.random_hparams(variant, "DigitsDG", 3) == full
    cdga = registry.random_hparams("CDGA", "DigitsDG", 3)
    assert all(cdga[k] == full[k] for k in ("img2img_strength", "img2img_steps", "img2img_guidance", "lr"))
    with pytest.raises(Exception, match="ld_grad"):
        registry.resolve_hparams("DomainFusion", "DigitsDG", 0, 0, '{"ld_grad": "exact"}')


def test_cdga_generates_k_variants_of_every_source_image(tmp_path: Path, sd_folder: Path) -> None:
    context = tensor_context(tmp_path, sd_folder, n=(6, 5))
    cdga = build("CDGA", context, cdga_variants=2)
    assert len(cdga.pool) == 22 and cdga.pool.generated == 22
    sources = torch.cat([s for _, _, s in cdga.pool.shards()])
    assert sorted(sources.tolist()) == sorted(list(range(11)) * 2)
    labels = torch.cat([s.tensors[1] for s in context.train_splits])
    assert torch.equal(cdga.pool.labels, labels[sources])
    assert "loss" in cdga.update(minibatches(0)) and cdga.checkpoint_stats()["generated_images"] == 22


def test_cdga_generates_in_parts_of_max_batch_images_with_the_same_pool(tmp_path: Path, sd_folder: Path) -> None:
    """CDGA's chunks go through the LDM in parts of at most max_batch images (the UNet sees 2 rows per image under
    guidance) and give the pool a whole-chunk generation gives."""
    pools, largest = [], []
    for max_batch in (None, 2):
        ldm = LatentDiffusion.from_pretrained(sd_folder, device="cpu", max_batch=max_batch)
        rows: list[int] = []
        for module in (ldm.vae.encoder, ldm.unet):
            module.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
        context = dataclasses.replace(tensor_context(tmp_path / str(max_batch), sd_folder, n=(6, 5)), _ldm=ldm)
        pools.append(torch.cat([images for images, _, _ in build("CDGA", context).pool.shards()]))
        largest.append(max(rows))
    assert largest[1] <= 2 < largest[0]
    assert (pools[0].int() - pools[1].int()).abs().max() <= 1  # equal up to float rounding at the uint8 step


def test_cdga_prompts_lie_between_own_and_other_domain(tmp_path: Path, sd_folder: Path) -> None:
    context = tensor_context(tmp_path, sd_folder, n=(3, 3, 3))
    cdga = build("CDGA", context)
    ldm = context.ldm()
    labels, domains = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 2])
    embeds = cdga.interpolated_prompts(labels, domains, torch.Generator().manual_seed(0))
    for e, y, d in zip(embeds, labels, domains):
        own = ldm.encode_prompts([domain_prompt("PACS", PACS_DOMAINS[int(d)], ["dog", "horse"][int(y)])])[0]
        others = [
            ldm.encode_prompts([domain_prompt("PACS", PACS_DOMAINS[o], ["dog", "horse"][int(y)])])[0]
            for o in range(3)
            if o != int(d)
        ]
        fits = []
        for other in others:
            alpha = ((e - own) * (other - own)).sum() / (other - own).pow(2).sum()
            fits.append((0 <= alpha <= 1) and torch.allclose(own + alpha * (other - own), e, atol=1e-5))
        assert any(fits)


def test_domain_prompts() -> None:
    assert domain_prompt("PACS", "sketch", "dog") == "a sketch of a dog"
    assert domain_prompt("DigitsDG", "mnist_m", "3") == "a photo of the digit 3, handwritten inverted on a photo"
    assert domain_prompt("ImageFolder", "d0", "cat") == "a d0 image of a cat"
