# Source from the repo root on the GPU machine: unpacks the TVM bundle carried in .device/tvm,
# makes `benchmarks` importable (scripts run as `python3 -m benchmarks.NAME`) and `mla_compiler`
# too, with the package-dir layout of pyproject.toml (no install: the GPU machine has no package
# registry). Not the checkout root itself on sys.path: its mla_compiler/ lacks the subpackages.
bash .device/tvm/unpack.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
MLA_SHIM=$(mktemp -d)
ln -s "$PWD/benchmarks" "$MLA_SHIM/benchmarks"
if ! python3 -c "import mla_compiler.runtime.loader" 2>/dev/null; then
  mkdir "$MLA_SHIM/mla_compiler"
  for f in mla_compiler/*; do ln -s "$PWD/$f" "$MLA_SHIM/mla_compiler/"; done
  ln -s "$PWD/runtime" "$MLA_SHIM/mla_compiler/runtime"
  ln -s "$PWD/schedules" "$MLA_SHIM/mla_compiler/schedules"
  ln -s "$PWD/model_export" "$MLA_SHIM/mla_compiler/model_export"
fi
export PYTHONPATH=$MLA_SHIM:$PYTHONPATH
mla() { python3 -m mla_compiler.cli "$@"; }
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
