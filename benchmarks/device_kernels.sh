# Kernel GPU tests and benchmarks on the GPU machine with the FULL TVM bundle in .device/tvm
# (compiles there). Usage: bash benchmarks/device_kernels.sh tests|attention|decode|gemm|moe ...
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for what in "$@"; do
  case $what in
    tests) python3 -m pytest -q -m gpu -x tests/test_attention_decode.py tests/test_attention_prefill.py tests/test_cuda_build.py 2>&1 | tail -25 ;;
    tests-*) python3 -m pytest -q -m gpu "tests/test_${what#tests-}.py" 2>&1 | tail -25 ;;
    *) python3 -m "benchmarks.bench_$what" --out "$OUT/bench_$what.json" 2>&1 | tail -40 ;;
  esac
done
