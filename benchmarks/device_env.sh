# Source from the repo root on the GPU machine: unpacks the TVM bundle carried in .device/tvm
# and makes `mla_compiler` importable with the package-dir layout of pyproject.toml (no install:
# the GPU machine has no package registry).
bash .device/tvm/unpack.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if ! python3 -c "import mla_compiler.runtime.loader" 2>/dev/null; then
  MLA_SHIM=$(mktemp -d)
  mkdir "$MLA_SHIM/mla_compiler"
  for f in mla_compiler/*; do ln -s "$PWD/$f" "$MLA_SHIM/mla_compiler/"; done
  ln -s "$PWD/runtime" "$MLA_SHIM/mla_compiler/runtime"
  ln -s "$PWD/schedules" "$MLA_SHIM/mla_compiler/schedules"
  ln -s "$PWD/model_export" "$MLA_SHIM/mla_compiler/model_export"
  export PYTHONPATH=$MLA_SHIM:$PYTHONPATH
fi
mla() { python3 -m mla_compiler.cli "$@"; }
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
