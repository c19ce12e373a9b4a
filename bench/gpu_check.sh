#!/usr/bin/env bash
# One GPU check, RANDOM WEIGHTS (paper-size architectures): on one H100/H200 with torch, transformers,
# sentence-transformers, timm, safetensors, pillow and pyarrow installed, plus the small pure-Python
# packages below carried as a folder (make gpu-carry writes out/gpu-carry here). Within 10 minutes:
#   1. builds the paper-size random models on the GPU (BLIP-2 OPT-6.7B included), into $MODELS;
#   2. bench/bench_gpu.py: each model stage alone, then the three sharing the GPU (images/s, peak memory);
#   3. bench/bench_train_gpu.py: 20 bf16 training steps at 512 px, batch 16 (s/step, images/s, peak memory).
# Usage (repository root): bash bench/gpu_check.sh        env: MODELS, CARRY, OUT (tables copied there)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-out/gpu-carry}
MODELS=${MODELS:-/tmp/subject-ffhq-paper-shapes}
RESULTS=${OUT:-out/gpu-check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD:$PWD/$CARRY${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false SUBJECT_FFHQ_PAPER_SHAPES="$MODELS"
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$RESULTS/gpu_check.log"; }
log "RANDOM WEIGHTS: paper-size architectures; speed and memory only"
$PY - <<'PY' 2>&1 | tee -a "$RESULTS/gpu_check.log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
print("bf16 supported:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for m in ("transformers", "diffusers", "open_clip", "sentence_transformers", "webdataset", "timm", "safetensors", "pyarrow"):
    print(m, getattr(importlib.import_module(m), "__version__", "?"))
PY
log "1/3 building the paper-size models in $MODELS"
start=$(date +%s)
timeout 240 $PY -c "
from pathlib import Path
from fixtures.tiny_models.paper_size import build_paper_all
build_paper_all(Path('$MODELS'), include_blip2=True)
" 2>&1 | tail -5 | tee -a "$RESULTS/gpu_check.log"
log "built in $(( $(date +%s) - start )) s"
log "2/3 bench_gpu.py: each stage alone, then sharing the GPU"
timeout 200 $PY bench/bench_gpu.py --models "$MODELS" --images 64 --repeats 1 2>&1 | tee "$RESULTS/bench_gpu.txt" | tail -30
log "3/3 20 bf16 training steps at 512 px, batch 16"
timeout 150 $PY bench/bench_train_gpu.py --models "$MODELS" --steps 20 --batch-size 16 --resolution 512 \
  2>&1 | grep -v "Loading weights" | tee "$RESULTS/bench_train_gpu.txt" | tail -8
log "done in $(( $(date +%s) - start )) s; tables in $RESULTS"
