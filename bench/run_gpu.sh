#!/usr/bin/env bash
# What a lent GPU should run, in stages that each fit one command of the device tool (10 minutes):
#
#   bash bench/run_gpu.sh quick                    # one call under 10 minutes with cold caches, first in a short
#                                                  # session: preflight, syncdebug, the user's loop against the bare
#                                                  # step at 64 and 512, step64 (fair, fastest), DALI if installed;
#                                                  # each part's budget in a printed plan (QUICK_PLAN)
#   DRY_RUN=1 bash bench/run_gpu.sh quick          # the plan and each stage's files, nothing run (on any machine)
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
  case $1 in  # a part of quick runs again alone as a plan of one part
    quick-*) echo "command: QUICK_PLAN=${1#quick-}:$limit bash bench/run_gpu.sh quick (one part of quick)" ;;
    *) echo "command: bash bench/run_gpu.sh $1 (timeout $limit s)" ;;
  esac
  echo
}

grace=${KILL_GRACE:-20}  # seconds between a stage's interrupt and its kill

run_stage() {  # $1: the stage; the rest: the command
  local stage=$1; shift
  local file="$out/gpu-$stamp-$device-$stage"
  echo "== $stage -> $file.txt"
  if [ -n "${DRY_RUN:-}" ]; then  # the files a stage starts with, and what it would run
    { header "$stage"; echo "dry run: would run for at most $limit s (+$grace s to stop): $*"
      [ "$1" = bench ] && "$@"; } >"$file.txt"
    return
  fi
  { header "$stage"; timeout -s INT -k "$grace" "$limit" bash -c '"$@"' _ "$@" 2>&1; local rc=$?
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
  : >"$out/gpu-$stamp-$device-$stage-rows.jsonl"  # this run's rows only, there before the first is measured
  [ -n "${DRY_RUN:-}" ] && { echo "dry run: rows file $out/gpu-$stamp-$device-$stage-rows.jsonl"; return 0; }
  VAEGAN_BENCH_ROWS="$out/gpu-$stamp-$device-$stage-rows.jsonl" python3 -m pytest -q -p no:logging -p no:cacheprovider "$@" \
    --benchmark-json="$out/gpu-$stamp-$device-$stage.json" --benchmark-columns=median,rounds,iterations
}

syncdebug() {  # the data path and the step under torch.cuda.set_sync_debug_mode("error"), through files on disk
  python3 -m pytest -q -p no:cacheprovider tests/test_loop.py -k "on_a_gpu"
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

export -f preflight syncdebug kerneltests tests bench train precision
export out stamp device cores limit grace
stages=("$@")
[ ${#stages[@]} -eq 0 ] && { sed -n 2,25p "$0"; exit 2; }
[ "${stages[0]}" = all ] && stages=(preflight tests kernels loaders step64 step256 step512 levers64 autotune64 levers512 autotune512 profile train precision loop loop512)
for stage in "${stages[@]}"; do
  case $stage in
    quick)  # one device call of 600 s with cold caches: each part's budget is planned (QUICK_PLAN, in order; its
      # limits, kill graces and start-ups must fit QUICK_SECONDS, or nothing runs) and printed first; a part its
      # limit stops keeps what it measured (the rows files are there before the first row, a row written as measured)
      plan=(${QUICK_PLAN:-preflight:40 syncdebug:60 loop64:120 loop512:120 step64:90 dali:40})
      grace=${KILL_GRACE:-10}
      dali=$(python3 -c "import nvidia.dali" 2>/dev/null && echo installed || echo "not installed")
      total=0
      echo "quick: the plan (seconds: limit + $grace to stop + 5 to start each; DALI $dali)"
      for part in "${plan[@]}"; do
        name=${part%%:*} seconds=${part##*:}
        [ "$name" = dali ] && [ "$dali" != installed ] && { echo "  $name: skipped (DALI not installed)"; continue; }
        total=$((total + seconds + grace + 5))
        echo "  $name: $seconds s (by $total s)"
      done
      echo "quick: $total s of ${QUICK_SECONDS:-580} s"
      [ "$total" -le "${QUICK_SECONDS:-580}" ] || { echo "quick: the plan does not fit ${QUICK_SECONDS:-580} s"; exit 2; }
      for part in "${plan[@]}"; do
        name=${part%%:*} seconds=${part##*:}
        case $name in
          preflight) limit=$seconds run_stage preflight preflight ;;
          syncdebug) limit=$seconds run_stage syncdebug syncdebug ;;
          loop64|loop512)  # the user's command: the default loader and cache, against the bare step, fewer steps
            VAEGAN_BENCH_LOOP_BATCH=${name#loop} VAEGAN_BENCH_LOOP_STEPS=${QUICK_LOOP_STEPS:-200} limit=$seconds \
              run_stage "quick-$name" bench "quick-$name" bench/test_loop.py -s -k default ;;
          step64) VAEGAN_BENCH_BATCHES=64 limit=$seconds run_stage quick-step64 bench quick-step64 bench/test_step.py \
              -k "fair or fastest" ;;
          dali) [ "$dali" = installed ] && VAEGAN_BENCH_LOOP_STEPS=${QUICK_LOOP_STEPS:-200} limit=$seconds \
              run_stage quick-dali bench quick-dali bench/test_loop.py -s -k dali ;;
          *) echo "quick: unknown part $name"; exit 2 ;;
        esac
      done ;;
    syncdebug) run_stage syncdebug syncdebug ;;
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
    *) echo "unknown stage $stage (preflight syncdebug kerneltests tests kernels loaders step64 step256 step512 levers64 levers512 autotune64 autotune512 profile train precision loop loop512 quick all)"; exit 2 ;;
  esac
done
