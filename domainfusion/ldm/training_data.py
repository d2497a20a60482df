"""What an LDM trains on: the digit corpus or a dataset's environments (or their in-splits) as uint8 images with
captions, grid prompts and VAE check images, prepared before the trainer (`training.py`) starts.

Images are kept as uint8 (N, H, W, 3) at the model's resolution, the compact form the trainer batches from and
fingerprints; any torch dataset can be turned into training data (`dataset_training_data`), which is how DSI
fine-tunes on a run's in-splits (read once, each image with torch's RNG seeded by (seed, its index), so random
training augmentation draws the same on every run).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..data.loaders import domain_of
from ..data.pool import subset_chunks
from ..errors import UserError
from ..images import to_uint8
from .adapt import default_prompt_template, to_ldm_images
from .corpus import build_corpus, digit_prompt, split_corpus
from .train_config import LDMTrainConfig

CONVERT_BATCH = 256  # images resized to the LDM's resolution at once (256 at 512 px: 0.8 GB in fp32)


@dataclass
class TrainingData:
    """Training images as uint8 (N, H, W, 3), one caption per image, the prompts that head grid rows, images for
    the VAE check (the corpus's held-out part; a dataset has none, so its first training images), and per image the
    class prompt alone (for `style_dropout`; None where the data has no such prompt)."""

    images: torch.Tensor
    captions: list[str]
    grid_prompts: list[str]
    check_images: torch.Tensor
    class_captions: list[str] | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the images and captions: a resumed or reused run must have trained on exactly these (hashed
        once per object, however many callers check it)."""
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        h.update(json.dumps(self.captions).encode())
        return h.hexdigest()


def load_training_data(config: LDMTrainConfig, resolution: int) -> TrainingData:
    """The corpus's training part, or the chosen environments (or their in-splits) of a dataset resized to
    `resolution`, with captions."""
    if config.data == "corpus":
        train, held_out = split_corpus(build_corpus(config.data_dir, config.corpus_size, config.corpus_seed))
        if resolution != train.images.shape[1]:
            raise UserError(
                f"the digit corpus is {train.images.shape[1]}x{train.images.shape[1]}; the model works "
                f"on {resolution}x{resolution} images: train it on a dataset instead"
            )
        k = config.max_images or len(train.labels)
        return TrainingData(
            torch.from_numpy(train.images[:k]),
            train.captions[:k],
            [digit_prompt(d) for d in range(10)],
            torch.from_numpy(held_out.images[:1000]),
            [digit_prompt(int(y)) for y in train.labels[:k]],
        )
    from ..data import get_dataset
    from ..data.loaders import holdout_split

    dataset = get_dataset(
        config.data,
        config.data_dir,
        config.test_envs,
        {"data_augmentation": False},
        allow_missing_classes=True,
        image_size=resolution,
    )
    envs = (
        [i for i in range(len(dataset)) if i not in config.test_envs]
        if config.envs is None
        else [_env_index(dataset.environments, e) for e in config.envs]
    )
    if set(envs) & set(config.test_envs):
        names = [dataset.environments[i] for i in sorted(set(envs) & set(config.test_envs))]
        raise UserError(
            f"environment(s) {names} are held out (--test-envs): an LDM for this run must not train on them"
        )
    splits = [
        dataset[i]
        if config.holdout_fraction is None
        else holdout_split(dataset[i], i, config.holdout_fraction, config.trial_seed, dataset.environments[i])[1]
        for i in envs
    ]
    template = config.caption_template or default_prompt_template(config.data)
    return dataset_training_data(
        splits,
        [dataset.environments[i] for i in envs],
        dataset.class_names,
        template,
        resolution,
        config.max_images,
        config.seed,
    )


def _env_index(environments: list[str], env: int | str) -> int:
    if isinstance(env, int) and 0 <= env < len(environments):
        return env
    if env in environments:
        return environments.index(env)
    raise UserError(
        f"unknown environment {env!r}; this dataset has {', '.join(environments)} (or indices 0-"
        f"{len(environments) - 1})"
    )


def dataset_training_data(
    splits: list[Dataset],
    domains: list[str],
    class_names: list[str],
    template: str,
    resolution: int,
    max_images: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> TrainingData:
    """Any torch datasets of (image in [0, 1], label) as LDM training data; caption = `template` with {cls} and
    optional {domain}. DSI fine-tunes on a run's in-splits this way, so no image outside them is ever read.

    The images are read as the LDM's other inputs are (`pool.subset_chunks`: image i of the concatenated splits with
    torch's RNG seeded by (seed, i), by `num_workers` loader processes): a split's random training augmentation
    (DomainBed's on image folders) draws the same on every run, and the global RNG is not touched."""
    images, captions = [], []
    for images_u8, labels, sources in subset_chunks(splits, 1.0, seed, num_workers):
        for part in images_u8.split(CONVERT_BATCH):  # at the LDM's resolution one part at a time
            images.append(to_uint8(to_ldm_images(part.float().div(255), resolution), channels_last=True))
        envs = domain_of(splits, sources)
        captions += [template.format(cls=class_names[int(c)], domain=domains[int(e)]) for c, e in zip(labels, envs)]
    stacked = torch.cat(images)[:max_images]
    grid = [template.format(cls=c, domain=domains[0]) for c in class_names]
    return TrainingData(stacked, captions[: len(stacked)], grid, stacked[:1000])
