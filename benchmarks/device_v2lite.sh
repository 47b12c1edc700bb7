# deepseek-v2-lite (seeded random weights) on the GPU machine, runtime-only, with HF transformers'
# eager DeepseekV2 as the in-process baseline. Artifacts under .device/art/v2lite_mla*.
# Usage: bash benchmarks/device_v2lite.sh PROMPTS GEN REPS [MLA...]
set -o pipefail
source benchmarks/device_env.sh
export TVM_USE_RUNTIME_LIB=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P=${1:-512,2048,8192}; N=${2:-64}; R=${3:-2}; shift 3 || true
for m in "${@:-3}"; do
  mla bench .device/art/v2lite_mla$m -p "$P" -n "$N" -r "$R" --baseline hf \
      --json "$OUT/v2lite_mla${m}_bench.json" --plot "$OUT/v2lite_mla${m}_bench.png" 2>&1 | grep -v Warning
done
