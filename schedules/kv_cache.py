"""Latent KV cache kernels: write new rows in place, gather rows for decompression.

The cache is ``[layers, rows, width]``; ``layer`` is a run-time scalar so one kernel serves every
layer.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from mla_compiler.schedules.target import is_gpu


def schedule_elementwise(
    func: tvm.tirx.PrimFunc, target: tvm.target.Target, *, block: str, threads: int = 256
) -> tvm.tirx.PrimFunc:
    """Fuse the loops of a one-block kernel; parallel on CPU, one element per thread on GPU."""
    sch = tvm.s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock(block))
    fused = sch.fuse(*loops)
    if is_gpu(target):
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        outer, inner = sch.split(fused, [None, 64])
        sch.parallel(outer)
    return sch.mod["main"]


def cache_write(width: int, *, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """In place: ``cache[layer, slot_rows[i], :] = rows[i, :]`` for each new token i."""

    @T.prim_func(s_tir=True)
    def write(var_cache: T.handle, var_rows: T.handle, var_slots: T.handle, layer: T.int64):
        T.func_attr({"global_symbol": "kv_cache_write", "tirx.noalias": True})
        n_layers, n_rows, n_new = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (n_layers, n_rows, width), dtype)
        rows = T.match_buffer(var_rows, (n_new, width), dtype)
        slots = T.match_buffer(var_slots, (n_new,), "int32")
        for i, j in T.grid(n_new, width):
            with T.sblock("write"):
                vi, vj = T.axis.remap("SS", [i, j])
                cache[layer, T.Cast("int64", slots[vi]), vj] = rows[vi, vj]

    return schedule_elementwise(write, target, block="write")


def cache_gather(width: int, *, dtype: str, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """``out[i, :] = cache[layer, kv_rows[i], :]``: the rows a decompressed attention reads."""

    @T.prim_func(s_tir=True)
    def gather(var_cache: T.handle, var_idx: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"global_symbol": "kv_cache_gather", "tirx.noalias": True})
        n_layers, n_rows, n = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (n_layers, n_rows, width), dtype)
        idx = T.match_buffer(var_idx, (n,), "int32")
        out = T.match_buffer(var_out, (n, width), dtype)
        for i, j in T.grid(n, width):
            with T.sblock("gather"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = cache[layer, T.Cast("int64", idx[vi]), vj]

    return schedule_elementwise(gather, target, block="gather")
