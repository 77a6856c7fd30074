#!/usr/bin/env bash
# GPU suite, one command, about 10 minutes on one GPU: the CUDA tests, then speed of every registry method
# against a plain forward for DeiT-S and DeiT-B at batch 1 and 64 in float32 and bfloat16 (autocast).
# Results: benchmarks/results/speed_cuda_*.json and the printed tables.
#
#     bash benchmarks/gpu.sh            # from the repository root, in the environment of `make venv`
#
# Not yet run by the project: no session that wrote it had a GPU. Peak GPU memory and CUDA-graph
# latency are not measured by this script yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to run')"
$PY -m pytest -q -m gpu
for model in deit_small_patch16_224 deit_base_patch16_224; do
  for batch in 1 64; do
    for dtype in float32 bfloat16; do
      # the general path and IG take minutes at batch 64: timed once (their rows are marked runs=1)
      $PY benchmarks/speed.py --model "$model" --batch "$batch" --device cuda --dtype "$dtype" --repeats 10 \
        --methods forward,reciprocam,reciprocam-input,agcam,rollout,grad-rollout,relevance,layergradcam,ig
    done
  done
done
