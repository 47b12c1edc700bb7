# Device memory by stage (issue #28): the V2-Lite f16 artifact with TVM's pooled and naive
# allocators, and (with "all") the Q4_K_M one (weights drawn and quantized at load, decoded to
# f16 for now). Usage on the GPU machine: bash benchmarks/device_memory.sh [all]
# (artifacts in .device/art)
source benchmarks/device_env.sh >/dev/null 2>&1
export TVM_USE_RUNTIME_LIB=1
probe() { python3 -m benchmarks.memory_probe "$@" 2>&1 | grep -v Warning | tail -12; }
probe .device/art/v2lite90 --prompt 32704 --allocator pooled --out $OUT/mem_f16_pooled.json
probe .device/art/v2lite90 --prompt 32704 --allocator naive --out $OUT/mem_f16_naive.json
if [ "$1" = all ]; then
  probe .device/art/v2lite90q4km --prompt 8192 --allocator pooled --out $OUT/mem_q4km_pooled.json
fi
