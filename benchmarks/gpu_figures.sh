#!/usr/bin/env bash
# Issue 12's GPU figures in one prepared run (e.g. on the project's lent H200): Conceptrol vs the stock pipeline,
# time per step and peak memory, random weights at real size. Results: one JSON per row in ${OUT:-gpu-figures}.
#   bash benchmarks/gpu_figures.sh sd     # SD 1.5 and SDXL, fp16 and bf16, eager and compiled (about 6 minutes)
#   bash benchmarks/gpu_figures.sh flux   # FLUX OminiControl at 512 and 1024, XLabs / Kontext / Redux at 1024 (bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-figures}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rows=${1:-sd}
if [[ $rows == sd || $rows == all ]]; then
  for model in sd15 sdxl; do
    for dtype in fp16 bf16; do
      python benchmarks/overhead.py --device cuda --dtype $dtype --model $model --steps 8 --repeats 3 \
        --json "$out/$model-$dtype.json"
      python benchmarks/overhead.py --device cuda --dtype $dtype --model $model --steps 8 --repeats 3 --compile \
        --json "$out/$model-$dtype-compiled.json"
    done
  done
fi
if [[ $rows == flux || $rows == all ]]; then
  for size in 512 1024; do
    python benchmarks/overhead_flux.py --device cuda --dtype bf16 --size $size --repeats 5 | tee "$out/flux-ominicontrol-$size.txt"
  done
  python benchmarks/overhead_flux_adapters.py --device cuda --dtype bf16 --size 1024 --read preset --repeats 5 \
    --json "$out/flux-adapters-1024.json"
fi
