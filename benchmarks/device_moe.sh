# MoE kernels on the GPU machine, with the FULL TVM bundle carried in .device/tvm (built here by
# `bash ../shared/tools/tvm-device-bundle full`; compiles there). From the repo root:
#   bash benchmarks/device_moe.sh            # tests, benchmark, compute-sanitizer (~4-5 min)
#   bash benchmarks/device_moe.sh sweep      # prefill tile configs of moe.CANDIDATES (~3-5 min)
# Writes $OUT/pytest_moe.log, $OUT/bench_moe.json (+ .log), $OUT/sanitizer_moe.log,
# $OUT/moe_sweep.json; prints the pytest summary and the benchmark tables.
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
if [ "$what" = sweep ]; then
  python3 -m benchmarks.bench_moe --sweep --out "$OUT/moe_sweep.json" 2>"$OUT/moe_sweep.log" | tail -25
  exit
fi
SECONDS=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_kernels.py >"$OUT/pytest_moe.log" 2>&1
echo "pytest rc=$? (${SECONDS}s)"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/pytest_moe.log" | tail -25
python3 -m benchmarks.bench_moe --tokens 1,16,512,2048 --out "$OUT/bench_moe.json" \
  2>"$OUT/bench_moe.log" | tail -20
echo "bench rc=$? (${SECONDS}s)"
if command -v compute-sanitizer >/dev/null; then
  # the case that crashed on 2026-11-24 (partial tiles: gather run on the host)
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu \
    -p no:cacheprovider "tests/test_moe_kernels.py::test_experts_gpu_f16[random-T1-D64-I64]" \
    >"$OUT/sanitizer_moe.log" 2>&1
  echo "compute-sanitizer rc=$? (${SECONDS}s)"; tail -6 "$OUT/sanitizer_moe.log"
else
  echo "no compute-sanitizer on this machine"
fi
