"""LatentDiffusion on tiny random models of the real classes: an embedded-shaped one (BERT text encoder) and a
Stable-Diffusion-1.x-shaped one (CLIP), both loaded through the same `from_pretrained` path, fully offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import BertModel, CLIPTextModel, CLIPTokenizer

from domainfusion.errors import UserError
from domainfusion.ldm import LatentDiffusion

from tiny_ldm import bert_components, clip_components, images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bert")
    LatentDiffusion(**bert_components(tmp), device="cpu").save_pretrained(tmp / "ldm")
    return tmp / "ldm"


@pytest.fixture(scope="module")
def ldm(bert_folder: Path) -> LatentDiffusion:
    return LatentDiffusion.from_pretrained(bert_folder, device="cpu")


def test_attributes(ldm: LatentDiffusion) -> None:
    assert (ldm.image_size, ldm.vae_scale_factor, ldm.latent_channels) == (32, 4, 4)
    assert ldm.device == torch.device("cpu") and ldm.dtype == torch.float32
    assert ldm.num_train_timesteps == 1000 and ldm.alphas_cumprod.shape == (1000,)
    assert ldm.scaling_factor == ldm.vae.config.scaling_factor
    assert type(ldm.text_encoder) is BertModel
    assert not any(p.requires_grad for m in (ldm.vae, ldm.unet, ldm.text_encoder) for p in m.parameters())


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    original = LatentDiffusion(**bert_components(tmp_path), device="cpu")
    original.save_pretrained(tmp_path / "copy")
    copy = LatentDiffusion.from_pretrained(tmp_path / "copy", device="cpu")
    x, t = images(2), torch.tensor([10, 900])
    z, noise = original.encode(x), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(copy.encode(x), z)
    prompts = ["a photo of a dog", "a cat"]
    assert torch.equal(copy.encode_prompts(prompts), original.encode_prompts(prompts))
    zt = original.add_noise(z, noise, t)
    assert torch.equal(copy.add_noise(z, noise, t), zt)
    embeds = original.encode_prompts(prompts)
    assert torch.equal(copy.predict_noise(zt, t, embeds), original.predict_noise(zt, t, embeds))


def test_encode_decode_shapes_and_posterior_mean(ldm: LatentDiffusion) -> None:
    x = images(3)
    z = ldm.encode(x)
    assert z.shape == (3, 4, 8, 8) and z.grad_fn is None
    expected = ldm.vae.encode(x * 2 - 1).latent_dist.mean * ldm.scaling_factor
    torch.testing.assert_close(z, expected)
    sampled = ldm.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, z)
    assert torch.equal(sampled, ldm.encode(x, sample=True, generator=torch.Generator().manual_seed(0)))
    out = ldm.decode(z)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_prompt_embeddings_are_cached(bert_folder: Path) -> None:
    ldm = LatentDiffusion.from_pretrained(bert_folder, device="cpu")
    with mock.patch.object(ldm.text_encoder, "forward", wraps=ldm.text_encoder.forward) as forward:
        first = ldm.encode_prompts(["a photo of a dog", "a photo of a dog"])
        second = ldm.encode_prompts(["a photo of a dog"])
    assert forward.call_count == 1
    assert first.shape == (2, 16, 32) and torch.equal(first[1:], second)


def test_predict_noise_guidance_and_prediction_types(tmp_path: Path, ldm: LatentDiffusion) -> None:
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    cond = ldm.encode_prompts(["a photo of a dog", "a sketch of a cat"])
    plain = ldm.predict_noise(z, t, cond)
    assert not torch.allclose(ldm.predict_noise(z, t, cond, guidance_scale=3.0), plain)
    # ε_u + s(ε_c − ε_u) with ε_u = ε_c is ε_c: guidance mixes exactly the two predictions.
    torch.testing.assert_close(ldm.predict_noise(z, t, cond, guidance_scale=3.0, uncond_embeds=cond), plain)
    v_model = LatentDiffusion(**bert_components(tmp_path, prediction_type="v_prediction"), device="cpu")
    v = v_model.unet(z, t, cond).sample
    a = v_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v_model.predict_noise(z, t, cond), a.sqrt() * v + (1 - a).sqrt() * z)


def test_gradient_reaches_images_not_parameters(ldm: LatentDiffusion) -> None:
    x = images(2).requires_grad_()
    z = ldm.encode(x)
    zt = ldm.add_noise(z, torch.randn_like(z), torch.tensor([50, 500]))
    eps = ldm.predict_noise(zt, torch.tensor([50, 500]), ldm.encode_prompts(["a dog", "a cat"]))
    (z.square().sum() + eps.square().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in (*ldm.vae.parameters(), *ldm.unet.parameters()):
        assert p.grad is None and not p.requires_grad


def test_img2img_strength_semantics(ldm: LatentDiffusion) -> None:
    x, prompts = images(4), ["a photo of a dog"] * 4
    reconstruction = ldm.decode(ldm.encode(x))
    assert torch.equal(ldm.img2img(x, prompts, strength=0.0), reconstruction)
    # 20 steps × 0.04 → int(0.8) = 0 denoising steps: diffusers would fail, we return the reconstruction.
    assert torch.equal(ldm.img2img(x, prompts, strength=0.04, num_inference_steps=20), reconstruction)
    changes = [
        (ldm.img2img(x, prompts, strength=s, num_inference_steps=10) - reconstruction).abs().mean().item()
        for s in (0.2, 0.6, 1.0)
    ]
    assert 0 < changes[0] < changes[1] < changes[2]


def test_img2img_seeding(ldm: LatentDiffusion) -> None:
    x, prompts = images(4), ["a photo of a dog", "a cat", "a house", "a dog"]
    kwargs = dict(strength=0.7, num_inference_steps=5, guidance_scale=2.0)
    out = ldm.img2img(x, prompts, seed=3, **kwargs)
    assert out.shape == (4, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(ldm.img2img(x, prompts, seed=3, **kwargs), out)
    assert not torch.allclose(ldm.img2img(x, prompts, seed=4, **kwargs), out)
    torch.testing.assert_close(ldm.img2img(x, prompts, seed=3, batch_size=3, **kwargs), out, atol=1e-5, rtol=1e-4)


def test_sample(ldm: LatentDiffusion) -> None:
    out = ldm.sample(
        ["a photo of a dog", "a cat", "a house"], num_inference_steps=3, guidance_scale=2.0, seed=0, batch_size=2
    )
    assert out.shape == (3, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(
        ldm.sample(["a photo of a dog"], num_inference_steps=3, guidance_scale=2.0, seed=0),
        out[:1],
        atol=1e-5,
        rtol=1e-4,
    )


def test_stable_diffusion_shaped_folder_loads_through_same_path(tmp_path: Path) -> None:
    original = LatentDiffusion(**clip_components(tmp_path), device="cpu")
    original.save_pretrained(tmp_path / "sd")
    ldm = LatentDiffusion.from_pretrained(tmp_path / "sd", device="cpu")
    assert type(ldm.text_encoder) is CLIPTextModel and isinstance(ldm.tokenizer, CLIPTokenizer)
    embeds = ldm.encode_prompts(["lower newer", "wider"])
    assert embeds.shape == (2, 77, 32) and torch.equal(embeds, original.encode_prompts(["lower newer", "wider"]))
    x = images(2)
    assert torch.equal(ldm.encode(x), original.encode(x))
    out = ldm.img2img(x, ["lower", "wider"], strength=0.5, num_inference_steps=4, guidance_scale=2.0)
    assert out.shape == (2, 3, 32, 32)
    # The folder is an ordinary diffusers Stable Diffusion folder too.
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.text_encoder) is CLIPTextModel


@pytest.mark.parametrize("remove, message", [("unet", "missing unet/"), ("model_index.json", "model_index.json")])
def test_incomplete_folder(tmp_path: Path, bert_folder: Path, remove: str, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bert_folder, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=message):
        LatentDiffusion.from_pretrained(broken, device="cpu")


@pytest.mark.parametrize(
    "component, entry",
    [
        ("unet", ["evil_module", "UNet2DConditionModel"]),  # a library the folder chooses would be imported
        ("vae", ["diffusers", "DiffusionPipeline"]),  # a diffusers class, but not a model
        ("tokenizer", ["transformers", "pipeline"]),  # a function, not a class
        ("text_encoder", ["transformers", "NoSuchModel"]),
    ],
)
def test_model_index_may_only_name_allowed_component_classes(
    tmp_path: Path, bert_folder: Path, monkeypatch, component: str, entry: list[str]
) -> None:
    folder = tmp_path / "crafted"
    shutil.copytree(bert_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, component: entry}))
    (tmp_path / "evil_module.py").write_text("raise SystemExit('imported a module named by a model folder')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=f"declares {component} as {entry[0]}.{entry[1]}"):
        LatentDiffusion.from_pretrained(folder, device="cpu")


def test_missing_folder_and_unreachable_hub_id(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        LatentDiffusion.from_pretrained(tmp_path / "no" / "such" / "model", device="cpu")
    offline = OSError("someone/model does not appear to have a file named model_index.json.")
    with mock.patch.object(DiffusionPipeline, "load_config", side_effect=offline):
        with pytest.raises(UserError, match="'someone/model' is neither a local folder nor a reachable"):
            LatentDiffusion.from_pretrained("someone/model", device="cpu")


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 3, 16, 16), "32×32"),
        (torch.rand(2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
        (torch.rand(2, 3, 32, 32) * 255, r"\[0, 1\]"),
        (torch.rand(2, 3, 32, 32) * 2 - 1, r"\[0, 1\]"),
    ],
)
def test_bad_images(ldm: LatentDiffusion, bad: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ldm.encode(bad)


def test_bad_arguments(ldm: LatentDiffusion) -> None:
    with pytest.raises(ValueError, match="non-empty list of prompt"):
        ldm.encode_prompts([])
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        ldm.img2img(images(2), ["a dog"] * 2, strength=1.5)
    with pytest.raises(ValueError, match="one prompt per image"):
        ldm.img2img(images(2), ["a dog"], strength=0.5)


def record_batches(ldm: LatentDiffusion) -> dict[str, list[int]]:
    """Rows of every call into the VAE encoder (whole, or its first and second halves as `encode_features` and
    `latents_from_features` run them), the VAE decoder, the UNet and the text encoder."""
    seen: dict[str, list[int]] = {}
    modules = {
        "encoder": ldm.vae.encoder,
        "encoder_head": ldm.vae.encoder.conv_in,
        "encoder_tail": ldm.vae.encoder.mid_block,
        "decoder": ldm.vae.decoder,
        "unet": ldm.unet,
        "text_encoder": ldm.text_encoder,
    }
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, []).append(len(args[0])))
    return seen


def test_every_call_stays_within_max_batch_and_gives_the_one_call_result(bert_folder: Path) -> None:
    """A max_batch of 3 rows splits every VAE/UNet/text-encoder call (10 images; 2 UNet rows per image under
    guidance), and the results equal those of the default model, which takes each batch in one call."""
    whole = LatentDiffusion.from_pretrained(bert_folder, device="cpu")
    chunked = LatentDiffusion.from_pretrained(bert_folder, device="cpu", max_batch=3)
    assert whole.max_batch == 4096  # 4,194,304 px / (32 px)²: the embedded LDM's 32 px calls are never split
    seen = record_batches(chunked)
    x, t = images(10), torch.arange(10) * 90 + 50
    prompts = [f"a photo of the {w}" for w in ("dog", "cat", "house", "sketch", "painting")] * 2
    z = whole.encode(x)
    embeds = whole.encode_prompts(prompts)
    calls = {
        "encode": lambda m: m.encode(x),
        "encode (sample)": lambda m: m.encode(x, sample=True, generator=torch.Generator().manual_seed(0)),
        "encode_features": lambda m: m.encode_features(x),
        "latents_from_features": lambda m: m.latents_from_features(whole.encode_features(x)),
        "decode": lambda m: m.decode(z),
        "predict_noise": lambda m: m.predict_noise(z, t, embeds),
        "predict_noise (guided)": lambda m: m.predict_noise(z, t, embeds, guidance_scale=2.0),
        "encode_prompts": lambda m: m.encode_prompts(prompts, cache=False),
        "img2img (guided)": lambda m: m.img2img(x, prompts, strength=0.5, num_inference_steps=4, guidance_scale=2.0),
    }
    for name, call in calls.items():
        torch.testing.assert_close(call(chunked), call(whole), rtol=1e-5, atol=1e-5, msg=name)
    assert set(seen) == {"encoder", "encoder_head", "encoder_tail", "decoder", "unet", "text_encoder"}
    assert all(0 < n <= 3 for sizes in seen.values() for n in sizes), seen
    assert seen["decoder"][:4] == [3, 3, 3, 1] and 2 in seen["unet"]  # guided: one image (2 rows) per UNet call
    # Gradients through a split encode are those of one call.
    grads = []
    for model in (whole, chunked):
        xg = x.clone().requires_grad_()
        model.encode(xg).square().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())


def test_max_batch_must_be_positive(bert_folder: Path) -> None:
    with pytest.raises(UserError, match="max_batch"):
        LatentDiffusion.from_pretrained(bert_folder, device="cpu", max_batch=0)
