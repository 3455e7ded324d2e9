#!/usr/bin/env bash
# All GPU benchmark cases in one go (the lines recorded in README's Performance section).
# Usage: bash bench/gpu_all.sh [LOGDIR]   (each script's JSON lines also go to LOGDIR/bench.jsonl)
set -o pipefail
export PYTHONUNBUFFERED=1
log=${1:-.}/bench.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
cd "$(dirname "$0")"
python3 bench_generate.py | tee -a "$log"
python3 bench_generate.py --dtype fp32 | tee -a "$log"
python3 bench_scan.py 2>/dev/null | tee -a "$log"
python3 bench_train.py --compile | tee -a "$log"
python3 bench_scale.py 2>/dev/null | tee -a "$log"
