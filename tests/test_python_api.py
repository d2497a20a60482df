"""The Python API: the README's "From Python" example run as written (tiny LDM, data and budget), the DomainBed
wrapper built with exactly DomainBed's constructor arguments, and docs/domainbed.md's hparam table against the
registry."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import domainfusion
import domainfusion.data
import domainfusion.ldm
from domainfusion import hparams as registry
from domainfusion.algorithms import RunContext
from domainfusion.data.pool import SyntheticPool
from domainfusion.domainbed import IMAGENET, DomainFusion, extra_hparams, set_run
from domainfusion.errors import UserError
from domainfusion.images import to_uint8

from conftest import REPO, make_image_folder
from tiny_ldm import TINY_GENERATION, save_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = TINY_GENERATION


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory) -> Path:
    return save_tiny_ldm(tmp_path_factory.mktemp("ldm"))


def readme_example() -> str:
    """The first python block of README.md's "From Python" section."""
    section = (REPO / "README.md").read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_domainfusion_with_own_loaders(ldm_folder, tmp_path, monkeypatch):
    real_get_dataset, real_defaults, real_load_ldm = (
        domainfusion.data.get_dataset,
        registry.default_hparams,
        domainfusion.ldm.load_ldm,
    )
    # Four DigitsDG-named domains × two classes × four 16 px images, served at 32 px (the MNIST CNN, the LDM's size).
    root = make_image_folder(
        tmp_path / "digits", {d: ["0", "1"] for d in ("mnist", "mnist_m", "syn", "optdigits")}, per_class=4
    )
    monkeypatch.setattr(
        domainfusion.data,
        "get_dataset",
        lambda name, data_dir, test_envs, hparams: real_get_dataset(
            "ImageFolder", root, test_envs, hparams, image_size=32
        ),
    )
    monkeypatch.setattr(domainfusion, "default_hparams", lambda *a: {**real_defaults(*a), **FAST})
    monkeypatch.setattr(
        domainfusion.ldm,
        "load_ldm",
        lambda name, device, max_batch=None: real_load_ldm(str(ldm_folder), device, max_batch=max_batch),
    )
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    assert code.count("range(8)") == 1
    namespace: dict = {}
    exec(code.replace("range(8)", "range(1)"), namespace)

    algo, stats, accuracy = namespace["algo"], namespace["stats"], namespace["accuracy"]
    # Sorted folders: mnist, mnist_m, optdigits, syn; sources 0, 2, 3 = 3 × 8 images; zip of batch-4 loaders with
    # drop_last = 2 steps. Pool round(0.25 · 24) = 6; one epoch of our unit = 24 / (4 · 3) = 2 steps, so the
    # default period T = 1 gives one refresh (before step 0): 6 images × 2 candidates generated.
    assert algo.steps_done.item() == 2
    assert algo.checkpoint_stats() | {"generation_s": 0} == {
        "generated_images": 12,
        "generation_s": 0,
        "pool_size": 6,
        "pool_refreshes": 1,
    }
    assert len(SyntheticPool(tmp_path / "runs/from_python/pool")) == 6
    assert all(math.isfinite(stats[k]) for k in ("loss", "ce_loss", "ld_loss", "confidence"))
    assert stats["loss"] == pytest.approx(stats["ce_loss"] + algo.hparams["ld_weight"] * stats["ld_loss"], rel=1e-5)
    # Both steps moved every classifier weight (Adam's first moment is non-zero after a gradient).
    moments = [algo.optimizer.state[p] for p in algo.network.parameters()]
    assert all(int(m["step"]) == 2 and m["exp_avg"].abs().sum() > 0 for m in moments)
    assert accuracy in {k / 8 for k in range(9)}  # 8 held-out mnist_m images


def test_for_data_derives_epoch_unit_and_input_shape(tmp_path):
    splits = [TensorDataset(torch.rand(n, 1, 28, 28), torch.zeros(n, dtype=torch.long)) for n in (10, 6)]
    context = RunContext.for_data(splits, ["a", "b"], ["d0", "d1"], output_dir=tmp_path, batch_size=4)
    assert (context.steps_per_epoch, context.input_shape, context.env_names) == (2.0, (1, 28, 28), ["d0", "d1"])
    with pytest.raises(UserError, match="one source domain name per training split"):
        RunContext.for_data(splits, ["a"], ["d0"], output_dir=tmp_path, batch_size=4)
    with pytest.raises(UserError, match=r"\['d1'\] are not in env_names"):
        RunContext.for_data(splits, ["a"], ["d0", "d1"], output_dir=tmp_path, batch_size=4, env_names=["d0", "d2"])
    with pytest.raises(UserError, match="ldm_max_batch must be at least 1, got 0"):
        RunContext.for_data(splits, ["a", "b"], ["d0", "d1"], output_dir=tmp_path, batch_size=4, ldm_max_batch=0)


