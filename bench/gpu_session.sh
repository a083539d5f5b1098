#!/usr/bin/env bash
# Everything a session with a lent GPU runs, batched so the device time goes to running:
#   bash bench/gpu_session.sh [build] [test] [sanitize] [bench] [e2e]     (no argument: all five)
# Logs go to $OUT (the device tool's result folder; ./gpu_out elsewhere). The ops' tests run on
# the GPU machine's own torch/transformers; atp_llava needs transformers >= 5.24, so its tests
# are left to CI unless that machine has it; the e2e stage (LLaVA-1.5-7B shapes) needs it too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench e2e)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
status=0

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log and remember a failure
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.log"
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      { nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version; } > "$OUT/env.txt" 2>&1
      run build python3 -m pip install --no-build-isolation --no-deps -e . ;;
    test)
      run test python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_scores.py \
        tests/test_soft_mask.py tests/test_errors.py tests/test_cuda_attention.py ;;
    sanitize)
      run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/cuda_smoke.py
      run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/cuda_smoke.py ;;
    bench)
      run bench python3 bench/kernel_bench.py --check --out "$OUT/kernel_bench_cuda.json" ;;
    e2e)
      run e2e python3 bench/e2e_bench.py --preset llava7b --batch 1 8 --out "$OUT/e2e_llava7b_cuda.json" ;;
    *) echo "unknown stage $stage (build, test, sanitize, bench, e2e)"; exit 2 ;;
  esac
done
exit $status
