#!/usr/bin/env bash
# GPU checks and figures in one run, for a machine lent with one CUDA GPU (about 8 minutes),
# most wanted first, each step capped by what is left of BUDGET_S (skipped under its minimum):
# the tests marked `gpu` (Triton's after the benchmarks: their first run compiles every kernel
# variant), bench/models.py eager (float32, then bfloat16 autocast; AN as by default, whose
# training step takes the Triton kernels, and on plain ops; in inference also the deployed
# model, --fused), the same with each step one
# replayed CUDA graph (--cuda-graphs: the GPU's time alone), bench/profile_step.py (how much of
# a step the GPU computes, and AN's extra kernels), bench/site_host.py (one site's host time),
# bench/an_layer.py (the same two),
# a short `an-search run` on CUDA, and last bench/models.py under torch.compile.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # logs land in OUT_DIR (default: $OUT or /tmp/an-gpu)
#   STEPS="compile" BUDGET_S=500 bash bench/gpu_check.sh   # some steps only (names below); the
#                                  # compile rows took over 200 s on an H100 (3 models, 2 modes)
#
# Where the project is not installed (a bare machine), put its dependencies on PYTHONPATH first;
# `.devsite/` beside this repository, if present, is used for that. A machine with PyTorch,
# Triton, timm, typer and rich but no Optuna or fvcore (Python 3.12) takes this one, built
# where pip works (git-ignore it locally, carry it along):
#   pip download -d /tmp/w --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     optuna alembic sqlalchemy greenlet mako colorlog yacs termcolor
#   pip download -d /tmp/w --no-deps --no-binary=:all: fvcore iopath
#   for w in /tmp/w/*.whl; do unzip -qo "$w" -d .devsite; done
#   for s in /tmp/w/*.tar.gz; do tar xzf "$s" -C /tmp/w; done
#   cp -r /tmp/w/fvcore-*/fvcore /tmp/w/iopath-*/iopath .devsite/
set -u
OUT_DIR=${1:-${OUT:-/tmp/an-gpu}}
mkdir -p "$OUT_DIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/.devsite:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-470}  # seconds for the whole script
STEPS=" ${STEPS:-tests models graphs profile host layer triton search compile} "
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
want() { [[ "$STEPS" == *" $1 "* ]]; }
# capped MIN CAP LOG CMD...: run CMD (output appended to LOG) for at most CAP seconds and at most
# what is left, or skip it when less than MIN seconds are left.
capped() {
  local min=$1 cap=$2 log=$3 t
  shift 3
  t=$(left)
  echo "=== $* (t=$((SECONDS - START)) s, $t s left)"
  if [ "$t" -lt "$min" ]; then echo "skipped: under $min s left"; return; fi
  [ "$t" -gt "$cap" ] && t=$cap
  timeout "$t" "$@" 2>&1 | tee -a "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "exit $rc$([ "$rc" -eq 124 ] && echo ': cut at its cap')" \
    | tee -a "$OUT_DIR/$log"
}

nvidia-smi -L
"$PY" -c "import torch, timm, optuna, fvcore, triton; print('torch', torch.__version__, 'timm', \
timm.__version__, 'optuna', optuna.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())"

PYTEST=("$PY" -m pytest -p no:cacheprovider -m gpu -rfE)
want tests && capped 40 120 pytest_gpu.log "${PYTEST[@]}" -v -k "not triton or direct" \
  tests/test_cuda.py tests/search/test_ddp.py
for amp in "" --amp; do
  want models && capped 50 100 models.txt "$PY" bench/models.py --device cuda --batch 64 \
    --repeats 15 --warmup 3 --ops --fused $amp
done
for amp in "" --amp; do  # each step one replayed CUDA graph: the GPU's time without the host
  want graphs && capped 50 100 models_graphs.txt "$PY" bench/models.py --device cuda --batch 64 \
    --repeats 15 --warmup 3 --cuda-graphs $amp
done
for opts in "" --amp "--amp --channels-last"; do
  # shellcheck disable=SC2086  # (opts: words)
  want profile && capped 40 60 profile.txt "$PY" bench/profile_step.py --device cuda --batch 64 \
    --steps 10 --top 16 $opts
done
want models && capped 50 100 models.txt "$PY" bench/models.py --device cuda --batch 64 \
  --repeats 15 --warmup 3 --amp --channels-last  # as an-search trains on CUDA
for mode in auto on; do  # one site's host time a call: folded eval vs Triton site
  want host && capped 20 40 site_host.txt "$PY" bench/site_host.py --triton $mode
done
for mode in auto off; do
  want layer && capped 30 45 an_layer.txt "$PY" bench/an_layer.py --device cuda --repeats 50 \
    --warmup 5 --plain --triton $mode
done
want triton && capped 40 100 pytest_triton.log "${PYTEST[@]}" -q -k triton tests/test_cuda.py
want search && capped 50 70 search.log "$PY" -m cli.search run resnet10t --device cuda \
  --n-trials 4 --epochs 2 --batches-per-epoch 20 --val-fraction 0.25 --output /tmp/an-gpu-run -q
for mode in infer train; do  # inference first: its graphs compile without a backward
  want compile && capped 60 600 models_compile.txt "$PY" bench/models.py --device cuda \
    --batch 64 --repeats 15 --warmup 3 --compile --amp --modes $mode
done
echo "=== done (t=$((SECONDS - START)) s)"
