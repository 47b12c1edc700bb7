"""Runtime-only loading (the compiler library never enters the process) and the arch rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tvm

from mla_compiler import cuda_build
from mla_compiler.errors import ArtifactError, TargetError
from mla_compiler.runtime import loader

RUN_SMOKE = """
import json, sys
from mla_compiler.runtime import loader
if sys.argv[2] == "call":
    loader.use_runtime_only()
elif sys.argv[2] == "full":
    import tvm.relax  # the compiler, loaded on purpose: the control case
row = loader.run_smoke(sys.argv[1], "cpu")
import tvm
row["runtime_only"] = bool(tvm.base._RUNTIME_ONLY)
print(json.dumps(row))
"""


def _run(artifact: Path, mode: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RUN_SMOKE, str(artifact), mode],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpu_smoke")
    cuda_build.write_smoke_artifact(out, ["cpu"])
    return out


@pytest.fixture(scope="module")
def tvm_without_compiler(tmp_path_factory) -> Path:
    """A site dir whose ``tvm`` package lacks libtvm_compiler.so (links to the real files)."""
    site = tmp_path_factory.mktemp("site")
    real = Path(tvm.__file__).parent
    (site / "tvm" / "lib").mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "lib":
            (site / "tvm" / entry.name).symlink_to(entry)
    for lib in (real / "lib").glob("libtvm_runtime*.so"):
        (site / "tvm" / "lib" / lib.name).symlink_to(lib)
    return site


@pytest.mark.parametrize(
    "mode",
    ["use_runtime_only", "env_TVM_USE_RUNTIME_LIB", "compiler_absent", "full_tvm_control"],
)
def test_cpu_artifact_runs_without_compiler(cpu_artifact, tvm_without_compiler, mode):
    env = {"TVM_USE_RUNTIME_LIB": ""}
    if mode == "env_TVM_USE_RUNTIME_LIB":
        env["TVM_USE_RUNTIME_LIB"] = "1"
    if mode == "compiler_absent":
        env["PYTHONPATH"] = os.pathsep.join([str(tvm_without_compiler), *sys.path])
    arg = {"use_runtime_only": "call", "full_tvm_control": "full"}.get(mode, "none")
    row = _run(cpu_artifact, arg, env)
    assert row["status"] == "ok", row
    full = mode == "full_tvm_control"  # proves the maps check sees the compiler when present
    assert row["compiler_loaded"] is full and row["runtime_only"] is not full


class FakeGPU:
    def __init__(self, compute_version: str):
        self.compute_version = compute_version


@pytest.mark.parametrize(
    ("images", "gpu", "expected"),
    [
        (["sm_89", "sm_90a", "compute_89"], "9.0", "sm_90a"),
        (["sm_89", "sm_90a", "compute_89"], "8.9", "sm_89"),
        (["sm_89", "compute_89"], "9.0", "compute_89"),
        (["sm_89", "compute_89"], "10.0", "compute_89"),
        (["sm_80"], "8.6", "sm_80"),
        (["sm_80", "sm_86"], "8.9", "sm_86"),
        (["sm_80", "compute_80", "sm_90a"], "12.0", "compute_80"),
    ],
    ids=[
        "h100-cubin",
        "rtx4080-cubin",
        "h100-ptx-of-sm89",
        "blackwell-ptx",
        "ampere-binary-compat",
        "newest-compatible-cubin",
        "sm120-ptx",
    ],
)
def test_check_arch_picks_image(images, gpu, expected):
    assert loader.check_arch(images, FakeGPU(gpu)) == expected


@pytest.mark.parametrize(
    ("images", "gpu", "want"),
    [
        (["sm_89"], "9.0", "sm_90a"),
        (["sm_90a"], "8.9", "sm_89"),
        (["sm_90a"], "10.0", "sm_100a"),
        (["sm_90a", "compute_90a"], "10.0", "sm_100a"),
        (["sm_89", "compute_89"], "8.6", "sm_86"),
        ([], "9.0", "sm_90a"),
    ],
    ids=[
        "sm89-only-on-h100",
        "sm90a-on-rtx4080",
        "sm90a-on-blackwell",
        "arch-specific-ptx-does-not-forward",
        "ptx-newer-than-gpu",
        "no-cuda-code",
    ],
)
def test_check_arch_refuses_naming_the_arch(images, gpu, want):
    with pytest.raises(TargetError, match=f"recompile with --target {want}$"):
        loader.check_arch(images, FakeGPU(gpu))


def test_device_capability_forms():
    assert loader.device_capability((9, 0)) == (9, 0)
    assert loader.device_capability("8.9") == (8, 9)
    assert loader.device_capability(FakeGPU("10.0")) == (10, 0)


def test_load_refuses_mismatched_device(cpu_artifact, tmp_path):
    with pytest.raises(TargetError, match="cannot run on a GPU"):
        loader.load_module(cpu_artifact, "cuda")
    with pytest.raises(ArtifactError, match="library missing"):
        loader.load_module(tmp_path / "nothing.so", "cpu")
    with pytest.raises(ArtifactError, match="expected one"):
        loader.load_module(tmp_path, "cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"m{loader.MANIFEST_SUFFIX}").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="not an mla-compiler"):
        loader.load_module(broken, "cpu")


def test_gpu_artifact_on_cpu_is_refused(tmp_path):
    mod = cuda_build.smoke_module(m=16, n=16, k=16)
    cuda_build.build(mod, ["sm_89"], output=tmp_path)
    with pytest.raises(TargetError, match="cannot run on the CPU"):
        loader.load_module(tmp_path, "cpu")
    if not tvm.cuda(0).exist:  # no driver here: the CUDA runtime cannot load, said plainly
        with pytest.raises(TargetError, match="libcuda.so.1"):
            loader.load_module(tmp_path, "cuda")
