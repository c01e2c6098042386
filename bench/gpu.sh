#!/usr/bin/env bash
# The full-size GPU figures of stage 1 in one go: the paper's architectures with random
# weights (nothing is downloaded), on one CUDA device. Steps run most telling first; each
# has its own time limit and none starts past the whole run's deadline, so a step that hangs
# costs only itself and the run ends within DEADLINE_S. Everything printed is also appended
# to $LOG.
#
#   make bench-gpu                                   # this checkout's .venv
#   IMAGES=8 STEP_S=90 DEADLINE_S=400 bash bench/gpu.sh
#
# On a GPU machine with PyTorch but no network (the lent H200: python3 3.12 with torch,
# torchvision, timm, ...): `bash bench/gpu_wheels.sh` here first, carry .whl/ there, and run
#   PY=python3 LOG=$OUT/gpu-bench.log bash bench/gpu.sh
# which installs the wheels into /tmp/site when the model libraries are missing.
#
# 1. bench/stage1.py: our stages vs. the per-image fp32 loop with the stock generator
#    (throughput ratio, peak GPU memory of each path), with --keep-all (random weights keep
#    few masks at METHOD's thresholds), at METHOD's thresholds, and with SAM's image
#    encoder in fp32 instead of bf16 (what the autocast buys).
# 2. bench/sam2_vs_sam.py: both SAM stages with SAM ViT-H vs SAM 2.1 Hiera-L as the teacher.
# 3. bench/sam_post.py: the SAM stages' records built in the post thread vs after SAM.
# 4. bench/sam_auto.py, bench/sam_pair.py: SAM ViT-H automatic masks and both SAM stages.
# 5. bench/models.py: dense CLIP ViT-L/14@336, one trunk pass vs. two.
#
# DRY_RUN=1 prints each step's command line (one per line) and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=${LOG:-gpu-bench.log}
IMAGES=${IMAGES:-16}
STEP_S=${STEP_S:-150}
DEADLINE_S=${DEADLINE_S:-540}
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # fmbseg from this tree, installed or not

DRY_RUN=${DRY_RUN:-}
if [ -z "$DRY_RUN" ] && ! "$PY" -c "import open_clip, segment_anything, pycocotools, sam2" 2>/dev/null; then
    [ -d .whl ] || { echo "open_clip/segment_anything/pycocotools/sam2 missing and no .whl/" \
        "(bash bench/gpu_wheels.sh)" | tee -a "$LOG"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1  # else every step would fail on its imports
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step() {
    local left=$((DEADLINE_S - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "### skipped, ${left} s left of DEADLINE_S=$DEADLINE_S: $*" | tee -a "$LOG"
        return
    fi
    if [ -n "$DRY_RUN" ]; then
        echo "$*"
        return
    fi
    local limit=$((left < STEP_S ? left : STEP_S))
    echo "### $* (limit ${limit} s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$PY" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "### rc=$rc, $((SECONDS - start)) s" | tee -a "$LOG"
}

[ -n "$DRY_RUN" ] || "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), torch.__version__)" 2>&1 | tee -a "$LOG" || exit 1
STAGE1=(bench/stage1.py --config default --device cuda --images "$IMAGES" --size 480x640)
step "${STAGE1[@]}" --keep-all
step "${STAGE1[@]}"
step bench/sam2_vs_sam.py --config default --device cuda --images "$IMAGES" --size 480x640 \
    --sam sam_vit_h sam2.1_hiera_l --keep-all
step bench/sam_post.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640 \
    --keep-all
step "${STAGE1[@]}" --keep-all --set models.sam_precision=fp32
step bench/sam_auto.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
step bench/sam_pair.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
step bench/models.py clip_vit_l14_336 cuda 16
step bench/models.py clip_vit_l14_336 cuda 16 sclip
