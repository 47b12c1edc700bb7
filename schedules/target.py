"""Target names of the CLI (``cpu``, ``sm_89``, ``sm_90a``, ...) and what each GPU offers.

Per-kernel config dataclasses live beside each kernel factory; this module only knows the
hardware limits they are pruned against.
"""

from __future__ import annotations

import dataclasses

import tvm

from mla_compiler.errors import TargetError

# TVM pass options every GPU build runs under: ``tirx.use_async_copy`` lowers the kernels'
# software-pipelined shared-memory copies to cp.async (without it they stay synchronous)
PASS_CONFIG = {"tirx.use_async_copy": True}


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Hardware limits a schedule config must fit (per block / per SM)."""

    arch: str  # "sm_89", "sm_90a"
    sm_count: int
    max_shared_bytes_per_block: int
    registers_per_sm: int = 65536
    has_wgmma: bool = False
    has_tma: bool = False  # cp.async.bulk + mbarrier transaction counts (sm_90)
    has_pdl: bool = False  # griddepcontrol: programmatic dependent launch (sm_90)


def register_cap(warps: int, registers_per_sm: int = 65536) -> int:
    """Registers per thread ptxas may give a block of ``warps`` warps (it allocates in steps of
    8, at most 255) when the block is to fit in one SM's register file. The file is four
    sub-partitions' quarters, the warps dealt round them: 13 warps put 4 in one (128 each)."""
    per_partition = -(-warps // 4)
    return min(255, registers_per_sm // 4 // (per_partition * 32) // 8 * 8)


GPUS: dict[str, GPUSpec] = {
    "sm_80": GPUSpec("sm_80", sm_count=108, max_shared_bytes_per_block=163 * 1024),
    "sm_86": GPUSpec("sm_86", sm_count=84, max_shared_bytes_per_block=99 * 1024),
    # RTX 4080: the user's named GPU
    "sm_89": GPUSpec("sm_89", sm_count=76, max_shared_bytes_per_block=99 * 1024),
    "sm_90": GPUSpec(
        "sm_90", sm_count=132, max_shared_bytes_per_block=227 * 1024, has_tma=True, has_pdl=True
    ),
    # H100 SXM: the GPU we measure on
    "sm_90a": GPUSpec(
        "sm_90a",
        sm_count=132,
        max_shared_bytes_per_block=227 * 1024,
        has_wgmma=True,
        has_tma=True,
        has_pdl=True,
    ),
}


def parse_targets(spec: str) -> list[str]:
    """Split a CLI target string (``cpu`` or ``sm_89,sm_90a``) into known names."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise TargetError("empty --target: use cpu, or one or more of " + ", ".join(GPUS))
    for n in names:
        if n != "cpu" and n not in GPUS:
            raise TargetError(f"unknown target {n!r}: use cpu, or one or more of {', '.join(GPUS)}")
    if "cpu" in names and len(names) > 1:
        raise TargetError("target cpu cannot be combined with GPU archs: compile them separately")
    return names


def tvm_target(name: str) -> tvm.target.Target:
    """The TVM target for one CLI target name (the host is always llvm)."""
    if name == "cpu":
        return tvm.target.Target({"kind": "llvm"})
    if name not in GPUS:
        raise TargetError(f"unknown target {name!r}: use cpu, or one of {', '.join(GPUS)}")
    return tvm.target.Target({"kind": "cuda", "arch": name}, host={"kind": "llvm"})


def is_gpu(target: tvm.target.Target | str) -> bool:
    kind = target if isinstance(target, str) else target.kind.name
    return kind not in ("cpu", "llvm")


def gpu_spec(target: tvm.target.Target) -> GPUSpec:
    arch = str(target.attrs.get("arch", ""))
    if arch not in GPUS:
        raise TargetError(f"no GPU spec for arch {arch!r}: known archs are {', '.join(GPUS)}")
    return GPUS[arch]
