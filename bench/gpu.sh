#!/usr/bin/env bash
# bench/gpu.sh: rsrepro's pre-training speed on a CUDA device, in under 5 minutes on an H100/H200-class GPU.
#
# What it measures (one pre-training step = forward, backward, AdamW; images/s, counted FLOPs per step, achieved
# TFLOP/s and MFU = achieved / the device's measured bf16 matmul peak):
#   1. switches.md   ViT (MAE ViT-T/16, `mae`) and Swin (imim's interactive Swin-T MIM, `imim_interactive`) under each
#                    speed switch alone and all together: fp32, bf16 autocast, torch.compile, fused AdamW, the SDPA
#                    flash path (with bf16), and all of them.
#   2. methods.md    every pre-training method of rsrepro.bench.BENCH_METHODS with bf16 + fused AdamW + flash SDPA.
#   3. reference.md  rsrepro's MAE beside facebookresearch/mae's models_mae.py (same config, batch 32, bf16 autocast
#                    for both, steps interleaved in one process), once plain and once with rsrepro's switches on.
#                    Needs a snapshot of the official repo given by path (never downloaded): --reference DIR or
#                    $MAE_REFERENCE. Without one this stage is skipped and the file says so.
# Goals (issue 12): >= 1.3x the official MAE step, and >= 40% MFU for ViT and Swin pre-training.
# Results go to bench/results/<device>/ (override with $BENCH_OUT), one markdown file per stage.
#
# Usage: bench/gpu.sh [--cpu] [--reference DIR]
#   --cpu  a test run on CPU: batch 2, one timed step, and only the variants that need no CUDA (fp32, fused AdamW);
#          it checks the script end to end, its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU=0; REF="${MAE_REFERENCE:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --reference) REF="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
RS=("$PY" -c 'import sys; from rsrepro.cli import main; sys.exit(main())')
if [ "$CPU" = 1 ]; then
  DEV=cpu; SIZE=(--batch-size 2 --steps 1 --warmup 1); RSIZE=(--reference-batch-size 2 --steps 1 --warmup 1)
  VARIANTS=(fp32 fused_adamw); SKIP=(--skip-cuda-only); BEST=(--amp none --fused)
else
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device here (use --cpu to test the script)")'
  DEV=cuda; SIZE=(); RSIZE=(); VARIANTS=(fp32 bf16 compile fused_adamw flash all); SKIP=(); BEST=(--amp bf16 --fused --sdpa flash)
fi
SLUG="$("$PY" -c "from rsrepro.bench import device_slug; print(device_slug('$DEV'))")"
OUT="${BENCH_OUT:-bench/results/$SLUG}"; mkdir -p "$OUT"
echo "bench/gpu.sh on $SLUG -> $OUT"
T0=$SECONDS
"${RS[@]}" bench --device $DEV --models mae imim_interactive --variants "${VARIANTS[@]}" "${SKIP[@]}" "${SIZE[@]}" \
  --format md --out "$OUT/switches.md"
"${RS[@]}" bench --device $DEV "${BEST[@]}" "${SIZE[@]}" --format md --out "$OUT/methods.md"
if [ -n "$REF" ]; then
  { "${RS[@]}" bench --device $DEV --models none --reference "$REF" --amp "${BEST[1]}" "${RSIZE[@]}" --format md
    echo
    if [ "$CPU" = 1 ]; then SW=(--fused); else SW=(--compile --fused --sdpa flash); fi
    "${RS[@]}" bench --device $DEV --models none --reference "$REF" --amp "${BEST[1]}" "${SW[@]}" "${RSIZE[@]}" --format md
  } | grep -v '^written to' > "$OUT/reference.md.tmp" && mv "$OUT/reference.md.tmp" "$OUT/reference.md"
else
  echo "No facebookresearch/mae snapshot was given (--reference DIR or \$MAE_REFERENCE): the side-by-side was not run." \
    > "$OUT/reference.md"
fi
echo "bench/gpu.sh: done in $((SECONDS - T0)) s; results in $OUT"
