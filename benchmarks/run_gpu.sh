#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, in sections (several fit in one device call):
#   bash benchmarks/run_gpu.sh env tests train            # the paired training benchmark, ResNet-50 first
#   bash benchmarks/run_gpu.sh train-more ddp1            # ResNet-18 and ViT-B/16; the DDP stride check on 1 GPU
#   bash benchmarks/run_gpu.sh inference ddp              # inference; DDP on 2 GPUs
# Results go to $OUT (or ./bench-out); copy the JSON/XML files into benchmarks/results/ and run
# `python benchmarks/make_docs.py`. TRAIN_S (default 380) is the time the train sections may use:
# the benchmark starts no lane or round that would end later, and is killed 30 s after it.
# ModelOpt lanes run when nvidia-modelopt is importable (wheels: /work/shared/gpu/fetch_wheels.sh),
# else they are skipped with the reason in the JSON.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
TRAIN_S=${TRAIN_S:-380}
quiet() { grep -v -E 'LeafSpec|litlogger|Tip:|^\s*$|TPU available|GPU available|LOCAL_RANK|HPU available|Tensor Cores|num_workers|max_steps=|Using 16bit|set_float32_matmul_precision|sync_dist|Automatic Mixed Precision|infinite|Loading extension'; }
train() {  # train OUTFILE ARGS...: the paired benchmark under a hard time limit
  local out=$1; shift
  timeout -s INT $((TRAIN_S + 30)) python3 benchmarks/train_overhead.py --deadline-s "$TRAIN_S" --out "$out" "$@" 2>&1 | quiet
}
for section in "$@"; do
  echo "=== $section $(date -u +%FT%TZ)"
  case $section in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
         python3 -c "import torch, pytorch_lightning as pl, torchvision, onnxruntime as o; print('torch', torch.__version__, 'lightning', pl.__version__, 'torchvision', torchvision.__version__, 'onnxruntime', o.__version__)"
         python3 -c "import modelopt; print('modelopt', modelopt.__version__)" 2>&1 | tail -1 ;;
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --junitxml="$OUT/gpu_tests.xml" \
             tests/test_fast_paths.py tests/test_sparsity_callback.py tests/test_tensorrt.py 2>&1 | tail -8 ;;
    train) train "$OUT/train_paired_resnet50.json" --models resnet50 --profile c_amp c_amp_24_qat amp amp_24_qat ;;
    train-more) train "$OUT/train_paired_more.json" --models resnet18 vit_b_16 --profile c_amp c_amp_24_qat ;;
    ddp1) timeout 240 python3 benchmarks/ddp_strides.py --out "$OUT/ddp_strides_1gpu.json" 2>&1 | quiet ;;
    inference) python3 benchmarks/inference.py --out "$OUT/inference.json" 2>&1 | quiet ;;
    ddp) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
         python3 benchmarks/ddp_check.py --devices 2 --out "$OUT/ddp.json" 2>&1 | quiet ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
