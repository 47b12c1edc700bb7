# Measure a tuning plan on the GPU machine with TVM's runtime library only; records go to $OUT.
#
# Build the plan here (full TVM + nvcc, no GPU; .device/ is ignored by git and carried over):
#   mla-compiler tune --preset deepseek-v2-lite --target sm_90a --db /tmp/tune-db \
#       --build-only .device/tune-plan            # 30 attention candidates, ~1.5 min, ~3 MB
# Run there from the repo root (carry .device/tvm and .device/tune-plan):
#   bash benchmarks/device_tune.sh .device/tune-plan [--budget-minutes N] [--reps N]
# A previous database to resume: TUNE_DB=.device/tune-db (carried); it is copied to
# $OUT/tune-db first, so what is already recorded is skipped. Each candidate runs in its own
# child process (TVM_USE_RUNTIME_LIB=1: libtvm_compiler.so never loaded), is checked against
# the float64 reference on fresh random inputs, then timed (CUDA events, median, rotating
# input sets); one JSON line per (candidate, shape) lands in $OUT/tune-db/records.jsonl as soon
# as it is measured. Prints a JSON count line and a markdown table (best vs default config).
set -eo pipefail
source benchmarks/device_env.sh
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/device_tune.sh PLAN_DIR [--budget-minutes N] [--reps N]" >&2
  exit 2
fi
PLAN=$1
shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/tune-db"
if [ -n "$TUNE_DB" ] && [ -f "$TUNE_DB/records.jsonl" ]; then
  cp "$TUNE_DB/records.jsonl" "$OUT/tune-db/records.jsonl"
fi
TVM_USE_RUNTIME_LIB=1 python3 -m mla_compiler.tuning_measure "$PLAN" --db "$OUT/tune-db" "$@"
