#!/usr/bin/env bash
# First look on the GPU machine: environment, eager/compiled step times, where QAT time goes.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, pytorch_lightning as pl, torchvision; print(torch.__version__, pl.__version__, torchvision.__version__)"
python3 benchmarks/train_overhead.py --models resnet50 --warmup 8 --steps 20 --out $OUT/r50_eager.json
python3 benchmarks/train_overhead.py --models resnet50 --configs amp_24_qat --warmup 3 --steps 5 --profile 2>&1 | tail -40
python3 benchmarks/train_overhead.py --models resnet50 --configs amp amp_24_qat --compile --warmup 10 --steps 20 --out $OUT/r50_compiled.json
