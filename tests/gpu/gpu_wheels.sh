#!/usr/bin/env bash
# Build the wheel folders that the GPU machine (device tool) lacks, in the project root; run it
# here (it needs PyPI), then carry the folders to the device with tests/gpu/gpu_check.sh.
#   .whl/       deepspeed (built here: PyPI has only its source), its deps the image lacks (hjson,
#               pydantic and its own), webdataset + braceexpand, nibabel, zstandard     (~14 MB)
#   .whl_bnb/   bitsandbytes (CUDA 13 kernels included)                             (~43 MB)
#   .whl_eval/  what evaluation imports: pycocoevalcap without its Java jars (BLEU, ROUGE-L and
#               CIDEr-D are Python; METEOR and the PTB tokenizer need Java, which the GPU image
#               lacks, so they are reported unavailable anyway), rouge-score + nltk      (~3 MB)
# Only what the GPU image lacks (/work/.library/device/KINDS.md lists its packages): pytest,
# pluggy, iniconfig, rich, pygments, absl-py, joblib, click are there and are NOT carried (a
# carried copy would shadow the image's). tests/gpu/gpu_check.sh needs .whl only (14 MB); the
# travelling tree is capped at 64 MiB: carry .whl_bnb / .whl_eval only in calls that need them.
# On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
# (tests/gpu/gpu_check.sh does this for .whl and .whl_bnb when carried).
# Checked on an H100 (torch 2.11+cu130) by the founding team: DeepSpeed 0.19.8 ZeRO-2/3 bf16 with
# "torch_adam": true, webdataset+zstd round trip, nibabel, bitsandbytes 0.50.2 nf4 forward/backward.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in .whl .whl_bnb .whl_eval; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"; done
rm -rf .whl .whl_bnb .whl_eval && mkdir -p .whl .whl_bnb .whl_eval
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl hjson pydantic pydantic-core annotated-types \
  typing-inspection webdataset braceexpand nibabel zstandard
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl_bnb "bitsandbytes==${BNB_VERSION:-0.50.2}"
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl_eval nltk
python3 -m pip wheel -q --no-deps -w .whl_eval "rouge-score==0.1.2"
# pycocoevalcap's wheel is 104 MB of Java jars: keep its Python files only.
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" "pycocoevalcap==1.2"
python3 - "$tmp"/pycocoevalcap-*.whl .whl_eval <<'PY'
import sys, zipfile, pathlib
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]) / pathlib.Path(sys.argv[1]).name
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not item.filename.endswith((".jar", ".gz", ".tgz")):
            zout.writestr(item, zin.read(item.filename))
print("slim", dst, dst.stat().st_size // 1024, "KiB")
PY
rm -rf "$tmp"
du -sh .whl .whl_bnb .whl_eval
