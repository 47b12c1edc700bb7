"""Which CUDA tools each command needs (issue #27): ``compile`` for a GPU target runs nvcc (with
its ptxas and fatbinary) only, so a CUDA install with nvcc but no cuobjdump compiles; ``inspect``
reads SASS with cuobjdump, which runs nvdisasm: both come with the base install on Linux.

No GPU needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib

from mla_compiler import nvcc
from mla_compiler.errors import TargetError

ROOT = Path(__file__).resolve().parents[1]

KERNEL = 'extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n'


def _tool(name: str) -> str:
    try:
        return nvcc.find_tool(name)
    except TargetError:
        pytest.skip(f"{name} not installed")


def _without(*missing: str):
    """``nvcc.find_tool`` as on a machine where ``missing`` tools are nowhere to be found."""
    real = nvcc.find_tool

    def find_tool(name: str) -> str:
        if name in missing:
            raise TargetError(f"{name} not found (simulated)")
        return real(name)

    return find_tool


def _cuobjdump_images(fatbin: bytes) -> list[str]:
    """What ``cuobjdump -lelf -lptx`` lists, in nvcc's names."""
    with tempfile.NamedTemporaryFile(suffix=".fatbin") as f:
        f.write(fatbin)
        f.flush()
        out = subprocess.run(
            [_tool("cuobjdump"), "-lelf", "-lptx", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return [
        arch if kind == "ELF" else arch.replace("sm_", "compute_")
        for kind, arch in re.findall(r"(ELF|PTX) file\s+\d+: \S*?\.(sm_\w+?)\.(?:cubin|ptx)", out)
    ]


@pytest.fixture(scope="module")
def images() -> dict:
    """A tiny kernel as cubins (sm_80, sm_89, sm_90a) and PTX (compute_80, compute_90a)."""
    _tool("nvcc")
    cubins = {a: nvcc.compile_cubin(KERNEL, a)[0] for a in ("sm_80", "sm_89", "sm_90a")}
    ptx = {a: nvcc.compile_ptx(KERNEL, a) for a in ("sm_80", "sm_90a")}
    return {"cubins": cubins, "ptx": ptx}


def test_fatbin_images_read_without_cuobjdump(images, monkeypatch):
    """``fatbin_images`` (what the build records as the artifact's images) reads the fatbin's
    headers itself, in file order, and agrees with cuobjdump."""
    cubins, ptx = images["cubins"], images["ptx"]
    fatbins = {
        "cubins then ptx": nvcc.make_fatbin(cubins, ptx),
        "one cubin": nvcc.make_fatbin({"sm_90a": cubins["sm_90a"]}, {}),
        "ptx only": nvcc.make_fatbin({}, {"sm_80": ptx["sm_80"]}),
    }
    expected = {
        "cubins then ptx": ["sm_80", "sm_89", "sm_90a", "compute_80", "compute_90a"],
        "one cubin": ["sm_90a"],
        "ptx only": ["compute_80"],
    }
    from_cuobjdump = {k: _cuobjdump_images(f) for k, f in fatbins.items()}
    monkeypatch.setattr(nvcc, "find_tool", _without("cuobjdump", "nvdisasm"))
    for what, fatbin in fatbins.items():
        assert nvcc.fatbin_images(fatbin) == expected[what] == from_cuobjdump[what], what
    both = fatbins["one cubin"] + bytes(8) + fatbins["ptx only"]  # two containers, padded
    assert nvcc.fatbin_images(both) == ["sm_90a", "compute_80"]


@pytest.mark.parametrize("bad", [b"", b"\x00" * 64, b"ELF" * 20])
def test_fatbin_images_refuses_what_is_not_a_fatbin(bad):
    with pytest.raises(TargetError, match="fatbin"):
        nvcc.fatbin_images(bad)


def test_fatbin_images_refuses_a_truncated_fatbin(images):
    fatbin = nvcc.make_fatbin({"sm_89": images["cubins"]["sm_89"]}, {})
    for cut in (8, 40, len(fatbin) - 1):
        with pytest.raises(TargetError, match="fatbin"):
            nvcc.fatbin_images(fatbin[:cut])


def test_gpu_build_needs_no_cuobjdump(tmp_path, monkeypatch):
    """``cuda_build.build`` (what ``compile --target sm_90a`` runs after the Relax pipeline) on a
    machine whose CUDA install has nvcc but neither cuobjdump nor nvdisasm."""
    _tool("nvcc")
    from mla_compiler import cuda_build

    monkeypatch.setattr(nvcc, "find_tool", _without("cuobjdump", "nvdisasm"))
    res = cuda_build.build(
        cuda_build.smoke_module(), ["sm_90a"], output=tmp_path, name="smoke", ptx=False
    )
    assert res.images == ("sm_90a",)
    assert json.loads(res.manifest.read_text())["images"] == ["sm_90a"]


def test_inspect_tools_are_base_dependencies(images, tmp_path):
    """cuobjdump and nvdisasm are base dependencies on Linux, and the packaged pair reads SASS
    with no CUDA tool on the PATH (cuobjdump -sass finds nvdisasm beside itself)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\s;<>=\[]", d, maxsplit=1)[0] for d in deps}
    assert {"nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"} <= names, deps
    if not sys.platform.startswith("linux"):
        return
    code = (
        "import sys; from pathlib import Path; from mla_compiler import nvcc\n"
        "ops = nvcc.sass_opcodes(Path(sys.argv[1]).read_bytes())\n"
        "print(nvcc.find_tool('cuobjdump')); print(sorted(ops))\n"
    )
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(images["cubins"]["sm_90a"])
    env = {"PATH": str(tmp_path), "CUDA_HOME": str(tmp_path)}  # no CUDA tool on the PATH
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cubin)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "['add_one']", proc.stdout
