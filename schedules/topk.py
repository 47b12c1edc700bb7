"""Row-wise top-k by repeated selection: k passes over each row, one row per thread.

Meant for routing (E <= 256 experts, k <= 8), where it beats a sort and needs no runtime
library: TVM's own topk calls ``tvm.contrib.sort`` functions that runtime-only deployments lack.
Ties go to the lowest index.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from mla_compiler.schedules.target import is_gpu


def topk(width: int, k: int, *, target: tvm.target.Target, threads: int = 64) -> tvm.tirx.PrimFunc:
    """scores [T, width] float32 -> values [T, k] float32, indices [T, k] int32 (descending)."""

    @T.prim_func(s_tir=True)
    def kernel(var_x: T.handle, var_val: T.handle, var_idx: T.handle):
        T.func_attr({"global_symbol": "moe_topk", "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, width), "float32")
        val = T.match_buffer(var_val, (n, k), "float32")
        idx = T.match_buffer(var_idx, (n, k), "int32")
        for i in range(n):
            with T.sblock("row"):
                vi = T.axis.spatial(n, i)
                T.reads(x[vi, :])
                T.writes(val[vi, :], idx[vi, :])
                best = T.alloc_buffer((1,), "float32", scope="local")
                arg = T.alloc_buffer((1,), "int32", scope="local")
                for j in range(k):
                    best[0] = T.float32(-3.0e38)
                    arg[0] = -1
                    for e in range(width):
                        taken = T.alloc_buffer((1,), "int32", scope="local")
                        taken[0] = 0
                        for p in range(j):
                            if idx[vi, p] == e:
                                taken[0] = 1
                        if taken[0] == 0 and (x[vi, e] > best[0] or arg[0] < 0):
                            best[0] = x[vi, e]
                            arg[0] = e
                    val[vi, j] = best[0]
                    idx[vi, j] = arg[0]

    sch = tvm.s_tir.Schedule(kernel)
    (loop,) = sch.get_loops(sch.get_sblock("row"))
    if is_gpu(target):
        bx, tx = sch.split(loop, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.parallel(loop)
    return sch.mod["main"]
