"""Routed-expert MoE kernels: routing, device-side token grouping, grouped GEMMs, combine.

One MoE layer (T tokens, E experts, top-k, hidden D, expert width I) runs, with no host sync:

1. :func:`moe_route` (``moe_route.py``, re-exported here): logits [T, E] (f32) -> weights
   [T, k] (f32), ids [T, k] (int32). Softmax, then greedy or group-limited greedy top-k; ties go
   to the lowest expert index (``reference.moe_route_lowest_index`` follows the same rule).
2. :func:`moe_align` (3 kernels): ids -> ``sorted_rows`` [NB*BM] (flat entry ``t*k + j`` per
   row, experts contiguous, each expert's rows padded to a multiple of BM with -1),
   ``block_expert`` [NB] (expert of each BM-row block, -1 when unused; used blocks come first),
   ``row_of`` [T*k] (row of each entry: the inverse permutation), ``expert_offsets`` [E+1].
   Deterministic (no atomics): per-chunk counts, per-expert prefix sums and block offsets (one
   block, a thread per expert), then an in-order scatter.
   ``NB = num_row_blocks(T)`` is a static bound: ``(T*k + E*(BM-1)) // BM``.
3. :func:`moe_gate_up`: grouped GEMM over row blocks, ``H[r] = silu(x Wg^T) * (x Wu^T)`` with the
   token row gathered through ``sorted_rows`` and the expert's ``gate_up`` weight [E, 2I, D]
   (pre-interleaved by ``gemm.transform_weight(..., epilogue="silu_mul")``).
4. :func:`moe_down`: grouped GEMM ``Y[r] = w_r * (H[r] @ Wd^T)`` with ``down`` [E, D, I]; the
   routing weight is applied in the epilogue; rows stay in expert order.
5. :func:`moe_combine`: ``out[t] = sum_j Y[row_of[t*k + j]]`` back in token order (a gather-sum:
   deterministic, where a scatter-add would need atomics).

On CUDA the grouped GEMMs use the tensor-core schedule of ``gemm.py`` with the row block as the
batch axis (blockIdx.y); blocks whose ``block_expert`` is -1 exit at once.

``weight_format`` (a GGUF format of ``quant_formats.FORMATS``): the expert weights stay in their
GGUF blocks, ``uint8 [E, rows, row_bytes(K)]``; block ``gather_b`` decodes each value with
``fmt.value`` and the schedules inline it into the weight tile's loads (CUDA: the shared-memory
fetch, unrolled; CPU: the reduction), so no dequantized copy exists anywhere.

Small static T (decode): :func:`moe_route`, then the expert GEMVs of ``moe_gemv.py``.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from . import gemm as G
from .moe_route import (  # noqa: F401  (routing lives in moe_route.py: re-exported)
    ROUTE_METHODS,
    ROUTE_WARPS,
    THREADS,
    RouteSpec,
    _i64,
    _named,
    _par,
    moe_route,
)
from .quant_decode import fast_value
from .quant_formats import FORMATS
from .target import is_gpu

CHUNK = 32  # tokens per chunk in moe_align's counting pass


# --------------------------------------------------------------------------------- grouping


def num_row_blocks(num_tokens, *, top_k: int, num_experts: int, block_m: int):
    """Static bound on the row blocks of the grouped layout (int or PrimExpr in num_tokens)."""
    return (num_tokens * top_k + num_experts * (block_m - 1)) // block_m


def moe_align(
    num_experts: int, top_k: int, *, block_m: int, target: tvm.target.Target
) -> tirx.PrimFunc:
    """ids [T, k] -> sorted_rows [NB*BM], block_expert [NB], row_of [T*k], expert_offsets [E+1],
    with workspace chunk_base [ceil(T/CHUNK), E] (int32). See the module docstring."""
    e_num, k_top, bm = num_experts, top_k, block_m
    if e_num > 1024:
        raise ValueError(f"moe_align runs a thread per expert in one block: {e_num} > 1024")
    par = _par(is_gpu(target))
    t_num = tirx.Var("t", "int64")
    nb = num_row_blocks(t_num, top_k=k_top, num_experts=e_num, block_m=bm)
    n_chunk = (t_num + CHUNK - 1) // CHUNK
    n_rows = nb * bm

    @T.prim_func
    def align(
        ids: T.Buffer((t_num, k_top), "int32"),
        sorted_rows: T.Buffer((n_rows,), "int32"),
        block_expert: T.Buffer((nb,), "int32"),
        row_of: T.Buffer((t_num * k_top,), "int32"),
        expert_offsets: T.Buffer((e_num + 1,), "int32"),
        chunk_base: T.Buffer((n_chunk, e_num), "int32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # 1. per (chunk, expert) counts; meanwhile every row becomes padding (-1)
        for bx in par(n_chunk, "blockIdx.x"):
            for e in par(e_num, "threadIdx.x"):
                cnt = T.alloc_buffer((1,), "int32", scope="local")
                for it in range((n_rows + n_chunk * e_num - 1) // (n_chunk * e_num)):
                    if (it * n_chunk + bx) * e_num + e < n_rows:
                        sorted_rows[(it * n_chunk + bx) * e_num + e] = -1
                cnt[0] = 0
                for tt in range(CHUNK):
                    if bx * CHUNK + tt < t_num:
                        for j in range(k_top):
                            if ids[bx * CHUNK + tt, j] == e:
                                cnt[0] = cnt[0] + 1
                chunk_base[bx, e] = cnt[0]
        # 2. one block, a thread per expert: exclusive prefix over chunks (chunk_base), then
        # the padded expert offsets and the expert of each row block (-1 past the used ones)
        for _bx in par(1, "blockIdx.x"):
            nblk = T.alloc_buffer((e_num,), "int32", scope="shared")
            for e in par(e_num, "threadIdx.x"):
                run = T.alloc_buffer((1,), "int32", scope="local")
                run[0] = 0
                for c in range(n_chunk):
                    v = chunk_base[c, e]
                    chunk_base[c, e] = run[0]
                    run[0] = run[0] + v
                nblk[e] = (run[0] + (bm - 1)) // bm
            for e in par(e_num, "threadIdx.x"):
                # blocks before e, all blocks, e's blocks, a counter (a shared load in a loop
                # bound trips TVM's thread-sync analysis: e's count goes through a register)
                acc = T.alloc_buffer((4,), "int32", scope="local")
                acc[0] = 0
                acc[1] = 0
                for f in range(e_num):
                    acc[1] = acc[1] + nblk[f]
                    if f < e:
                        acc[0] = acc[0] + nblk[f]
                expert_offsets[e] = acc[0] * bm
                if e == e_num - 1:
                    expert_offsets[e_num] = acc[1] * bm
                acc[2] = nblk[e]
                acc[3] = 0
                while acc[3] < acc[2]:
                    block_expert[acc[0] + acc[3]] = e
                    acc[3] = acc[3] + 1
                for it in range((nb + e_num - 1) // e_num):
                    if it * e_num + e < nb and it * e_num + e >= T.Cast("int64", acc[1]):
                        block_expert[it * e_num + e] = -1
        # 3. in-order scatter of each chunk's entries to its expert's rows
        for bx in par(n_chunk, "blockIdx.x"):
            for e in par(e_num, "threadIdx.x"):
                pos = T.alloc_buffer((1,), "int32", scope="local")
                pos[0] = expert_offsets[e] + chunk_base[bx, e]
                for tt in range(CHUNK):
                    if bx * CHUNK + tt < t_num:
                        for j in range(k_top):
                            if ids[bx * CHUNK + tt, j] == e:
                                flat = T.Cast("int32", (bx * CHUNK + tt) * k_top + j)
                                sorted_rows[pos[0]] = flat
                                row_of[flat] = pos[0]
                                pos[0] = pos[0] + 1

    return _named(align, f"moe_align_e{e_num}_k{k_top}_bm{bm}")


# ------------------------------------------------------------------------- grouped GEMMs


CONFIGS: dict[str, G.GemmConfig] = {
    # 64-row blocks: experts get ~T*k/E rows each, so smaller M tiles waste less padding
    "sm_89": G.GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=32, stages=4),
    "sm_90a": G.GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=32, stages=4),
}
CPU_BLOCK_M = 16

# Prefill candidates for `benchmarks.bench_moe --sweep` (CONFIGS is picked from the sweep).
# At T=2048 an expert averages T*k/E = 192 rows: 64-row blocks
# pad ~1/6 of the rows (E/2 blocks of padding), 128-row blocks ~1/3. The dense GEMM's best
# sm_90a tile is 128x256 (8 warps): 64x256 keeps its column reuse with small M blocks.
CANDIDATES: dict[str, tuple[G.GemmConfig, ...]] = {
    "sm_90a": (
        G.GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=32, stages=4),  # 64x128
        G.GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=64, stages=3),
        G.GemmConfig(warps_m=1, warps_n=4, warp_m=64, warp_n=32, block_k=32, stages=4),
        G.GemmConfig(warps_m=2, warps_n=4, warp_m=32, warp_n=64, block_k=32, stages=4),  # 64x256
        G.GemmConfig(warps_m=2, warps_n=4, warp_m=32, warp_n=64, block_k=64, stages=3),
        G.GemmConfig(warps_m=1, warps_n=4, warp_m=64, warp_n=64, block_k=32, stages=4),
        G.GemmConfig(warps_m=2, warps_n=2, warp_m=64, warp_n=64, block_k=32, stages=4),  # 128x128
        G.GemmConfig(warps_m=2, warps_n=4, warp_m=64, warp_n=64, block_k=32, stages=4),  # 128x256
    ),
    "sm_89": (
        G.GemmConfig(warps_m=2, warps_n=2, warp_m=32, warp_n=64, block_k=32, stages=4),
        G.GemmConfig(warps_m=2, warps_n=2, warp_m=64, warp_n=64, block_k=32, stages=3),
    ),
}


def default_config(target: tvm.target.Target) -> G.GemmConfig:
    if not is_gpu(target):
        return G.GemmConfig(warps_m=1, warps_n=1, warp_m=CPU_BLOCK_M, warp_n=64)
    return CONFIGS.get(str(target.attrs.get("arch", "")), CONFIGS["sm_89"])


def stacked_row(j, inter):
    """Row of ``[gate; up]`` (the checkpoint's order) that row ``j`` of the SWIGLU-interleaved
    layout (``gemm.transform_weight``) holds."""
    g = G.SWIGLU_GROUP
    return j // (2 * g) * g + j % g + (j // g) % 2 * inter


def _expert_weight(rows: int, k: int, dtype: str, weight_format: str | None, *, stacked=None):
    """(row-buffer shape, dtype, value fn) of an expert weight [E, rows, k]: ``value(w, e, j,
    kk)`` is element (e, j, kk), a plain load or the GGUF format's decode of its bytes.
    ``stacked`` (gate_up's I): the blocks keep ``[gate; up]`` order, row ``j`` of the
    interleaved layout is read from ``stacked_row(j, I)`` (no interleaved copy of them)."""
    if weight_format is None:
        return (rows, k), dtype, lambda w, e, j, kk: w[e, j, kk]
    fmt = FORMATS[weight_format]
    row = (lambda j: j) if stacked is None else (lambda j: stacked_row(j, stacked))  # noqa: E731
    return (
        (rows, fmt.row_bytes(k)), "uint8",
        lambda w, e, j, kk: fast_value(fmt, w, (e, row(j)), kk, dtype),  # exponent-trick casts
    )  # fmt: skip


def _grouped_workload(
    kind: str,
    *,
    d: int,
    inter: int,
    e_num: int,
    k_top: int,
    bm: int,
    dtype,
    early_exit: bool,
    weight_format: str | None = None,
):
    """kind "gate_up": H = silu_mul(gather(x) @ gate_up[e]^T); "down": Y = w * (H @ down[e]^T)."""
    nb = tirx.Var("nb", "int64")
    t_num = tirx.Var("t", "int64")
    g = _i64(G.SWIGLU_GROUP)
    rows, k_in = (2 * inter, d) if kind == "gate_up" else (d, inter)
    (w_rows, w_cols), w_dtype, w_val = _expert_weight(
        rows, k_in, dtype, weight_format, stacked=inter if kind == "gate_up" else None
    )
    w_shape = (_i64(e_num), _i64(w_rows), _i64(w_cols))
    d, inter, bm = _i64(d), _i64(inter), _i64(bm)

    if kind == "gate_up":
        n2 = 2 * inter

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer((t_num, d), dtype),
            sorted_rows: T.Buffer((nb * bm,), "int32"),
            block_expert: T.Buffer((nb,), "int32"),
            w: T.Buffer(w_shape, w_dtype),
            h: T.Buffer((nb * bm, inter), dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            a = T.sblock_alloc_buffer((nb, bm, d), dtype)
            b = T.sblock_alloc_buffer((nb, n2, d), dtype)
            c = T.sblock_alloc_buffer((nb, bm, n2), "float32")
            for rb, i, kk in T.grid(nb, bm, d):
                with T.sblock("gather_a"):
                    vb, vi, vk = T.axis.remap("SSS", [rb, i, kk])
                    a[vb, vi, vk] = T.if_then_else(
                        sorted_rows[vb * bm + vi] >= 0,
                        x[T.max(sorted_rows[vb * bm + vi], 0) // k_top, vk],
                        T.Cast(dtype, 0),
                    )
            for rb, j, kk in T.grid(nb, n2, d):
                with T.sblock("gather_b"):
                    vb, vj, vk = T.axis.remap("SSS", [rb, j, kk])
                    b[vb, vj, vk] = w_val(w, T.max(block_expert[vb], 0), vj, vk)
            for rb, i, j, kk in T.grid(nb, bm, n2, d):
                with T.sblock("gemm"):
                    vb, vi, vj, vk = T.axis.remap("SSSR", [rb, i, j, kk])
                    with T.init():
                        c[vb, vi, vj] = T.float32(0)
                    c[vb, vi, vj] = c[vb, vi, vj] + T.Cast("float32", a[vb, vi, vk]) * T.Cast(
                        "float32", b[vb, vj, vk]
                    )
            for rb in range(nb):
                if early_exit:
                    if block_expert[rb] < 0:  # unused row blocks (all at the end) exit
                        T.evaluate(T.thread_return())
                for i, o in T.grid(bm, inter):
                    with T.sblock("epilogue"):
                        vb, vi, vo = T.axis.remap("SSS", [rb, i, o])
                        h[vb * bm + vi, vo] = T.Cast(
                            dtype,
                            T.sigmoid(c[vb, vi, vo // g * 2 * g + vo % g])
                            * c[vb, vi, vo // g * 2 * g + vo % g]
                            * c[vb, vi, vo // g * 2 * g + g + vo % g],
                        )

        return func

    @T.prim_func(s_tir=True)
    def func(
        h: T.Buffer((nb * bm, inter), dtype),
        sorted_rows: T.Buffer((nb * bm,), "int32"),
        block_expert: T.Buffer((nb,), "int32"),
        w: T.Buffer(w_shape, w_dtype),
        weights: T.Buffer((t_num, k_top), "float32"),
        y: T.Buffer((nb * bm, d), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        a = T.sblock_alloc_buffer((nb, bm, inter), dtype)
        b = T.sblock_alloc_buffer((nb, d, inter), dtype)
        c = T.sblock_alloc_buffer((nb, bm, d), "float32")
        for rb, i, kk in T.grid(nb, bm, inter):
            with T.sblock("gather_a"):
                vb, vi, vk = T.axis.remap("SSS", [rb, i, kk])
                a[vb, vi, vk] = h[vb * bm + vi, vk]
        for rb, j, kk in T.grid(nb, d, inter):
            with T.sblock("gather_b"):
                vb, vj, vk = T.axis.remap("SSS", [rb, j, kk])
                b[vb, vj, vk] = w_val(w, T.max(block_expert[vb], 0), vj, vk)
        for rb, i, j, kk in T.grid(nb, bm, d, inter):
            with T.sblock("gemm"):
                vb, vi, vj, vk = T.axis.remap("SSSR", [rb, i, j, kk])
                with T.init():
                    c[vb, vi, vj] = T.float32(0)
                c[vb, vi, vj] = c[vb, vi, vj] + T.Cast("float32", a[vb, vi, vk]) * T.Cast(
                    "float32", b[vb, vj, vk]
                )
        for rb in range(nb):
            if early_exit:
                if block_expert[rb] < 0:  # unused row blocks (all at the end) exit
                    T.evaluate(T.thread_return())
            for i, j in T.grid(bm, d):
                with T.sblock("epilogue"):
                    vb, vi, vj = T.axis.remap("SSS", [rb, i, j])
                    y[vb * bm + vi, vj] = T.Cast(
                        dtype,
                        c[vb, vi, vj]
                        * T.if_then_else(
                            sorted_rows[vb * bm + vi] >= 0,
                            weights[
                                T.max(sorted_rows[vb * bm + vi], 0) // k_top,
                                T.max(sorted_rows[vb * bm + vi], 0) % k_top,
                            ],
                            T.float32(0),
                        ),
                    )

    return func


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (ScheduleError: no such block)
        return False
    return True


def _schedule_grouped(
    func, cfg: G.GemmConfig, target, *, epilogue: str | None, dtype: str, decoded: bool
) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    if is_gpu(target):
        if not G.keep(cfg, target):
            raise ValueError(f"config {cfg} does not fit {target}")
        G.schedule_mma(
            sch, cfg, batched=True, epilogue=epilogue, dtype=dtype, decoded_weight=decoded
        )
        # Partial tiles (N % block_n or K % block_k): pad_einsum puts a zero-fill block between
        # the gather and the shared-memory load. Left un-inlined, the gather stayed a root-level
        # loop nest with no thread binding - TVM ran it on the host against device pointers (a
        # segfault at D = I = 64). schedule_mma inlines every producer of the tiles now; this
        # stays as the guard (a no-op then).
        for name in ("gather_a", "gather_b"):
            if _has_block(sch, name):
                sch.compute_inline(sch.get_sblock(name))
        return sch.mod["main"]
    for name in ("gather_a", "gather_b"):
        sch.compute_inline(sch.get_sblock(name))
    G.schedule_cpu(sch, G.GemmCpuConfig())
    return sch.mod["main"]


def _grouped(kind, hidden, inter, *, num_experts, top_k, dtype, target, config, weight_format):
    cfg = config or default_config(target)
    func = _grouped_workload(
        kind, d=hidden, inter=inter, e_num=num_experts, k_top=top_k, bm=cfg.block_m,
        dtype=dtype, early_exit=is_gpu(target), weight_format=weight_format,
    )  # fmt: skip
    epilogue = "silu_mul" if kind == "gate_up" else None
    func = _schedule_grouped(
        func, cfg, target, epilogue=epilogue, dtype=dtype, decoded=weight_format is not None
    )
    suffix = "" if weight_format is None else f"_{weight_format}"
    return _named(func, f"moe_{kind}_e{num_experts}_d{hidden}_i{inter}{suffix}")


def moe_gate_up(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: G.GemmConfig | None = None,
    weight_format: str | None = None,
) -> tirx.PrimFunc:
    """(x [T, D], sorted_rows [NB*BM], block_expert [NB], gate_up [E, 2I, D] interleaved,
    h [NB*BM, I]) -> h = silu(gate) * up per routed row; padding rows hold zeros' image.

    ``weight_format``: gate_up is that GGUF format's bytes ``[E, 2I, row_bytes(D)]`` uint8 in
    the checkpoint's ``[gate; up]`` row order (the decode reads the interleaved layout's rows
    from there: no interleaved copy at load), decoded in the kernel; name suffix ``_fmt``."""
    return _grouped(
        "gate_up", hidden, inter, num_experts=num_experts, top_k=top_k, dtype=dtype,
        target=target, config=config, weight_format=weight_format,
    )  # fmt: skip


def moe_down(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: G.GemmConfig | None = None,
    weight_format: str | None = None,
) -> tirx.PrimFunc:
    """(h [NB*BM, I], sorted_rows, block_expert, down [E, D, I], weights [T, k] f32,
    y [NB*BM, D]) -> y[r] = routing weight of row r * (h[r] @ down[e]^T); padding rows 0.

    ``weight_format``: down is that GGUF format's bytes ``[E, D, row_bytes(I)]`` uint8."""
    return _grouped(
        "down", hidden, inter, num_experts=num_experts, top_k=top_k, dtype=dtype,
        target=target, config=config, weight_format=weight_format,
    )  # fmt: skip


def moe_combine(
    hidden: int, *, top_k: int, dtype: str = "float16", target: tvm.target.Target
) -> tirx.PrimFunc:
    """(y [R, D], row_of [T*k], out [T, D]): out[t] = sum_j y[row_of[t*k + j]] (f32 sum).

    Block (token, THREADS * vec columns); a thread sums the k rows' 16-byte vectors of its
    columns (k independent loads in flight) and stores one vector."""
    t_num = tirx.Var("t", "int64")
    n_rows = tirx.Var("r", "int64")
    d, k_top = hidden, top_k
    vec = 8 if d % 8 == 0 else 1
    n_blk = (d // vec + THREADS - 1) // THREADS
    par = _par(is_gpu(target))

    @T.prim_func
    def combine(
        y: T.Buffer((n_rows, d), dtype),
        row_of: T.Buffer((t_num * k_top,), "int32"),
        out: T.Buffer((t_num, d), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in par(t_num, "blockIdx.x"):
            for by in par(n_blk, "blockIdx.y"):
                for tx in par(THREADS, "threadIdx.x"):
                    acc = T.alloc_buffer((vec,), "float32", scope="local")
                    yv = T.alloc_buffer((k_top * vec,), dtype, scope="local")
                    ov = T.alloc_buffer((vec,), dtype, scope="local")
                    col = T.meta_var((by * THREADS + tx) * vec)
                    if col < d:
                        for j in T.unroll(k_top):
                            yv[T.ramp(j * vec, 1, vec)] = y[
                                row_of[t * k_top + j], T.ramp(col, 1, vec)
                            ]
                        for v in T.unroll(vec):
                            acc[v] = T.float32(0)
                            for j in T.unroll(k_top):
                                acc[v] = acc[v] + T.Cast("float32", yv[j * vec + v])
                            ov[v] = T.Cast(dtype, acc[v])
                        out[t, T.ramp(col, 1, vec)] = ov[T.ramp(0, 1, vec)]

    return _named(combine, f"moe_combine_d{hidden}_k{top_k}")
