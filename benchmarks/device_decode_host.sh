# Device sampling and decode host overhead on the GPU machine, runtime-only bundle.
#   .device/art/v2lite_mla3          deepseek-v2-lite, sm_90a, --cuda-graph (device `sample`)
#   .device/art/v2lite_mla3_nograph  the same without CUDA graphs (optional: comparison)
# 1. decode_sampling_check.py: device greedy == numpy argmax of the same logits for 32 steps,
#    top_k=1 == greedy, seeded temperature/top-k/top-p sampling runs and repeats; the two
#    builds' greedy ids and logits compared (CUDA graphs must not change results).
# 2. profile_step.py: per-step wall (device and host sampling), host time (upload, VM call
#    issue, sample issue), GPU time and launches per step, for each build.
# Writes $OUT/check_*.json, $OUT/profile_*.json, $OUT/log.txt. Usage: [GRAPH_ART=DIR] [NOGRAPH_ART=DIR]
#   bash benchmarks/device_decode_host.sh   (exit 1 when a check fails)
set -o pipefail
source benchmarks/device_env.sh
export TVM_USE_RUNTIME_LIB=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
status=0
G=${GRAPH_ART:-.device/art/v2lite_mla3}; N=${NOGRAPH_ART:-.device/art/v2lite_mla3_nograph}
run() { echo "+ $*"; timeout 150 "$@" 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" || status=1; }
run python3 -m benchmarks.decode_sampling_check $G --json "$OUT/check_graph.json" --save /tmp/graph.npz
if [ -d $N ]; then
  run python3 -m benchmarks.decode_sampling_check $N --json "$OUT/check_nograph.json" --compare /tmp/graph.npz
fi
run python3 -m benchmarks.profile_step $G --prompt 2048 --steps 32 --json "$OUT/profile_graph.json"
if [ -d $N ]; then
  run python3 -m benchmarks.profile_step $N --prompt 2048 --steps 32 --json "$OUT/profile_nograph.json"
fi
python3 - "$OUT" <<'PY' | tee -a "$OUT/log.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("graph", "nograph"):
    p = out / f"profile_{name}.json"
    if p.exists():
        r = json.loads(p.read_text()); h = r["decode_host"]
        print(f"{name}: step {r['decode_step_ms']:.2f} ms (host sampling "
              f"{r['decode_step_host_sampling_ms']:.2f}), host {h.get('host_ms', 0):.2f} ms, issue "
              f"{h.get('issue_ms', 0):.2f} ms, GPU {r['decode_gpu_ms']:.2f} ms, "
              f"{r['decode_launches']:.0f} kernels/step, api {r['decode_api_calls']}")
for name in ("graph", "nograph"):
    p = out / f"check_{name}.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(name, "check pass" if r["pass"] else "check FAIL", {k: r[k] for k in r
              if k.startswith("compare") or k in ("greedy_mismatches", "generate_equal")})
PY
exit $status
