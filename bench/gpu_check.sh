#!/usr/bin/env bash
# GPU checks and figures in one run, for a machine lent with one CUDA GPU (about 8 minutes):
# the tests marked `gpu`, bench/an_layer.py (fused and reference AN paths), bench/models.py
# (eager float32 and bfloat16 autocast, then torch.compile), and a short `an-search run` on CUDA.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # logs land in OUT_DIR (default: $OUT or /tmp/an-gpu)
#
# Where the project is not installed (a bare machine), put its dependencies on PYTHONPATH first;
# `.devsite/` beside this repository, if present, is used for that.
set -u
OUT_DIR=${1:-${OUT:-/tmp/an-gpu}}
mkdir -p "$OUT_DIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/.devsite:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-500}  # seconds for the whole script; the compile step gets what is left
START=$SECONDS
step() { echo "=== $* (t=$((SECONDS - START)) s)"; }
left() { echo $((BUDGET - (SECONDS - START))); }

step environment
nvidia-smi -L
"$PY" -c "import torch, timm, optuna, fvcore; print('torch', torch.__version__, 'timm', \
timm.__version__, 'optuna', optuna.__version__, torch.cuda.get_device_name())"

step "tests marked gpu"
timeout 170 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py \
  tests/search/test_ddp.py 2>&1 | tee "$OUT_DIR/pytest_gpu.log" | tail -n 12

step "bench/an_layer.py (fused, reference path, Triton kernels)"
for flag in "" --unfused --triton; do
  timeout 50 "$PY" bench/an_layer.py --device cuda --repeats 50 --warmup 5 --plain $flag 2>&1 \
    | tee -a "$OUT_DIR/an_layer.txt"
done

step "bench/models.py eager (float32, then bfloat16 autocast), plain and Triton AN"
for flag in "" --amp; do
  timeout 100 "$PY" bench/models.py --device cuda --batch 64 --repeats 15 --warmup 3 --triton $flag 2>&1 \
    | tee -a "$OUT_DIR/models.txt"
done

step "an-search run on CUDA"
timeout 80 "$PY" -m cli.search run resnet10t --device cuda --n-trials 4 --epochs 2 \
  --batches-per-epoch 20 --val-fraction 0.25 --output /tmp/an-gpu-run -q 2>&1 \
  | tee "$OUT_DIR/search.log" | tail -n 25

step "bench/models.py with torch.compile (bfloat16 autocast), $(left) s left"
timeout "$(left)" "$PY" bench/models.py --device cuda --batch 64 --repeats 15 --warmup 3 \
  --compile --amp 2>&1 | tee -a "$OUT_DIR/models_compile.txt"
step done
