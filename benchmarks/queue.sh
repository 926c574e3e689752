#!/usr/bin/env bash
# Two queued MNIST experiments, one after the other (-j 1) against side by side (-j 2), on this machine's cores.
#   bash benchmarks/queue.sh [REPO]    # a checkout where `dvc repro` has run (prepared MNIST in its cache)
# Each pair takes seeds no run has used, so that DVC's run-cache cannot restore them instead of training:
# change the seeds below if this repository has already queued them. It leaves six experiments behind
# (`dvc exp remove -A` removes them).
set -euo pipefail
cd "${1:-.}"
source .venv/bin/activate 2>/dev/null || true
export SEGPIPE_MIRROR="$(realpath "${SEGPIPE_MIRROR:-../shared/mirror}")"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores, \
$(grep -q avx512_bf16 /proc/cpuinfo && echo 'AVX-512 with bf16' || (grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo AVX2))"
run_pair() {  # $1: -j; $2 $3: seeds; $4: extra -S
  local j=$1; shift
  for seed in "$1" "$2"; do
    dvc exp run --queue --name "q$j-s$seed" -S mnist.train.seed=$seed -S mnist.train.epochs=1 \
      -S mnist.train.samples_per_epoch=12000 ${3:+-S $3} >/dev/null
  done
  local start=$(date +%s.%N)
  dvc exp run --run-all -j "$j" >/dev/null 2>&1
  local end=$(date +%s.%N)
  local status=$(dvc queue status 2>/dev/null || true)
  echo "-j $j ${3:-threads: null}: $(echo "$end - $start" | bc) s"
  echo "$status" | grep -E 'q[0-9]-s' 
}
run_pair 1 201 202 ""
run_pair 2 203 204 ""
run_pair 2 205 206 "mnist.train.threads=2"
dvc queue stop >/dev/null 2>&1 || true
