#!/usr/bin/env bash
# Issue 12's GPU figures in one prepared run (e.g. on the project's lent H200): Conceptrol vs the stock pipeline,
# time per step and peak memory, random weights at real size. Results: one JSON (or text) per row in ${OUT:-gpu-figures}.
#   bash benchmarks/gpu_figures.sh sd     # SD 1.5 and SDXL, fp16 and bf16, eager and compiled (about 6 minutes)
#   bash benchmarks/gpu_figures.sh flux   # FLUX OminiControl at 512 and 1024, XLabs / Kontext / Redux at 1024 (bf16,
#                                         # eager and compiled)
#   bash benchmarks/gpu_figures.sh flux2  # FLUX.2 [dev] at real depth (8 + 48 blocks), two references, 512 and 1024
#                                         # (bf16); the H200's 139 GiB hold its 32B parameters
#   bash benchmarks/gpu_figures.sh qwen   # Qwen-Image-Edit-Plus at real depth (60 blocks), two references, 512, 1024
#   SMOKE=1 bash benchmarks/gpu_figures.sh all   # the same rows on the CPU at toy sizes: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-figures}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rows=${1:-sd}
if [[ ${SMOKE:-0} == 1 ]]; then
  device=(--device cpu --dtype fp32); dtypes=(fp32); sd=(--tiny --steps 2 --repeats 1)
  flux=(--double 1 --single 1 --repeats 1); sizes=(32); adapters_size=32; flux2=(--double 1 --single 1 --repeats 1)
  qwen=(--layers 1 --repeats 1)
else
  device=(--device cuda); dtypes=(fp16 bf16); sd=(--steps 8 --repeats 3)
  flux=(--dtype bf16 --repeats 5); sizes=(512 1024); adapters_size=1024; flux2=(--dtype bf16 --repeats 5)
  qwen=(--dtype bf16 --repeats 5)
fi
if [[ $rows == sd || $rows == all ]]; then
  for model in sd15 sdxl; do
    for dtype in "${dtypes[@]}"; do
      for compiled in "" --compile; do
        python benchmarks/overhead.py "${device[@]}" --dtype "$dtype" --model $model "${sd[@]}" $compiled \
          --json "$out/$model-$dtype${compiled:+-compiled}.json"
      done
    done
  done
fi
if [[ $rows == flux || $rows == all ]]; then
  for size in "${sizes[@]}"; do
    python benchmarks/overhead_flux.py "${device[@]}" "${flux[@]}" --size "$size" | tee "$out/flux-ominicontrol-$size.txt"
  done
  for compiled in "" --compile; do
    python benchmarks/overhead_flux_adapters.py "${device[@]}" "${flux[@]}" --size $adapters_size --read preset \
      $compiled --json "$out/flux-adapters-$adapters_size${compiled:+-compiled}.json"
  done
fi
if [[ $rows == flux2 || $rows == all ]]; then
  for size in "${sizes[@]}"; do
    python benchmarks/overhead_flux2.py "${device[@]}" "${flux2[@]}" --size "$size" --json "$out/flux2-$size.json"
  done
fi
if [[ $rows == qwen || $rows == all ]]; then
  for size in "${sizes[@]}"; do
    python benchmarks/overhead_qwen.py "${device[@]}" "${qwen[@]}" --size "$size" --json "$out/qwen-$size.json"
  done
fi
