# Quantized weights on the GPU machine (issue #28). Usage: bash benchmarks/device_quant.sh STEP...
#   tests   GPU tests of the quantized kernels (needs the FULL TVM bundle in .device/tvm)
#   gemv    decode GEMVs vs the read ceiling, f16 GEMV and cuBLAS (FULL bundle)
#   gemm    prompt GEMMs / MoE grouped GEMMs at T = 2048, 512 vs our f16 kernels and cuBLAS (FULL
#           bundle; the table here, per-case lines in $OUT/quant_gemm.log; subsets: --formats,
#           --shapes, --tokens; --jobs 1 builds the kernels one at a time)
#   e2e     V2-Lite q4_k_m beside f16: mla bench -p 512,2048,8192 -n 128 (runtime bundle is enough;
#           artifacts .device/art/v2lite90f16 and .device/art/v2lite90q4km, same commit)
#   logits  the 2-layer V2-Lite q4_k_m artifacts (sm_90a, and sm_89 from its PTX) against our
#           float32 model on the gguf-py-decoded blocks (benchmarks/quant_logits.py; gguf-py
#           carried in .device/pylib/gguf: cp -r $(python -c 'import gguf,os;print(os.path.dirname(gguf.__file__))') .device/pylib/)
#   memory  cudaMemGetInfo by stage, q4_k_m at --max-context 32768 and a 32K prompt, then the same
#           with all but 16 GiB of the GPU held (does it fit an RTX 4080?)
#   sm89    the sm_89 q4_k_m artifact from its PTX: a short bench (.device/art/v2lite89q4km)
# Two calls (the FULL bundle is ~62 MiB of the 64 MiB carry): (1) FULL bundle, carry
# [".device/tvm"]: tests gemv gemm; (2) runtime bundle, carry [".device/tvm", ".device/pylib",
# ".device/art/v2lite90f16", ".device/art/v2lite90q4km", ".device/art/v2lite2l90q4km",
# ".device/art/v2lite2l89q4km"] (~51 MiB): logits e2e memory; the 27-layer sm_89 artifact
# (19 MiB: cubin + PTX) needs a call of its own: sm89.
# Loading a seeded q4_k_m artifact draws and quantizes 15.7 G values on the CPU (q4_k ~12 M
# values/s a core here: about a minute on 16 cores); `memory` loads twice.
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
probe() { python3 -m benchmarks.memory_probe "$@" 2>&1 | grep -v Warning | tail -16; }
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -m gpu tests/test_quant_gemm.py tests/test_quant_gemv.py \
             tests/test_moe_quant.py 2>&1 | tail -25 ;;
    gemv) python3 -m benchmarks.bench_quant_gemv --out "$OUT/quant_gemv.json" 2>&1 | tail -40 ;;
    gemm) python3 -m benchmarks.bench_quant_gemm --out "$OUT/quant_gemm.json" \
            2>"$OUT/quant_gemm.log" | tail -130; tail -4 "$OUT/quant_gemm.log" ;;
    e2e) for a in v2lite90f16 v2lite90q4km; do
           TVM_USE_RUNTIME_LIB=1 mla bench .device/art/$a -p 512,2048,8192 -n 128 -r 2 \
             --json "$OUT/bench_$a.json" 2>&1 | grep -v Warning | tail -12
         done ;;
    logits) for a in v2lite2l90q4km v2lite2l89q4km; do
              PYTHONPATH=$PWD/.device/pylib:$PYTHONPATH TVM_USE_RUNTIME_LIB=1 python3 -m \
                benchmarks.quant_logits .device/art/$a --out "$OUT/logits_$a.json" 2>&1 | tail -3
            done ;;
    memory) export TVM_USE_RUNTIME_LIB=1
            probe .device/art/v2lite90q4km --prompt 32704 --out "$OUT/mem_q4km.json"
            probe .device/art/v2lite90q4km --prompt 32704 --device-gib 16 \
              --out "$OUT/mem_q4km_16gib.json" ;;
    sm89) TVM_USE_RUNTIME_LIB=1 mla bench .device/art/v2lite89q4km -p 512 -n 32 -r 1 \
            --json "$OUT/bench_v2lite89q4km.json" 2>&1 | grep -v Warning | tail -8 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
