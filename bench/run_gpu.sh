#!/usr/bin/env bash
# What a lent GPU should run, in stages that each fit one command of the device tool (10 minutes):
#
#   bash bench/run_gpu.sh quick                    # one call under 10 minutes, first in a short session: preflight,
#                                                  # kerneltests, step64 (fair, fastest), profile at 64, levers64
#   bash bench/run_gpu.sh preflight tests          # one call (kerneltests: the kernels' tests alone)
#   bash bench/run_gpu.sh kernels loaders          # the next
#   bash bench/run_gpu.sh step64                   # then step256, step512 (a compile with CUDA graphs each):
#                                                  # port, fair, eager, fastest, event-timed (bench/test_step.py)
#   bash bench/run_gpu.sh profile                  # kernel tables at batch 64 and 512 (PROFILE_BATCHES=64: one)
#   bash bench/run_gpu.sh levers64 autotune64      # then levers512, autotune512: each lever against the fastest step
#                                                  # without it (bench/test_levers.py); autotune: max-autotune, all
#   bash bench/run_gpu.sh train                    # 300 real steps, fastest configuration
#   bash bench/run_gpu.sh precision                # held-out learning curves: fastest vs eager fp32 (and the VAE)
#   bash bench/run_gpu.sh loop                     # the whole loop against the bare step (bench/test_loop.py);
#                                                  # loop512: the same at batch 512, the decoded cache's loader only
#                                                  # (the 25,000 img/s goal)
#   bash bench/run_gpu.sh all                      # every stage in order (on a node without a time limit)
#
# Every stage runs under `timeout $STAGE_SECONDS` (540 by default) and writes its own file,
# gpu-DATE-DEVICE-STAGE.txt (+ .json and -rows.jsonl for benchmarks, .json and .md for precision, -bBATCH.md and
# .json per batch for profile), under $OUT
# (the device tool's folder) or bench/results/, headed by the device, the versions, the date and
# the command: commit them.
# Compiled code is cached in .cache/ (ignored by git) so later stages on the same machine reuse it.
# DALI is optional everywhere: without it the loader stages and the training run use the PIL loader
# or the decoded cache (the authors' augmentation runs batched on the GPU with either), and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out" .cache
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
limit=${STAGE_SECONDS:-540}
cores=$(nproc)
stamp=$(date -u +%Y%m%d)
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'no-cuda')")

header() {  # $1: the stage
  echo "stage: $1"
  echo "date: $(date -u -Iseconds)"
  echo "device: $device"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "dali: not installed"
  echo "command: bash bench/run_gpu.sh $1 (timeout $limit s)"
  echo
}

run_stage() {  # $1: the stage; the rest: the command
  local stage=$1; shift
  local file="$out/gpu-$stamp-$device-$stage"
  echo "== $stage -> $file.txt"
  { header "$stage"; timeout -s INT -k 20 "$limit" bash -c '"$@"' _ "$@" 2>&1; local rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 130 ] && echo "TIMED OUT after $limit s"; echo "exit status: $rc"; } | tr '\r' '\n' | tee "$file.txt" | tail -15
}

preflight() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib
needed = {"torch": "everything", "triton": "the kernels", "pytest": "the tests", "pytest_benchmark": "the benchmarks",
          "tensorboard": "training", "skimage": "the built-in faces", "PIL": "the PIL loader", "tqdm": "training",
          "numpy": "everything"}
optional = {"nvidia.dali": "the DALI loader (optional: PIL is used without it)"}
missing = []
for module, what in {**needed, **optional}.items():
    try:
        importlib.import_module(module)
        print(f"ok       {module}")
    except Exception as e:
        print(f"MISSING  {module}: needed for {what} ({type(e).__name__}: {e})")
        if module in needed:
            missing.append(module)
try:
    from vaegan.eval.features import weights_path
    print(f"ok       the FID Inception weights ({weights_path()})")
except Exception as e:
    print(f"MISSING  the FID Inception weights: the precision stage's KID (optional: {e})")
import torch
print("cuda available:", torch.cuda.is_available(), "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
raise SystemExit(f"missing: {', '.join(missing)}" if missing else 0)
EOF
  local rc=$?
  # offline install; the stages do not depend on it (PYTHONPATH holds the repository)
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 \
    && echo "installed: vaegan (editable)" || echo "pip install -e . failed: the stages use PYTHONPATH=$PWD"
  python3 -c "import torch, kernels, vaegan; print('vaegan imports; kernels self-check on cuda:', \
    __import__('kernels.selfcheck', fromlist=['x']).self_check(torch.device('cuda')) or 'every op agrees')"
  return $rc
}

kerneltests() {  # the fused kernels against their references, compiled for the GPU (bf16 too), the RMSprop's and
  # --fuse-bn-relu's convolution too
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fused_rmsprop.py tests/test_fused_conv.py
}

tests() {  # correctness of the fast paths on the GPU: compiled kernels (bf16 too), routing in every mode, the
  # decoder's likelihood gradient in bf16 under inductor (the CPU learning comparison is left to the precision stage)
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gradients.py tests/test_train_step.py tests/test_loop.py \
    tests/test_precision.py tests/test_models.py tests/test_fused_rmsprop.py tests/test_fused_conv.py -k "not learns_what_fp32"
}

