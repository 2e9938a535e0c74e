#!/usr/bin/env bash
# Train visible-watermark pixel CNNs on a lent GPU machine, as one prepared call (bench/results/gpu.md says what came
# of it). Made here first, and carried (the machine has torch, numpy and Pillow, and no fonts or data):
#   .venv/bin/python bench/train_visible_watermark.py --pack .gpu-pack     # photos + training fonts, ~43 MB
# then, on the machine:  bash bench/gpu_train_visible.sh                    (writes to $OUT, or ./gpu-out)
# Two architectures learn from the same batches of 512 px examples; the evaluation's seen draw chooses between them.
set -u
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
PACK=${PACK:-.gpu-pack}
DEVICE=${DEVICE:-cuda}
FILL_MINUTES=${FILL_MINUTES:-6.5}
MAX_MINUTES=${MAX_MINUTES:-8.5}
WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "cores: $(nproc)"
# the data workers hand batches over through shared memory; a small /dev/shm would stop them
df -h /dev/shm | tail -1
mount -o remount,size=24G /dev/shm 2>/dev/null && df -h /dev/shm | tail -1
python3 -c "import torch, PIL, numpy; print('torch', torch.__version__, 'pillow', PIL.__version__, 'numpy', numpy.__version__)"
python3 bench/train_visible_watermark.py --device "$DEVICE" --amp --data "$PACK/flickr8k-dev" --fonts "$PACK/fonts" \
  --input-size "${INPUT_SIZE:-512}" --generator "${GENERATOR:-canvas}" --batch-size 256 --loader-pairs 16 --workers "$WORKERS" --reuse 2 --lr 3e-3 --seed 0 \
  --stem 32 --widths 64,128,256,384 --out "$OUT/visible_watermark_cnn_${TAG:-a}.pt" \
  --also-arch "48:96,192,384,512=$OUT/visible_watermark_cnn_${TAG:-a}_wide.pt" \
  --fill-minutes "$FILL_MINUTES" --max-minutes "$MAX_MINUTES" --save-every 200 2>&1 | tee "$OUT/train.log"
echo "== done"
