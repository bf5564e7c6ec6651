#!/usr/bin/env bash
# The gpu-scale reproduction as one bounded call on a lent GPU machine (GPU time is scarce).
#   MODE=smoke: the whole pipeline at tiny scale with 2 seeds on the device (every code path on CUDA),
#               and training throughput of the attn-2l preset, 1 process against 8 sharing the card.
#   MODE=full:  `reproduce --scale gpu` (7 models x 3 seeds), then its tables, report and figures.
#   MODE=both:  the tiny run first (stops there if it fails), then the full one.
#   SMOKE_BG=1 (with MODE=full): the tiny run beside the full one, its log in $OUT/tiny_bg.log.
# The GPU machine's Python ships a different stdlib (a different corpus): carry this machine's as
# .corpus/stdlib.tgz (python -m experiments.pack_corpus .corpus/stdlib.tgz; name .corpus in carry).
# Results go to $OUT (the device tool's folder) or results/gpu_session as archives: tables.tgz
# (CSV/JSON/Markdown, no checkpoints or arrays), pca.tgz (the PCA's per-token-loss arrays) and figures.tgz.
#   DEVICE=cpu MODE=smoke bash experiments/gpu_reproduce.sh    # a dry run of this script on a CPU
set -u
OUT=${OUT:-results/gpu_session}
MODE=${MODE:-smoke}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}  # seconds for the full reproduction; what finished by then is kept (it resumes)
# The full job needs ~13 min of GPU time (measured on an H200, 2026-11-26: training 5.4 min, 1,224 checkpoints
# evaluated at ~3.8/s, the rest 1.5 min, figures ~1.5 min on one core), more than one 10-minute call: run
# MODE=full twice in a row (the machine stays warm for 30 s between calls); the second resumes at the first
# step not done. If the second call ends while drawing, `python -m experiments report` draws the figures and
# the report from the returned tables on any machine (figures/gpu was made so).
WORK=${WORK:-results/gpu_work}  # inside the repo, ignored: a warm machine keeps it, so a second call resumes
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CORPUS_ARGS=()
if [ -f .corpus/stdlib.tgz ]; then  # this machine's stdlib corpus (python -m experiments.pack_corpus .corpus/stdlib.tgz)
  mkdir -p "$WORK/corpus" && tar xzf .corpus/stdlib.tgz -C "$WORK/corpus" && CORPUS_ARGS=(--corpus "$WORK/corpus/stdlib")
fi
if [ -d .whl ] && [ "$DEVICE" != cpu ]; then  # the GPU machine has no nnsight: install the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
pack() {  # pack NAME DIR: the tables (no checkpoints, arrays or tokenizer caches) and figures of DIR
  (cd "$2" 2>/dev/null && tar czf "$OUT/$1_tables.tgz" --exclude='runs/*/checkpoints' --exclude='*.npy' \
     --exclude='runs/*/tokenizer' --exclude='loss_by_index*' --exclude=figures . 2>/dev/null)
  (cd "$2" 2>/dev/null && tar czf "$OUT/$1_loss_by_index.tgz" phase_change/loss_by_index.csv 2>/dev/null)
  # the per-token losses the PCA is fit on (float32, ~0.4 MB a run): without them `report` draws no PCA
  (cd "$2" 2>/dev/null && tar czf "$OUT/$1_pca.tgz" phase_change/per_token_losses_*.npy 2>/dev/null)
  [ -d "$2/figures" ] && (cd "$2/figures" && tar czf "$OUT/$1_figures.tgz" .)
  ls -la "$OUT"
}
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
  "$PY" -c "import torch, transformers, nnsight, pandas, seaborn, scipy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)"
  if [ "$MODE" != full ]; then
    echo "=== tiny, 2 seeds ($(date +%T))"
    timeout "${TINY_BUDGET:-300}" "$PY" -m experiments reproduce --scale tiny --seeds 2 --device "$DEVICE" \
      --out "$WORK/tiny" --quiet > "$WORK/tiny.log" 2>&1
    rc=$?; echo "=== tiny exit $rc ($(date +%T))"; tail -n 40 "$WORK/tiny.log"
    [ "$MODE" = both ] && [ $rc -ne 0 ] && { cp "$WORK/tiny.log" "$OUT/"; exit 1; }
  fi
  if [ "$MODE" = smoke ]; then
    pack tiny "$WORK/tiny"
    TOK=${TOK:-2000000}
    for n in 1 8; do
      echo "=== throughput: $n process(es) x $TOK tokens of attn-2l ($(date +%T))"
      rm -rf "$WORK"/thr"$n"-*  # a second smoke call on a warm machine: fresh runs (train refuses a used --out)
      start=$(date +%s.%N)
      pids=()
      for i in $(seq "$n"); do
        timeout 200 "$PY" -m experiments train --preset attn-2l --tokens "$TOK" --device "$DEVICE" --seed "$i" \
          --out "$WORK/thr$n-$i" --quiet > "$WORK/thr$n-$i.log" 2>&1 &
        pids+=($!)
      done
      failed=0
      for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
      end=$(date +%s.%N)
      if [ "$failed" -eq 0 ]; then  # a run that failed or timed out did not train TOK tokens: no rate
        "$PY" -c "import sys; n, t, s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3]); print(f'{n} process(es): {s:.1f} s wall, {n * t / s / 1e6:.2f}M tokens/s together')" "$n" "$TOK" "$start" "$end"
      else
        echo "$n process(es): $failed of $n runs failed or timed out: no throughput (see $WORK/thr$n-*.log)"
      fi
      tail -n 3 "$WORK/thr$n-1.log"
    done
  else
    if [ "${SMOKE_BG:-0}" = 1 ]; then  # every code path on CUDA at tiny scale, beside the full job (its log comes back)
      (timeout 300 "$PY" -m experiments reproduce --scale tiny --seeds 2 --device "$DEVICE" --out "$WORK/tiny_bg" \
         --quiet > "$OUT/tiny_bg.log" 2>&1; echo "=== background tiny exit $? ($(date +%T))" >> "$OUT/tiny_bg.log") &
    fi
    echo "=== reproduce --scale gpu ($(date +%T))"
    timeout "$BUDGET" "$PY" -m experiments reproduce --scale gpu --device "$DEVICE" --out "$WORK/gpu" "${CORPUS_ARGS[@]}" \
      --figures "$WORK/gpu/figures" > "$WORK/gpu.log" 2>&1
    echo "=== reproduce exit $? ($(date +%T))"
    tail -c 6000 "$WORK/gpu.log"; cp "$WORK/gpu.log" "$OUT/reproduce.log"
    pack gpu "$WORK/gpu"
    wait  # the background tiny run, if any
  fi
} 2>&1 | tee "$OUT/log.txt"
