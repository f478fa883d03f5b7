#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, in sections (several fit in one device call):
#   bash benchmarks/run_gpu.sh env train tests          # call A: paired benchmark of ResNet-50; GPU tests
#   bash benchmarks/run_gpu.sh train-r18 train-vit ddp1 # call B: ResNet-18, ViT-B/16; DDP strides on 1 GPU
#   bash benchmarks/run_gpu.sh train-rc train-vit-rc    # lanes the full sections leave out within their budget:
#                                                       # masks alone and recompute=True, each with its baseline
# On a 2-GPU machine two lists run at once, one per GPU (each process reads its own GPU's clocks):
#   CUDA_VISIBLE_DEVICES=0 bash benchmarks/run_gpu.sh train train-r18 & CUDA_VISIBLE_DEVICES=1 bash benchmarks/run_gpu.sh train-vit ddp1 train-vit-rc; wait
#   bash benchmarks/run_gpu.sh inference ddp            # inference; DDP on 2 GPUs
#   bash benchmarks/run_gpu.sh fsdp                     # FSDP on 2 GPUs (copy fsdp.json to results/fsdp_2xh200.json)
#   bash benchmarks/run_gpu.sh permutation search       # channel permutation: accuracy study; search (GPU and CPU)
#   bash benchmarks/run_gpu.sh coverage                 # coverage matrix on the host's CPUs
# Results go to $OUT (or ./bench-out); copy the JSON/XML files into benchmarks/results/ and run
# `python benchmarks/make_docs.py`. TRAIN_S / R18_S / VIT_S (seconds) bound each train section: the
# benchmark starts no lane or round that would end later, writes its JSON after every lane and round,
# and is interrupted 30 s after its budget.
# ModelOpt lanes run when nvidia-modelopt is importable (wheels: /work/shared/gpu/fetch_wheels.sh),
# else they are skipped with the reason in the JSON.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
TRAIN_S=${TRAIN_S:-380} R18_S=${R18_S:-200} VIT_S=${VIT_S:-220}
quiet() { grep -v -E 'LeafSpec|litlogger|Tip:|^\s*$|TPU available|GPU available|LOCAL_RANK|HPU available|Tensor Cores|num_workers|max_steps=|Using 16bit|set_float32_matmul_precision|sync_dist|Automatic Mixed Precision|infinite|Loading extension'; }
train() {  # train SECONDS OUTFILE ARGS...: the paired benchmark under a hard time limit
  local budget=$1 out=$2; shift 2
  timeout -s INT -k 20 $((budget + 30)) python3 benchmarks/train_overhead.py --deadline-s "$budget" --out "$out" "$@" 2>&1 | quiet
}
for section in "$@"; do
  echo "=== $section $(date -u +%FT%TZ)"
  case $section in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
         python3 -c "import torch, pytorch_lightning as pl, torchvision, onnxruntime as o; print('torch', torch.__version__, 'lightning', pl.__version__, 'torchvision', torchvision.__version__, 'onnxruntime', o.__version__)"
         python3 -c "import modelopt; print('modelopt', modelopt.__version__)" 2>&1 | tail -1 ;;
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or torch_sensitive" --junitxml="$OUT/gpu_tests.xml" \
             tests/test_fast_paths.py tests/test_sparsity_callback.py tests/test_tensorrt.py 2>&1 | tail -8 ;;
    train) train "$TRAIN_S" "$OUT/train_paired_resnet50.json" --models resnet50 --profile c_amp c_amp_24_qat amp amp_24_qat ;;
    train-r18) train "$R18_S" "$OUT/train_paired_resnet18.json" --models resnet18 --profile c_amp c_amp_24_qat ;;
    train-vit) train "$VIT_S" "$OUT/train_paired_vit.json" --models vit_b_16 --groups compiled eager modelopt --profile c_amp c_amp_24_qat ;;
    train-rc) train "${RC_S:-400}" "$OUT/train_paired_resnet50_rc.json" --models resnet50 --lanes c_amp c_amp_24 c_amp_24_qat_rc ;;
    train-vit-rc) train "${RC_S:-400}" "$OUT/train_paired_vit_rc.json" --models vit_b_16 --lanes c_amp c_amp_24_qat_rc ;;
    ddp1) timeout 120 python3 benchmarks/ddp_strides.py --out "$OUT/ddp_strides_1gpu.json" 2>&1 | quiet ;;
    inference) python3 benchmarks/inference.py --out "$OUT/inference.json" 2>&1 | quiet ;;
    ddp) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
         python3 benchmarks/ddp_check.py --devices 2 --out "$OUT/ddp.json" 2>&1 | quiet ;;
    fsdp) NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
          timeout 480 python3 benchmarks/fsdp_check.py --devices 2 --out "$OUT/fsdp.json" 2>&1 | quiet ;;
    permutation)  # the study's seeds and experiments in parallel processes of 1 CPU thread, then one JSON
         P=/tmp/permutation_parts; mkdir -p "$P"  # not under $OUT: only the merged JSON comes back
         for seed in 0 1 2 3 4; do for e in oneshot recipe; do
           CUDA_VISIBLE_DEVICES= timeout 560 python3 benchmarks/permutation_study.py run --experiments $e --seeds $seed --threads 1 \
             --out "$P/study_${e}_$seed.json" > "$P/study_${e}_$seed.log" 2>&1 &
         done; done
         wait; tail -n 3 "$P"/*.log
         python3 benchmarks/permutation_study.py merge "$P"/study_*.json --out "$OUT/permutation_study.json" \
           --command "bash benchmarks/run_gpu.sh permutation (5 seeds x 2 experiments, one process of 1 CPU thread each)" ;;
    search) python3 benchmarks/permutation_search.py --device cuda --out "$OUT/permutation_search_h200.json" 2>&1 | quiet &
            python3 benchmarks/permutation_search.py --device cpu --threads 2 --out "$OUT/permutation_search_cpu.json" 2>&1 | quiet
            wait ;;
    coverage)  # the matrix on the host's CPUs: COV_N shards of 1 thread at once (each saves after every model), one JSON;
               # COV_TIMEOUT (s) and COV_RSS_GB bound each model, COV_S each shard
         P=/tmp/coverage_parts; mkdir -p "$P"; N=${COV_N:-12}
         for k in $(seq 0 $((N - 1))); do
           QATSPARSE_COMMIT=${QATSPARSE_COMMIT:-unknown} timeout "${COV_S:-500}" python3 benchmarks/coverage.py --fresh --shard "$k/$N" --out "$P/part_$k.json" --doc '' \
             --timeout "${COV_TIMEOUT:-400}" --max-rss-gb "${COV_RSS_GB:-8}" > "$P/part_$k.log" 2>&1 &
         done
         wait; tail -q -n 1 "$P"/part_*.log
         python3 benchmarks/coverage.py --merge "$P"/part_*.json --out "$OUT/coverage_cpu.json" --doc '' ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
