# End-to-end on the GPU machine, runtime-only: artifacts compiled on a GPU-less machine.
#   .device/art/tiny90_mla{2,3}  tiny, sm_90a, float32 -> tokens must equal the CPU artifact's
#   .device/art/v2lite           deepseek-v2-lite (seeded random weights), sm_90a, float16 -> bench
# Usage: bash benchmarks/device_e2e.sh [PROMPT_LENGTHS] [GEN]
set -o pipefail
source benchmarks/device_env.sh
export TVM_USE_RUNTIME_LIB=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P=$(cat .device/art/prompt.txt)
status=0
for m in 2 3; do
  mla run .device/art/tiny90_mla$m --prompt-ids "$P" --max-new-tokens 16 --json | tail -1 > "$OUT/tiny90_mla$m.json"
  if python3 -c "import json,sys; a=json.load(open('$OUT/tiny90_mla$m.json'))['tokens']; b=json.load(open('.device/art/expected_mla$m.json'))['tokens']; print('mla$m GPU', a); print('mla$m CPU', b); sys.exit(a!=b)"; then
    echo "tiny mla$m: GPU tokens == CPU tokens"
  else echo "tiny mla$m: MISMATCH"; status=1; fi
done
if [ -d .device/art/v2lite ]; then
  mla bench .device/art/v2lite -p "${1:-512,2048}" -n "${2:-32}" -r 2 --json "$OUT/v2lite_bench.json" || status=1
fi
exit $status