def test_the_ldm_memory_budget_reaches_the_model(ldm_folder, tmp_path):
    splits = [TensorDataset(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    budgets = [
        RunContext.for_data(
            splits, ["a", "b"], ["d0"], output_dir=tmp_path, batch_size=4, ldm_model=str(ldm_folder), ldm_max_batch=n
        )
        .ldm()
        .max_batch
        for n in (None, 3)
    ]
    assert budgets[1] == 3 and budgets[0] > 3  # None: the model's own default for its resolution


def test_domainbed_wrapper_with_domainbed_constructor_and_normalised_inputs(ldm_folder, tmp_path):
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    g = torch.Generator().manual_seed(0)
    pixels = [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]
    labels = [torch.randint(2, (6,), generator=g) for _ in range(2)]
    # What DomainBed's image-folder datasets yield: ImageNet-normalised images.
    splits = [TensorDataset((x - mean) / std, y) for x, y in zip(pixels, labels)]
    set_run(
        splits,
        ["dog", "horse"],
        ["art_painting", "cartoon"],
        output_dir=tmp_path,
        normalization=IMAGENET,
        dataset="PACS",
        env_names=["art_painting", "cartoon", "photo", "sketch"],
        ldm_model=str(ldm_folder),
        device="cpu",
    )
    # DomainBed's registry with docs/domainbed.md's block: its shared hparams, then ours for the algorithm.
    hparams = {
        **registry.default_hparams("ERM", "PACS"),
        **{s.name: s.default for s in extra_hparams("DomainFusion", "PACS")},
        **FAST,
    }
    algo = DomainFusion((3, 32, 32), 2, 2, hparams)
    for step in range(2):
        batches = [
            ((x[step * 3 : step * 3 + 3] - mean) / std, y[step * 3 : step * 3 + 3]) for x, y in zip(pixels, labels)
        ]
        values = algo.update(batches, None)  # DomainBed's train.py passes unlabeled=None positionally
        assert all(math.isfinite(values[k]) for k in ("loss", "ce_loss", "ld_loss"))
    assert algo.algorithm.steps_done.item() == 2
    # The generator got [0, 1] pixels: the frozen origin of the pool holds the un-normalised source images.
    images, _, sources = next(SyntheticPool(tmp_path / "pool_origin").shards())
    assert len(sources) == 3 and torch.equal(images, to_uint8(torch.cat(pixels)[sources]))
    algo.eval()
    with torch.no_grad():
        assert torch.allclose(algo.predict((pixels[0] - mean) / std), algo.algorithm.predict(pixels[0]), atol=1e-5)
    with pytest.raises(UserError, match="domain generalization"):
        algo.update(batches, [batches[0][0]])


def hparams_table(algorithm: str, dataset: str) -> str:
    """docs/domainbed.md's table: our hparams that DomainBed lacks, with the registry's defaults and valid values."""
    rows = ["| hparam | default | valid values |", "|---|---|---|"]
    for s in extra_hparams(algorithm, dataset):
        valid = ", ".join(map(str, s.choices)) if s.choices else f"[{s.low}, {s.high}]"
        rows.append(f"| `{s.name}` | {s.default!r} | {valid} |")
    return "\n".join(rows)


def test_domainbed_doc_lists_the_registry_hparams():
    doc = (REPO / "docs/domainbed.md").read_text()
    table = doc.split("<!-- hparams table -->\n", 1)[1].split("\n\n", 1)[0]
    assert table == hparams_table("DomainFusion", "PACS"), "paste this table:\n" + hparams_table("DomainFusion", "PACS")

    # The block is dataset-independent, so one table serves every DomainBed dataset.
    def block(dataset: str) -> list[tuple]:
        return [(s.name, s.default, s.low, s.high, s.choices) for s in extra_hparams("DomainFusion", dataset)]

    assert block("PACS") == block("RotatedMNIST")
