#!/usr/bin/env bash
# Every GPU measurement of the project in one prepared call (GPU time is scarce): the large-model
# benchmark, the small-model sweep and path patching on the GPU, and the device-map check split between
# cuda:0 and cpu. Results (JSON) and a log go to $OUT (the device tool's folder) or benchmarks/results/gpu.
#   bash benchmarks/gpu_session.sh           # needs nnsight and transformer-lens importable, or wheels in .whl/
set -u
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu LARGE_ARGS=--small: a dry run of this script on a CPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then  # the GPU box has no nnsight / transformer-lens: install the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
step() {  # step SECONDS NAME COMMAND...: one bounded step; a failure is logged and the session goes on
  local t=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@"; echo "=== $name exit $? ($(date +%T))"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, nnsight; print('torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  step 120 device_map python3 benchmarks/check_device_map.py --out "$OUT/device_map.json"
  step 150 sweep_small python3 benchmarks/bench_sweep.py --device "$DEVICE" --no-memory --out "$OUT/sweep_small.json"
  step 60 path_small python3 benchmarks/bench_path.py --device "$DEVICE" --out "$OUT/path_small.json"
  step 240 large python3 benchmarks/bench_large.py --device "$DEVICE" ${LARGE_ARGS:-} --out "$OUT/large.json"
} 2>&1 | tee "$OUT/log.txt"
