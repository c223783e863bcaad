#!/usr/bin/env bash
# Issue 10's GPU figures in one command (docs/BENCHMARKS.md, "Dense search and candidate mode on a GPU"):
#   bash experiments/gpu_paper_scale.sh OUT
# from the repository root, PYTHONPATH holding it. Stages, each with a hard time limit, each writing what it
# prints to OUT/<stage>.txt as it goes (partial results survive a later failure):
#   env         device, versions
#   dense       experiments/bench_full_search.py: frames x rotations of the n = 70 grid by photon-peak tests
#   candidates  experiments/bench_paper_scale.py: candidate mode (direct path), set-up and iterations
# DATA: the simulated paper-geometry frames (default .gpudata/paper1000.h5, made on a CPU by
# experiments/bench_paper_scale.py --data or simulate_candidates). TINY=1: a few frames and small chunks, a
# check of the script on a CPU in a few minutes. DENSE_S / CANDIDATES_S: the stages' time limits (seconds).
set -u
OUT=${1:?usage: bash experiments/gpu_paper_scale.sh OUT}
DATA=${DATA:-.gpudata/paper1000.h5}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAX_ENABLE_COMPILATION_CACHE=false
export JAX_COMPILATION_CACHE_DIR=/tmp/emcjax-jax-cache
if [ "${TINY:-0}" = 1 ]; then
  DENSE_ARGS=(--frames 8 --chunks 16 --passes 1 2 --seconds 1 --pool 64 --row-records 64)
  CANDIDATE_ARGS=(--frames 8 --iters 1 --block-frames 8 --error-rotations 0)
else
  DENSE_ARGS=(--frames 1000 --chunks 1024 4096 --passes 1 2 --seconds 4 --pool 8192 --row-records 64)
  CANDIDATE_ARGS=(--frames 1000 --iters 2 --block-frames 1000 --error-rotations 0)
fi

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $* (limit ${limit} s, load $(cut -d' ' -f1 /proc/loadavg))" | tee "$OUT/$name.txt"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s wall" | tee -a "$OUT/$name.txt"
}

if [ ! -f "$DATA" ]; then
  echo "no data set at $DATA (set DATA=...; simulate it on a CPU first, docs/BENCHMARKS.md)" | tee "$OUT/env.txt"
  exit 2
fi
stage env 60 bash -c 'date -u; nproc; (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true);
  python3 -c "import sys, jax, jaxlib, numpy; print(sys.version.split()[0], \"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"numpy\", numpy.__version__); print(jax.devices())"'
stage dense "${DENSE_S:-180}" python3 experiments/bench_full_search.py --data "$DATA" "${DENSE_ARGS[@]}"
stage candidates "${CANDIDATES_S:-220}" python3 experiments/bench_paper_scale.py --data "$DATA" "${CANDIDATE_ARGS[@]}"
echo "total $SECONDS s wall"
