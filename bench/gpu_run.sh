#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (torch present, no diffusers/open_clip/faiss there):
#   bash bench/gpu_run.sh      (wheels for the missing pure-Python packages carried in .whl/)
# Writes JSON results to $OUT (or ./gpu-out) and prints a summary.
set -u
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "== diffusion: SD 1.5 architecture, random weights, fp16, 512x512, 25 steps"
timeout 220 python3 bench/gpu_generate.py 2>&1 | tail -25
echo "== OpenCLIP ViT-B-32 / ViT-L-14 embedding throughput (random weights, fp16)"
timeout 45 python3 bench/gpu_clip.py --model ViT-B-32 --seconds 5 2>&1 | tail -3
timeout 45 python3 bench/gpu_clip.py --model ViT-L-14 --batch 128 --seconds 5 2>&1 | tail -3
echo "== ANN at 1M x 512 on the GPU"
timeout 170 python3 bench/gpu_ann.py --out "$OUT/gpu_ann.json" 2>&1 | tail -25
echo "== one Ray GPU actor's work without Ray (SSCD on onnxruntime CUDA if present, OpenCLIP ViT-B-32 random weights)"
timeout 150 python3 bench/gpu_ray_actor.py --out "$OUT" 2>&1 | tail -20
echo "== done"
