# Profile V2-Lite artifacts and check a 2-layer one against the float32 PyTorch model, on the GPU
# machine with the runtime-only TVM bundle.
# Usage: bash benchmarks/device_profile.sh "ART1 ART2 ..." "CHECK_ART1 ..." [PROMPT] [STEPS]
set -o pipefail
source benchmarks/device_env.sh
export TVM_USE_RUNTIME_LIB=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
status=0
for a in $2; do
  python3 -m benchmarks.check_torch "$a" --json "$OUT/check_$(basename $a).json" || status=1
done
for a in $1; do
  echo "== $a"
  python3 -m benchmarks.profile_step "$a" --prompt "${3:-2048}" --steps "${4:-32}" \
      --json "$OUT/profile_$(basename $a).json" || status=1
done
exit $status
