#!/usr/bin/env bash
# Everything a lent GPU should run, in one go: correctness of the fast paths on the GPU, the
# benchmarks, and a short real training run. Output goes to $OUT (the device tool's folder) or
# bench/results/; commit what it prints there, with the file names the README cites.
#   bash bench/run_gpu.sh            (needs torch with CUDA, triton; DALI for the loader benchmarks)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%d)
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
{
  echo "date: $(date -u -Iseconds)"
  echo "device: $device"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "dali: not installed"
  echo "command: bash bench/run_gpu.sh"
} | tee "$out/gpu-$stamp-$device-versions.txt"
python -m pytest -q tests/test_kernels.py tests/test_step.py 2>&1 | tee "$out/gpu-$stamp-$device-tests.txt"
python -m pytest -q bench --benchmark-json="$out/gpu-$stamp-$device-bench.json" 2>&1 | tail -40
