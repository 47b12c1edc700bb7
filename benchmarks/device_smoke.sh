# Device smoke test of build-time CUDA artifacts, loaded with TVM's runtime library only.
#
# Build the artifacts on the build machine (full TVM + nvcc; no GPU needed), under an ignored
# directory that is carried to the device with .device/:
#   python -m mla_compiler.cuda_build .device/smoke/sm_89_sm_90a --target sm_89,sm_90a
#   python -m mla_compiler.cuda_build .device/smoke/sm_89_ptx --target sm_89
#   python -m mla_compiler.cuda_build .device/smoke/sm_89_noptx --target sm_89 --no-ptx
# Run on the GPU machine from the repo root:
#   bash benchmarks/device_smoke.sh .device/smoke/sm_89_sm_90a .device/smoke/sm_89_ptx \
#        .device/smoke/sm_89_noptx=refused
# Each artifact is loaded with TVM_USE_RUNTIME_LIB=1 (libtvm_compiler.so never loaded: checked
# in /proc/self/maps), run, and compared with the float64 output saved at build time. An
# argument ending in =refused must be refused for its arch (TargetError naming the arch).
# Exit status 1 when an artifact does not do what it is expected to. A markdown table at the end.
set -eo pipefail
source benchmarks/device_env.sh
if [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/device_smoke.sh ARTIFACT_DIR[=refused]..." >&2
  exit 2
fi
TVM_USE_RUNTIME_LIB=1 python3 -m mla_compiler.runtime.loader "$@" --device cuda
