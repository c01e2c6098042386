#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch but none of this project's own model libraries,
# and no network: what bench/gpu.sh imports beyond torch, torchvision, timm, numpy, Pillow,
# scikit-image, pyarrow, fsspec, PyYAML, tqdm and huggingface_hub. Downloaded here (where the
# package registry is reachable) into .whl/ (git-ignored), at the versions this checkout's
# .venv runs, for CPython $PYVER on manylinux x86-64 (SAM 2.1's: built, pure Python); on the
# GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=$PWD:/tmp/site PY=python3 bash bench/gpu.sh
#
#   bash bench/gpu_wheels.sh                 # PYVER=3.12 (the lent H200's python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PACKAGES="open_clip_torch segment-anything pycocotools ftfy wcwidth hydra-core omegaconf portalocker"
# SAM 2.1's: source distributions only, built here into pure wheels (sam2 without its CUDA
# extension, against this .venv's torch)
SDISTS="sam2 iopath antlr4-python3-runtime"
pinned() {
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
}
# shellcheck disable=SC2086  # one argument per name
pins=$(pinned $PACKAGES)
# shellcheck disable=SC2086
sdist_pins=$(pinned $SDISTS)
rm -rf "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${platforms[@]}" -d "$DEST" $pins
# shellcheck disable=SC2086
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" $sdist_pins
ls "$DEST"
du -sh "$DEST"
