#!/usr/bin/env bash
# Everything a lent GPU should run, in one go: correctness of the fast paths on the GPU, the
# benchmarks (kernels, loaders, the whole step), and a few hundred real training steps fed by the
# fastest loader. Output goes to $OUT (the device tool's folder) or bench/results/; commit what it
# writes there, with the file names the README cites.
#   bash bench/run_gpu.sh            (needs torch with CUDA, triton; DALI for the loader runs)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%d)
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
prefix="$out/gpu-$stamp-$device"
{
  echo "date: $(date -u -Iseconds)"
  echo "device: $device"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "dali: not installed"
  echo "command: bash bench/run_gpu.sh"
} | tee "$prefix-versions.txt"
# The fast paths on the GPU: kernels compiled (bf16 too), the routing in every mode, compiled Triton kernels.
python -m pytest -q -p no:logging tests/test_kernels.py tests/test_step.py tests/test_fast.py 2>&1 \
  | tee "$prefix-tests.txt" | tail -5
python -m pytest -q -p no:logging bench --benchmark-json="$prefix-bench.json" 2>&1 | tail -40
# A few hundred real steps at 64 px from generated CelebA-like JPEGs, the fastest configuration.
data=$(mktemp -d)
python -c "import sys; sys.path.insert(0, 'tests'); from datagen import make_celeba; make_celeba('$data', n=8192)"
python train.py --data "$data" --steps 300 --batch-size 256 --precision bf16 --compile --cuda-graphs \
  --log-every 50 --sample-every 300 --checkpoint-every 300 --out "$data/run" 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]$" | tee "$prefix-train.txt"
cp "$data/run/metrics.jsonl" "$prefix-train-metrics.jsonl" 2>/dev/null