bench() {  # $1: stage name (for the json), the rest: pytest arguments; each row also goes to STAGE-rows.jsonl
  # as it is measured (pytest-benchmark's json is written at the end: a stopped stage keeps the rows file)
  local stage=$1; shift
  : >"$out/gpu-$stamp-$device-$stage-rows.jsonl"  # this run's rows only
  VAEGAN_BENCH_ROWS="$out/gpu-$stamp-$device-$stage-rows.jsonl" python3 -m pytest -q -p no:logging -p no:cacheprovider "$@" \
    --benchmark-json="$out/gpu-$stamp-$device-$stage.json" --benchmark-columns=median,rounds,iterations
}

train() {  # a few hundred real steps at 64 px from generated CelebA-like JPEGs: the user's command, its defaults
  # (bf16, compiled, CUDA graphs, the authors' augmentation batched on the GPU, the decoded cache)
  local data=.cache/celeba-like
  [ -d "$data/img_align_celeba" ] || python3 -c "import sys; sys.path.insert(0, 'tests'); \
    from datagen import make_celeba; make_celeba('$data', n=8192)"
  rm -rf .cache/train-run
  local log="$out/gpu-$stamp-$device-train-raw.log"  # written as it runs: kept when the stage is stopped
  TORCH_LOGS=${TORCH_LOGS:-recompiles} python3 train.py --data "$data" --steps ${TRAIN_STEPS:-300} --batch-size 256 \
    --log-every 25 --sample-every 300 --checkpoint-every 300 --out .cache/train-run >"$log" 2>&1
  local rc=$?
  tr '\r' '\n' <"$log" | grep -v "it/s\]$"
  cp .cache/train-run/metrics.jsonl "$out/gpu-$stamp-$device-train-metrics.jsonl" 2>/dev/null
  return $rc
}

precision() {  # the fast path learns what the reference path learns: the same seed, images and steps
  # (PRECISION_STEPS, 3,000 of 64 at 64 px) in the fastest mode, in eager fp32 and, if the time allows,
  # the plain VAE in the fastest mode; held-out errors and KID along each run (bench/precision_curves.py)
  python3 bench/precision_curves.py --device cuda --out .cache/precision --steps "${PRECISION_STEPS:-3000}" \
    --deadline $((limit - 30)) \
    --json "$out/gpu-$stamp-$device-precision.json" --md "$out/gpu-$stamp-$device-precision.md"
}

export -f preflight kerneltests tests bench train precision
export out stamp device cores limit
stages=("$@")
[ ${#stages[@]} -eq 0 ] && { sed -n 2,25p "$0"; exit 2; }
[ "${stages[0]}" = all ] && stages=(preflight tests kernels loaders step64 step256 step512 levers64 autotune64 levers512 autotune512 profile train precision loop loop512)
for stage in "${stages[@]}"; do
  case $stage in
    quick)  # one device call of under 10 minutes: what a short GPU session runs first. Each part keeps what it
      # measured if its limit stops it (rows files, the profile rewritten per variant); the levers last, the likeliest
      # gains first (each is a fresh compile of about a minute)
      limit=40 run_stage preflight preflight
      limit=90 run_stage kerneltests kerneltests
      VAEGAN_BENCH_BATCHES=64 limit=130 run_stage step64 bench step64 bench/test_step.py -k "fair or fastest"
      limit=120 run_stage profile python3 bench/profile_step.py --batches 64 --out "$out" --prefix "gpu-$stamp-$device-profile"
      VAEGAN_BENCH_BATCHES=64 VAEGAN_BENCH_LEVERS=decoder-joint,fused-rmsprop,fuse-bn-relu,pad-channels limit=130 \
        run_stage levers64 bench levers64 bench/test_levers.py ;;
    preflight) run_stage preflight preflight ;;
    tests) run_stage tests tests ;;
    kerneltests) run_stage kerneltests kerneltests ;;
    kernels) run_stage kernels bench kernels bench/test_kernels.py ;;
    loaders) run_stage loaders bench loaders bench/test_loaders.py ;;
    step64|step256|step512) VAEGAN_BENCH_BATCHES=${stage#step} run_stage "$stage" bench "$stage" bench/test_step.py ;;
    levers64|levers512) VAEGAN_BENCH_BATCHES=${stage#levers} VAEGAN_BENCH_LEVERS=${VAEGAN_BENCH_LEVERS:-pad-channels,decoder-joint,fused-rmsprop,fuse-bn-relu} \
      run_stage "$stage" bench "$stage" bench/test_levers.py ;;
    autotune64|autotune512) VAEGAN_BENCH_BATCHES=${stage#autotune} VAEGAN_BENCH_LEVERS=max-autotune,all \
      run_stage "$stage" bench "$stage" bench/test_levers.py ;;
    profile) run_stage profile python3 bench/profile_step.py --batches "${PROFILE_BATCHES:-64,512}" --out "$out" \
      --prefix "gpu-$stamp-$device-profile" ;;
    train) run_stage train train ;;
    precision) run_stage precision precision ;;
    loop) run_stage loop bench loop bench/test_loop.py -s ;;
    loop512) VAEGAN_BENCH_LOOP_BATCH=512 run_stage loop512 bench loop512 bench/test_loop.py -s -k cache ;;
    *) echo "unknown stage $stage (preflight kerneltests tests kernels loaders step64 step256 step512 levers64 levers512 autotune64 autotune512 profile train precision loop loop512 quick all)"; exit 2 ;;
  esac
done
