"""Compile CUDA source with nvcc at build time (no GPU or driver needed) and read what came out.

- ``compile_cubin`` turns CUDA C++ (as TVM generates it) into a cubin for one arch and returns the
  ptxas resource report per kernel (registers, shared memory, spills).
- ``sass_opcodes`` counts SASS opcodes per kernel with ``cuobjdump`` (PyPI package
  ``nvidia-cuda-cuobjdump``, or one on the PATH).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mla_compiler.errors import TargetError


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """ptxas' report for one kernel."""

    name: str
    registers: int
    shared_bytes: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int


def find_tool(name: str) -> str:
    """Path of a CUDA tool: PATH, then CUDA_HOME/bin, then the nvidia-* PyPI packages."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    try:
        import nvidia  # namespace package of the nvidia-cuda-* wheels

        for base in nvidia.__path__:
            for cand in Path(base).glob(f"*/bin/{name}"):
                return str(cand)
    except ImportError:
        pass
    raise TargetError(
        f"{name} not found: install the CUDA toolkit or `pip install nvidia-cuda-{name}` "
        "(dev extra of mla-compiler)"
    )


def gencode_flags(arch: str) -> list[str]:
    """nvcc flags that build machine code for ``arch`` (``sm_90a`` -> compute_90a/sm_90a)."""
    num = arch.removeprefix("sm_")
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per-kernel resources from ``ptxas -v`` output."""
    out: dict[str, KernelResources] = {}
    name, stack, spill = None, 0, 0
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            name, stack, spill = m.group(1), 0, 0
        elif name and (m := _PTXAS_STACK.search(line)):
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif name and (m := _PTXAS_REGS.search(line)):
            smem = _PTXAS_SMEM.search(line)
            out[name] = KernelResources(
                name=name,
                registers=int(m.group(1)),
                shared_bytes=int(smem.group(1)) if smem else 0,
                spill_bytes=spill,
                stack_bytes=stack,
            )
            name = None
    return out


def compile_cubin(
    source: str, arch: str, *, workdir: str | Path | None = None, extra_flags: tuple[str, ...] = ()
) -> tuple[bytes, dict[str, KernelResources]]:
    """Compile CUDA C++ to a cubin for ``arch``; return it and ptxas' per-kernel report."""
    nvcc = find_tool("nvcc")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        src.write_text(source)
        cmd = [nvcc, "--cubin", "-O3", "-Xptxas", "-v", *gencode_flags(arch), *extra_flags]
        cmd += ["-o", str(cubin), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}")
        return cubin.read_bytes(), parse_ptxas_log(proc.stderr + proc.stdout)


_SASS_FUNC = re.compile(r"Function : (\S+)")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def sass_opcodes(cubin: bytes) -> dict[str, dict[str, int]]:
    """SASS opcode counts per kernel of a cubin, e.g. ``{"attn": {"HMMA": 64, "LDSM": 32}}``."""
    tool = find_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"cuobjdump failed: {proc.stderr.strip()}")
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in proc.stdout.splitlines():
        if m := _SASS_FUNC.search(line):
            current = counts.setdefault(m.group(1), collections.Counter())
        elif current is not None and (m := _SASS_INSN.search(line)):
            current[m.group(1)] += 1
    return {k: dict(v) for k, v in counts.items()}
