#!/usr/bin/env bash
# Every GPU check in one call, for a machine with a CUDA GPU (about 10 minutes on an H200):
# the GPU tests (NCCL and SyncBatchNorm among them), the full training/scoring benchmark on
# CUDA (and with two levers flipped), DDP scaling over the GPUs, and the bf16 quality comparison.
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/ (or $OUT when set)
# Needs the prepared data and the reference (`dvc repro reference`); the venv must be active.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -m gpu -v -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || echo "GPU TESTS FAILED (see $out/gpu_tests.txt); benchmarking anyway"
python benchmarks/train_throughput.py --devices cuda --output "$out/train_throughput_cuda.json" \
  2>&1 | tee "$out/train_throughput_cuda.txt"
# Levers whose CUDA payoff is unmeasured: the tap-form output conv (off) and torch.compile (on).
for levers in '{"fast_output": false}' '{"compile": true}'; do
  name=$(echo "$levers" | tr -dc 'a-z_')
  python benchmarks/train_throughput.py --devices cuda --batch-sizes 32 256 --levers "$levers" \
    --output "$out/train_throughput_cuda_$name.json" 2>&1 | tee "$out/train_throughput_cuda_$name.txt"
done
# Data-parallel: the plain path, DDP with one GPU (its overhead), and DDP over every GPU of the machine.
gpus=$(nvidia-smi -L | wc -l)
python benchmarks/ddp_scaling.py --device cuda --batch-size 256 --nprocs 0 1 "$gpus" \
  --output "$out/ddp_scaling_cuda.json" 2>&1 | tee "$out/ddp_scaling_cuda.txt"
python benchmarks/lever_quality.py --device cuda --steps 4000 --fid-samples 5000 \
  --lever '{"precision": "fp32"}' --output "$out/lever_quality_cuda.json" 2>&1 | tee "$out/lever_quality_cuda.txt"
