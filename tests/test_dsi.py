"""DSI baseline: per-source-domain fine-tunes of the shared LDM (from its weights, leaving it untouched, only on the
run's source in-splits), loaded as UNets around the shared VAE, train-time translation counts, test-time prediction,
reuse on resume, fine-tuning time over a killed and resumed fine-tune, `ldm train` on an in-split."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from domainfusion import hparams as registry
from domainfusion.algorithms import RunContext, algorithm_class, dsi
from domainfusion.algorithms.dsi import PerDomainLDMs
from domainfusion.cli import app
from domainfusion.data import get_dataset
from domainfusion.data.loaders import domain_of, holdout_split
from domainfusion.ldm import LatentDiffusion, adapt, training
from domainfusion.ldm.training_data import dataset_training_data
from domainfusion.train import TrainArgs, train

from conftest import make_image_folder
from tiny_ldm import save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
FAST = {
    "lr": 1e-3,
    "data_augmentation": False,
    "batch_size": 4,
    "img2img_steps": 4,
    "dsi_finetune_steps": 2,
    "dsi_finetune_batch_size": 4,
}
SENTINEL = (255, 0, 255)  # every pixel of the held-out domain


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_tiny_ldm(tmp_path_factory.mktemp("sd"), kind="clip")


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def context(
    tmp_path: Path, ldm_folder: Path, n: tuple[int, ...] = (6, 5, 4), resume: bool = False, **fields
) -> RunContext:
    g = torch.Generator().manual_seed(0)
    splits = [
        torch.utils.data.TensorDataset(torch.rand(k, 3, 32, 32, generator=g), torch.randint(2, (k,), generator=g))
        for k in n
    ]
    return RunContext(
        dataset="PACS",
        output_dir=tmp_path,
        train_splits=splits,
        train_env_names=list(DOMAINS[: len(n)]),
        env_names=list(DOMAINS),
        class_names=["dog", "horse"],
        steps_per_epoch=2.0,
        seed=0,
        ldm_model=str(ldm_folder),
        resume=resume,
        **fields,
    )


def build(name: str, ctx: RunContext, **overrides) -> PerDomainLDMs:
    hp = {**registry.default_hparams(name, "PACS"), **FAST, **overrides}
    return algorithm_class(name)((3, 32, 32), 2, len(ctx.train_splits), hp, context=ctx)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, sd_folder) -> SimpleNamespace:
    """One DSI construction, watched: the stage each fine-tune starts with its weights, the data each one gets."""
    ctx = context(tmp_path_factory.mktemp("dsi"), sd_folder)
    shared = ctx.ldm()
    before = SimpleNamespace(disk=folder_hash(sd_folder), unet=state_hash(shared.unet), vae=state_hash(shared.vae))
    starts, datasets = [], []
    run_stage, train_ldm = training._run_stage, training.train_ldm

    def spy_stage(stage, out, config, total, peak_lr, modules, trained, *args, **kwargs):
        starts.append((stage, {k: v.clone() for k, v in trained.state_dict().items()}))
        return run_stage(stage, out, config, total, peak_lr, modules, trained, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_run_stage", spy_stage)
        mp.setattr(training, "train_ldm", lambda config, data=None: datasets.append(data) or train_ldm(config, data))
        alg = build("DSI", ctx)
    return SimpleNamespace(ctx=ctx, shared=shared, before=before, starts=starts, datasets=datasets, alg=alg)


def test_one_unet_finetune_per_source_starting_from_the_shared_weights(finetuned):
    f = finetuned
    assert [p.parent.name for p in f.alg.model_dirs] == list(DOMAINS[:3]) and len(set(f.alg.model_dirs)) == 3
    assert [s for s, _ in f.starts] == ["unet"] * 3
    assert all(torch.equal(state[k], v) for _, state in f.starts for k, v in f.shared.unet.state_dict().items())


def test_each_finetune_sees_only_its_own_domains_images(finetuned):
    assert len(finetuned.datasets) == 3
    for split, data in zip(finetuned.ctx.train_splits, finetuned.datasets):
        assert torch.equal(data.images, (split.tensors[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1))


def test_a_source_model_is_its_finetuned_unet_around_the_shared_vae_and_text_encoder(finetuned):
    f = finetuned
    for folder, model in zip(f.alg.model_dirs, f.alg.models()):
        tuned = LatentDiffusion.from_pretrained(folder, device="cpu")
        assert state_hash(tuned.vae) == f.before.vae and state_hash(tuned.unet) != f.before.unet
        assert state_hash(model.unet) == state_hash(tuned.unet)
        assert model.vae is f.shared.vae and model.text_encoder is f.shared.text_encoder
        assert model.vae.encoder.conv_in.weight.data_ptr() == f.shared.vae.encoder.conv_in.weight.data_ptr()


def test_the_shared_model_stays_untouched(finetuned, sd_folder):
    f = finetuned
    assert (folder_hash(sd_folder), state_hash(f.shared.unet), state_hash(f.shared.vae)) == (
        f.before.disk,
        f.before.unet,
        f.before.vae,
    )


def test_every_source_image_is_translated_into_each_other_source_style(finetuned):
    alg = finetuned.alg
    stats = alg.checkpoint_stats()
    assert len(alg.pool) == stats["generated_images"] == (6 + 5 + 4) * 2
    assert stats["ldm_finetuned_models"] == 3 and stats["ldm_finetune_s"] > 0 and stats["generation_s"] > 0
    labels = torch.cat([s.tensors[1] for s in finetuned.ctx.train_splits])
    for _, y, sources in alg.pool.shards():
        assert torch.equal(y, labels[sources])
    assert torch.bincount(torch.cat([s for _, _, s in alg.pool.shards()])).tolist() == [2] * 15


def test_run_finetunes_only_on_source_in_splits(tmp_path, sd_folder, monkeypatch):
    root = make_image_folder(tmp_path / "data" / "PACS", {d: ["dog", "horse"] for d in DOMAINS}, per_class=5, size=16)
    held_out = root / DOMAINS[3]
    for png in held_out.rglob("*.png"):  # the held-out domain is a sentinel colour
        from PIL import Image

        Image.new("RGB", (16, 16), SENTINEL).save(png)
    seen = []
    train_ldm = training.train_ldm
    monkeypatch.setattr(training, "train_ldm", lambda config, data=None: seen.append(data) or train_ldm(config, data))
    args = TrainArgs(
        dataset="PACS",
        algorithm="DSI",
        data_dir=str(tmp_path / "data"),
        ldm=str(sd_folder),
        output_dir=str(tmp_path / "run"),
        test_envs=[3],
        steps=2,
        checkpoint_freq=2,
        image_size=16,
        trial_seed=1,
        progress=False,
        hparams=json.dumps(FAST),
    )
    records = train(args)
    assert len(seen) == 3
    used = torch.cat([d.images for d in seen])
    assert not (used == torch.tensor(SENTINEL, dtype=torch.uint8)).all(dim=-1).any()
    # Exactly the in-splits `train` used (trial seed 1, holdout 0.2): every image of them, nothing else.
    ds = get_dataset("PACS", str(tmp_path / "data"), [3], {"data_augmentation": False}, image_size=16)
    for env, data in enumerate(seen):
        split = holdout_split(ds[env], env, 0.2, 1)[1]
        expected = dataset_training_data([split], [DOMAINS[env]], ds.class_names, "a photo of a {cls}", 32)
        assert torch.equal(data.images, expected.images) and data.captions == expected.captions
    last = records[-1]
    n_in = sum(len(d.images) for d in seen)
    assert last["generated_images"] == n_in * 2 and last["ldm_finetuned_models"] == 3 and last["ldm_finetune_s"] > 0


class Restyle:
    """A stand-in for a fine-tuned LDM whose 'style' is a fixed map of the pixels."""

    image_size = 32
    device = torch.device("cpu")

    def __init__(self, style) -> None:
        self.style = style
        self.calls = 0

    def chunks(self, n, start=0, guidance_scale=1.0):
        return [slice(start, start + n)]

    def encode(self, images):
        return images  # pixels stand in for latents

    def img2img(self, images, prompts, latents, convert, **kwargs):
        self.calls += 1
        assert images is None  # encoded once by the algorithm, not again per model
        assert prompts == [""] * len(latents) and kwargs["guidance_scale"] == 1.0  # the label is unknown at test time
        return convert(self.style(latents))


def test_test_time_mode_averages_softmax_over_source_translations(tmp_path, sd_folder):
    alg = build("DSI_TestTime", context(tmp_path, sd_folder, n=(4, 4)))
    assert alg.pool is None
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(alg.predict(x), alg.network(x))  # training mode: plain ERM
    alg.eval()
    with torch.inference_mode():
        out = alg.predict(x)
        assert len(alg.source_versions(x)) == 2
    assert not torch.allclose(out.exp(), alg.network(x).softmax(1), atol=1e-3)
    assert alg.checkpoint_stats()["generated_images"] == 5 * 2  # cached: the second call translated nothing

    # A constructed case: a brightness classifier (logits ±20·(0.5 − mean)) and two sources whose styles are
    # inversion (0.8 → 0.2: logits (−6, 6)) and dimming by 0.2 (0.8 → 0.6: logits (2, −2)). The averaged softmax,
    # p(class 0) = (1 / (1 + e¹²) + 1 / (1 + e⁻⁴)) / 2 = 0.491010 (log −0.711291; class 1: log 0.508990 =
    # −0.675327), flips every prediction of the plain classifier (averaged logits would give log-probs −4.02, −0.02).
    class Brightness(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m - 0.5, 0.5 - m], dim=1) * 20

    alg.network = Brightness()
    alg._models, alg._cache = [Restyle(lambda z: 1 - z), Restyle(lambda z: z - 0.2)], {}
    bright = torch.full((3, 3, 32, 32), 204 / 255)  # 0.8, exactly representable after the uint8 round trip
    with torch.inference_mode():
        assert alg.network(bright).argmax(1).tolist() == [0, 0, 0]
        out = alg.predict(bright)
        alg.predict(bright)
    assert torch.allclose(out, torch.tensor([[-0.711291, -0.675327]] * 3), atol=1e-5)
    assert out.argmax(1).tolist() == [1, 1, 1]
    assert [m.calls for m in alg._models] == [1, 1]


def test_ldm_train_cli_fine_tunes_on_one_domains_in_split(tmp_path, sd_folder):
    root = make_image_folder(tmp_path / "folder", {d: ["cat", "dog"] for d in ("d0", "d1", "d2")}, per_class=5)
    common = [
        "ldm",
        "train",
        "--dataset",
        "ImageFolder",
        "--data-dir",
        str(root),
        "--init-from",
        str(sd_folder),
        "--test-envs",
        "0",
        "--holdout-fraction",
        "0.2",
        "--trial-seed",
        "1",
        "--vae-steps",
        "0",
        "--unet-steps",
        "1",
        "--config",
        json.dumps(
            {
                "unet_batch_size": 4,
                "warmup_steps": 1,
                "sample_every": 0,
                "sample_seeds": 1,
                "sample_steps": 2,
                "progress": False,
            }
        ),
    ]
    result = CliRunner().invoke(app, common + ["--domain", "d1", "--output-dir", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["images"] == 10 - int(10 * 0.2)  # d1's in-split only
    result = CliRunner().invoke(app, common + ["--domain", "d0", "--output-dir", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "held out" in str(result.exception)


def test_domain_of_finds_each_index_in_its_split():
    splits = [[None] * 6, [None] * 5, [None] * 4]  # indices 0-5, 6-10, 11-14
    assert domain_of(splits, torch.tensor([0, 5, 6, 10, 11, 14])).tolist() == [0, 0, 1, 1, 2, 2]


class Killed(Exception):
    pass


def test_finetune_time_adds_up_over_a_killed_and_resumed_finetune(tmp_path, sd_folder, monkeypatch):
    # A fake clock that moves only when a checkpoint is written: 7 s per checkpoint in the first invocation, which is
    # killed before the second checkpoint of the first domain; 3 s per checkpoint after. 2 steps, a checkpoint each.
    now, seconds, written = [0.0], [7.0], []
    write = training._write_checkpoint

    def timed_write(*args, **kwargs):
        written.append(args[1:3])
        if len(written) == 2 and seconds[0] == 7.0:
            raise Killed
        now[0] += seconds[0]
        return write(*args, **kwargs)

    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(training, "_write_checkpoint", timed_write)
    with pytest.raises(Killed):
        build("DSI", context(tmp_path, sd_folder, n=(4, 4)))
    seconds[0] = 3.0
    alg = build("DSI", context(tmp_path, sd_folder, n=(4, 4)))
    assert written == [("unet", 1), ("unet", 2), ("unet", 2), ("unet", 1), ("unet", 2)]
    assert alg.finetune_s == [7.0 + 3.0, 3.0 + 3.0]  # the killed invocation's 7 s counted with the resumed 3 s
    summary = json.loads((alg.model_dirs[0].parent / "summary.json").read_text())
    assert summary["wall_s_this_invocation"] == 3.0 and alg.checkpoint_stats()["ldm_finetune_s"] == 16.0


def test_a_finetuned_vae_is_loaded_per_source_model(tmp_path, sd_folder):
    alg = build("DSI_TestTime", context(tmp_path, sd_folder, n=(4, 4)), dsi_finetune_vae_steps=1)
    shared, models = alg.context.ldm(), alg.models()
    for folder, model in zip(alg.model_dirs, models):
        tuned = LatentDiffusion.from_pretrained(folder, device="cpu")
        assert model.vae is not shared.vae and state_hash(model.vae) == state_hash(tuned.vae) != state_hash(shared.vae)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latents = alg.latents(x)
    assert all(torch.equal(z, m.encode(x)) for z, m in zip(latents, models))  # each model's own VAE
    assert not torch.equal(latents[0], latents[1])


def test_finished_wall_s_reads_folders_from_before_it_was_recorded(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 20.0, "wall_s_this_invocation": 5.0}))
    assert training.finished_wall_s(tmp_path) == 20.0
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s_this_invocation": 12.5}))  # an older fine-tune
    assert training.finished_wall_s(tmp_path) == 12.5


def test_translation_works_in_parts_of_max_batch_images_read_by_the_runs_workers(
    finetuned, tmp_path, sd_folder, monkeypatch
):
    """A chunk's images are resized, encoded and translated at most `max_batch` at a time, by source models with the
    shared LDM's `max_batch`; the pool is the whole-chunk run's up to float rounding."""
    resized, translated, workers, limits = [], [], [], []
    to_ldm_images, img2img = adapt.to_ldm_images, LatentDiffusion.img2img
    subset_chunks = dsi.subset_chunks
    monkeypatch.setattr(adapt, "to_ldm_images", lambda x, size: resized.append(len(x)) or to_ldm_images(x, size))

    def spy_img2img(self, *args, convert, **kw):
        limits.append(self.max_batch)
        return img2img(self, *args, convert=lambda x: translated.append(len(x)) or convert(x), **kw)

    monkeypatch.setattr(LatentDiffusion, "img2img", spy_img2img)
    monkeypatch.setattr(training, "_run_stage", lambda *a, **kw: pytest.fail("a copied fine-tune was retrained"))
    monkeypatch.setattr(dsi, "subset_chunks", lambda *args: workers.append(args[3]) or subset_chunks(*args))
    pools = []
    for fields in ({}, {"ldm_max_batch": 2, "num_workers": 1}):
        resized.clear(), translated.clear(), limits.clear()
        out = tmp_path / str(len(pools))
        shutil.copytree(finetuned.ctx.output_dir / dsi.FOLDER, out / dsi.FOLDER)  # the fine-tunes are reused
        pool = build("DSI", context(out, sd_folder, **fields)).pool
        pools.append(torch.cat([images for images, _, _ in pool.shards()]))
    assert max(resized) == 2 and max(translated) <= 2 and set(limits) == {2} and workers == [0, 1]
    assert sum(resized) == 6 + 5 + 4 and sum(translated) == (6 + 5 + 4) * 2
    assert pools[0].shape == pools[1].shape and (pools[0].int() - pools[1].int()).abs().max() <= 1


def test_finetuning_data_is_read_through_seeded_augmentation(tmp_path):
    """PACS in-splits are randomly augmented; the fine-tuning data is the same on every read for a seed, and reading
    it leaves the global RNG alone."""
    make_image_folder(tmp_path / "data" / "PACS", {d: ["dog", "horse"] for d in DOMAINS}, per_class=4, size=16)
    ds = get_dataset("PACS", str(tmp_path / "data"), [3], {"data_augmentation": True}, image_size=16)
    split = holdout_split(ds[0], 0, 0.2, 0)[1]

    def read(seed: int) -> torch.Tensor:
        return dataset_training_data([split], [DOMAINS[0]], ds.class_names, "a {cls}", 32, seed=seed).images

    state = torch.random.get_rng_state()
    first = read(5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, read(5)) and not torch.equal(first, read(6))  # seeded, and augmentation is on


def test_resume_reuses_the_finetunes_and_other_settings_redo_them(finetuned, sd_folder, monkeypatch):
    """Last in the file: its second construction replaces the fixture's fine-tunes (they are reused only in place)."""
    starts = []
    run_stage = training._run_stage
    monkeypatch.setattr(
        training, "_run_stage", lambda stage, *a, **kw: starts.append(stage) or run_stage(stage, *a, **kw)
    )
    out = finetuned.ctx.output_dir
    again = build("DSI", context(out, sd_folder, resume=True))
    assert starts == [] and again.model_dirs == finetuned.alg.model_dirs
    assert again.finetune_s == finetuned.alg.finetune_s
    build("DSI", context(out, sd_folder), dsi_finetune_lr=1e-3)
    assert starts == ["unet"] * 3
