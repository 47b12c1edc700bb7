# Device memory of the V2-Lite f16 artifact by stage (issue #28): pooled vs naive TVM allocator.
# Usage on the GPU machine: bash benchmarks/device_memory.sh  (artifact in .device/art/v2lite90)
source benchmarks/device_env.sh >/dev/null 2>&1
export TVM_USE_RUNTIME_LIB=1
for a in pooled naive; do
  python3 -m benchmarks.memory_probe .device/art/v2lite90 --max-context 32768 --prompt 32704 --allocator $a --out $OUT/mem_$a.json 2>&1 | grep -v Warning | tail -14
done
