#!/usr/bin/env bash
# The full-size GPU figures of stage 1 in one go: the paper's architectures with random
# weights (nothing is downloaded), on one CUDA device. Each step has its own time limit, so
# a step that hangs costs only itself; everything printed is also appended to $LOG.
#
#   bash bench/gpu.sh                 # LOG=gpu-bench.log, IMAGES=32, STEP_S=300
#   IMAGES=16 STEP_S=120 bash bench/gpu.sh
#
# 1. bench/stage1.py: our stages vs. the per-image fp32 loop with the stock generator
#    (throughput ratio, peak GPU memory of each path), at METHOD's thresholds and with
#    --keep-all (random weights keep few masks at METHOD's thresholds), and with SAM's
#    image encoder in fp32 instead of bf16 (what the autocast buys).
# 2. bench/sam_auto.py, bench/sam_pair.py: SAM ViT-H automatic masks and both SAM stages;
#    bench/sam_post.py: the records built while SAM runs on the next image, or after it.
# 3. bench/models.py: dense CLIP ViT-L/14@336, one trunk pass vs. two.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=${LOG:-gpu-bench.log}
IMAGES=${IMAGES:-32}
STEP_S=${STEP_S:-300}
export PREFECT_SERVER_ANALYTICS_ENABLED=false

step() {
    echo "### $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$STEP_S" "$PY" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "### rc=$rc, $((SECONDS - start)) s" | tee -a "$LOG"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), torch.__version__)" 2>&1 | tee -a "$LOG" || exit 1
step bench/stage1.py --config default --device cuda --images "$IMAGES" --size 480x640
step bench/stage1.py --config default --device cuda --images "$IMAGES" --size 480x640 --keep-all
step bench/stage1.py --config default --device cuda --images "$IMAGES" --size 480x640 --keep-all \
    --set models.sam_precision=fp32
step bench/sam_auto.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
step bench/sam_pair.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
step bench/sam_post.py --model sam_vit_h --device cuda --points-per-side 32 --size 480x640
step bench/models.py clip_vit_l14_336 cuda 16
step bench/models.py clip_vit_l14_336 cuda 16 sclip
