"""The schedule of the small element-wise kernels (block decoders, row lookups, GEMV epilogues):
one GPU thread per element."""

from __future__ import annotations

from tvm import s_tir

from .target import is_gpu

THREADS = 256


def thread_per_element(sch: s_tir.Schedule, block, target):
    """Fuse ``block``'s loops: on a GPU blocks of ``THREADS`` threads over them, else one
    parallel loop (``target`` None: the CPU). Returns the loop of one element."""
    fused = sch.fuse(*sch.get_loops(block))
    if target is None or not is_gpu(target):
        sch.parallel(fused)
        return fused
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx
