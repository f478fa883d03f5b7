#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, in sections (several fit in one device call):
#   bash benchmarks/run_gpu.sh env tests inference train-eager train-compiled train-compiled-cpp vit profile ddp
# Results go to $OUT (or ./bench-out); each section prints its table last.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
quiet() { grep -v -E 'LeafSpec|litlogger|Tip:|^\s*$|TPU available|GPU available|LOCAL_RANK|HPU available|Tensor Cores|num_workers|max_steps=|Using 16bit|set_float32_matmul_precision|sync_dist'; }
for section in "$@"; do
  echo "=== $section $(date -u +%FT%TZ)"
  case $section in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
         python3 -c "import torch, pytorch_lightning as pl, torchvision, onnxruntime as o; print('torch', torch.__version__, 'lightning', pl.__version__, 'torchvision', torchvision.__version__, 'onnxruntime', o.__version__)" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_fast_paths.py tests/test_sparsity_callback.py -m "gpu or not gpu" -k "cuda or gpu or 16_mixed" 2>&1 | tail -5 ;;
    inference) python3 benchmarks/inference.py --out "$OUT/inference.json" 2>&1 | quiet ;;
    train-eager) python3 benchmarks/train_overhead.py --models resnet18 resnet50 --out "$OUT/train_eager.json" 2>&1 | quiet ;;
    train-compiled) python3 benchmarks/train_overhead.py --compile --models resnet18 resnet50 --out "$OUT/train_compiled.json" 2>&1 | quiet | grep -E "^(resnet|vit)" ;;
    train-compiled-cpp) TORCHINDUCTOR_CPP_WRAPPER=1 python3 benchmarks/train_overhead.py --compile --models resnet18 resnet50 --out "$OUT/train_compiled_cpp.json" 2>&1 | quiet | grep -E "^(resnet|vit)" ;;
    vit) python3 benchmarks/train_overhead.py --models vit_b_16 --out "$OUT/train_vit_eager.json" 2>&1 | quiet
         TORCHINDUCTOR_CPP_WRAPPER=1 python3 benchmarks/train_overhead.py --compile --models vit_b_16 --out "$OUT/train_vit_compiled_cpp.json" 2>&1 | quiet | grep -E "^(resnet|vit)" ;;
    profile) TORCHINDUCTOR_CPP_WRAPPER=1 python3 benchmarks/train_overhead.py --compile --models resnet50 --configs amp_24_qat --warmup 8 --steps 5 --profile 2>&1 | quiet | tail -34 ;;
    ddp) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
         python3 benchmarks/ddp_check.py --devices 2 --out "$OUT/ddp.json" 2>&1 | quiet ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
