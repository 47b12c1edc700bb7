"""Compile CUDA source with nvcc at build time (no GPU or driver needed) and read what came out.

- ``compile_cubin`` turns CUDA C++ (as TVM generates it) into a cubin for one arch and returns the
  ptxas resource report per kernel (registers, shared memory, spills).
- ``sass_opcodes`` counts SASS opcodes per kernel with ``cuobjdump -sass`` (which runs
  ``nvdisasm``): the PyPI packages ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``
  (dependencies of mla-compiler on Linux), or the CUDA toolkit's. ``inspect`` needs them.
- ``compile_ptx`` / ``make_fatbin`` / ``fatbin_images``: what ``cuda_build`` runs to build an
  artifact. Compiling needs nvcc (with its ptxas and fatbinary) only: ``fatbin_images`` reads the
  fatbin's own headers, so a CUDA install with nvcc but no cuobjdump compiles.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import struct
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
    packaged = name in ("cuobjdump", "nvdisasm")  # dependencies of mla-compiler on Linux
    raise TargetError(
        f"{name} not found: install the CUDA toolkit or `pip install nvidia-cuda-{name}`"
        + (" (a dependency of mla-compiler on Linux)" if packaged else "")
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
_SASS_LINE = re.compile(r"(/\*[0-9a-f]{4,}\*/)\s+(?:@!?U?P\w+\s+)?([A-Z][^;]*);")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")


def sass_opcodes(cubin: bytes) -> dict[str, dict[str, int]]:
    """SASS opcode counts per kernel of a cubin, e.g. ``{"attn": {"HMMA": 64, "LDSM": 32}}``."""
    return {k: dict(collections.Counter(ops)) for k, ops in sass_sequence(cubin).items()}


def sass_sequence(cubin: bytes) -> dict[str, list[str]]:
    """SASS opcodes per kernel of a cubin in program order (predicates and modifiers dropped)."""
    return {
        k: [_SASS_INSN.match(i).group(1) for i in insns]
        for k, insns in sass_instructions(cubin).items()
    }


def sass_instructions(cubin: bytes) -> dict[str, list[str]]:
    """SASS instructions per kernel in program order, as ``/*0a40*/ OP.MODS operands`` with the
    predicate and the trailing ``;`` dropped (e.g. ``/*2a60*/ WARPGROUP.DEPBAR.LE gsb0, 0x1``)."""
    tool = find_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"cuobjdump failed: {proc.stderr.strip()}")
    out: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if m := _SASS_FUNC.search(line):
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := _SASS_LINE.search(line)):
            current.append(f"{m.group(1)} {m.group(2).strip()}")
    return out


# --- build-time fatbin packing (used by mla_compiler.cuda_build) ---------------------------------

# The nvcc flags TVM's own CUDA compile paths use (tvm.support.nvcc: nvcc and NVRTC), so kernels
# compiled here get the register allocation of a TVM JIT build. ``-w``: TVM's source declares
# many unused temporaries. Not ``--use_fast_math`` (TVM's default): it turns ``powf(x, 2)`` into
# exp2(2*log2(x)), NaN for every negative x (seen on the H100 in RMSNorm, 2026-11-24).
TVM_NVCC_FLAGS: tuple[str, ...] = (
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--ptxas-options=--register-usage-level=10",  # TVM's default (TVM_CUDA_PTXAS_REG_LEVEL)
    "-w",
)


def arch_number(arch: str) -> str:
    """``sm_90a`` / ``compute_90a`` / ``90a`` -> ``90a``."""
    num = arch.removeprefix("sm_").removeprefix("compute_")
    if not re.fullmatch(r"\d{2,3}[af]?", num):
        raise TargetError(f"not a CUDA arch: {arch!r} (expected e.g. sm_89 or sm_90a)")
    return num


def compile_ptx(
    source: str, arch: str, *, workdir: str | Path | None = None, extra_flags: tuple[str, ...] = ()
) -> str:
    """Compile CUDA C++ to PTX for the virtual arch of ``arch`` (``sm_89`` -> ``compute_89``)."""
    nvcc = find_tool("nvcc")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, ptx = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.ptx"
        src.write_text(source)
        cmd = [nvcc, "--ptx", "-O3", f"-arch=compute_{arch_number(arch)}", *extra_flags]
        proc = subprocess.run([*cmd, "-o", str(ptx), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"nvcc --ptx failed for {arch}:\n{proc.stderr[-4000:]}")
        return ptx.read_text()


def make_fatbin(
    cubins: dict[str, bytes], ptx: dict[str, str], *, workdir: str | Path | None = None
) -> bytes:
    """Pack cubins (``{"sm_89": bytes}``) and PTX (``{"sm_89": text}``) into one fatbin."""
    tool = find_tool("fatbinary")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        images = []
        for kind, table in (("elf", cubins), ("ptx", ptx)):
            for arch, data in table.items():
                path = Path(tmp) / f"{arch_number(arch)}.{kind}"
                if isinstance(data, str):
                    path.write_text(data)
                else:
                    path.write_bytes(data)
                images.append(f"--image3=kind={kind},sm={arch_number(arch)},file={path}")
        out = Path(tmp) / "kernels.fatbin"
        proc = subprocess.run(
            [tool, "-64", f"--create={out}", *images], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise TargetError(f"fatbinary failed: {proc.stderr.strip()}")
        return out.read_bytes()


# Fatbin layout (``fatbinary --create``; CUDA's fatbinary_section.h for the container header):
# containers of a 16-byte header (magic, version, header size, size of the entries) followed by
# entries, each a header (kind, version, header size, payload size, ..., the SM number at byte
# 28, flags at byte 40) and its payload. Arch-specific (``sm_90a``) and family (``sm_100f``)
# images carry a flag beside the plain number.
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "compute", 2: "sm"}  # PTX, ELF (other kinds, e.g. LTO IR, are not listed)
_FATBIN_ARCH_SPECIFIC = 0x100000
_FATBIN_FAMILY = 0x200000


def fatbin_images(fatbin: bytes) -> list[str]:
    """Images in a fatbin in file order, as nvcc names them: ``["sm_89", "sm_90a", "compute_89"]``.

    Read from the fatbin's headers (compressed payloads are not opened), so building an artifact
    needs no cuobjdump; ``cuobjdump -lelf -lptx`` lists the same images (tests/test_nvcc_tools.py
    checks it), except that it names a family cubin (``sm_100f``) ``sm_100``."""
    if not fatbin:
        raise TargetError("not a fatbin: empty")
    found: list[str] = []
    off = 0
    while off < len(fatbin):
        if len(fatbin) - off < 16:
            raise TargetError(f"not a fatbin: {len(fatbin) - off} stray bytes at byte {off}")
        magic, _version, header, size = struct.unpack_from("<IHHQ", fatbin, off)
        if magic != _FATBIN_MAGIC:
            raise TargetError(f"not a fatbin: magic {magic:#x} at byte {off}")
        pos, end = off + header, off + header + size
        if end > len(fatbin):
            raise TargetError(f"truncated fatbin: {end} bytes announced, {len(fatbin)} present")
        while pos < end:
            if end - pos < 48:
                raise TargetError(f"truncated fatbin entry at byte {pos}")
            kind, _version, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, pos)
            if entry_header < 48:
                raise TargetError(f"corrupt fatbin: entry header of {entry_header} bytes at {pos}")
            (sm,) = struct.unpack_from("<I", fatbin, pos + 28)
            (flags,) = struct.unpack_from("<Q", fatbin, pos + 40)
            if kind in _FATBIN_KINDS:
                suffix = "a" if flags & _FATBIN_ARCH_SPECIFIC else ""
                suffix = "f" if flags & _FATBIN_FAMILY else suffix
                found.append(f"{_FATBIN_KINDS[kind]}_{sm}{suffix}")
            pos += entry_header + payload
        if pos != end:
            raise TargetError(f"corrupt fatbin: entries overrun their container at byte {end}")
        off = end
        while off < len(fatbin) and fatbin[off] == 0:  # padding before a further container
            off += 1
    return found
