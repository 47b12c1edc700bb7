"""Routed-expert MoE kernels: routing, device-side token grouping, grouped GEMMs, combine.

One MoE layer (T tokens, E experts, top-k, hidden D, expert width I) runs, with no host sync:

1. :func:`moe_route`: logits [T, E] (f32) -> weights [T, k] (f32), ids [T, k] (int32).
   Softmax, then greedy or group-limited greedy top-k; ties go to the lowest expert index
   (``reference.moe_route_lowest_index`` follows the same rule).
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

Small static T (decode): :func:`moe_route`, then the expert GEMVs of ``moe_gemv.py``.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from . import gemm as G
from .target import is_gpu

ROUTE_METHODS = ("greedy", "group_limited_greedy")
CHUNK = 32  # tokens per chunk in moe_align's counting pass
THREADS = 128


def _i64(v):
    return tirx.IntImm("int64", v)


def _par(gpu: bool):
    """Loop-kind helper: thread-bound loops on CUDA, serial loops on CPU (same body)."""

    def par(n, tag):
        return T.thread_binding(n, thread=tag) if gpu else T.serial(n)

    return par


def _named(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    return func.with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------- routing


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """DeepSeek routing hyper-parameters (HF config names)."""

    num_experts: int
    top_k: int
    method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.method not in ROUTE_METHODS:
            raise ValueError(f"unknown routing method {self.method!r}: use {ROUTE_METHODS}")
        if self.num_experts % self.n_group:
            raise ValueError("num_experts must be a multiple of n_group")


def moe_route(spec: RouteSpec, *, target: tvm.target.Target) -> tirx.PrimFunc:
    """logits [T, E] f32 -> (weights [T, k] f32, ids [T, k] int32).

    CUDA: one warp per token (:func:`_route_warp`); CPU: one thread per token (below).
    Selection j takes the best expert strictly after selection j-1 in the order
    (score descending, index ascending), so equal scores resolve to the lowest index.
    """
    if is_gpu(target):
        return _route_warp(spec)
    return _route_serial(spec, target=target)


def _route_serial(spec: RouteSpec, *, target: tvm.target.Target) -> tirx.PrimFunc:
    """logits [T, E] f32 -> (weights [T, k] f32, ids [T, k] int32); one thread per token.

    Selection j takes the best expert strictly after selection j-1 in the order
    (score descending, index ascending), so equal scores resolve to the lowest index.
    """
    e_num, k_top = spec.num_experts, spec.top_k
    gsize = e_num // spec.n_group
    n_group = spec.n_group if spec.method == "group_limited_greedy" else 1
    topk_group = spec.topk_group if spec.method == "group_limited_greedy" else 1
    norm = spec.norm_topk_prob and k_top > 1
    scale = float(spec.routed_scaling_factor)
    par = _par(is_gpu(target))
    t_num = tirx.Var("t", "int64")
    nblk = (t_num + THREADS - 1) // THREADS

    @T.prim_func
    def route(
        logits: T.Buffer((t_num, e_num), "float32"),
        weights: T.Buffer((t_num, k_top), "float32"),
        ids: T.Buffer((t_num, k_top), "int32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for bx in par(nblk, "blockIdx.x"):
            for tx in par(THREADS, "threadIdx.x"):
                t = bx * THREADS + tx
                if t < t_num:
                    mx = T.alloc_buffer((1,), "float32", scope="local")
                    den = T.alloc_buffer((1,), "float32", scope="local")
                    keep = T.alloc_buffer((n_group,), "float32", scope="local")
                    prev = T.alloc_buffer((2,), "float32", scope="local")
                    best = T.alloc_buffer((2,), "float32", scope="local")
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    mx[0] = T.float32(-3.0e38)
                    for e in range(e_num):
                        mx[0] = T.max(mx[0], logits[t, e])
                    den[0] = T.float32(0)
                    for e in range(e_num):
                        den[0] = den[0] + T.exp(logits[t, e] - mx[0])
                    # group g is kept when fewer than topk_group groups beat it (score, index)
                    for g in range(n_group):
                        keep[g] = T.float32(0)
                        gs = T.float32(-1.0)
                        for c in range(gsize):
                            gs = T.max(gs, T.exp(logits[t, g * gsize + c] - mx[0]) / den[0])
                        for h in range(n_group):
                            hs = T.float32(-1.0)
                            for c in range(gsize):
                                hs = T.max(hs, T.exp(logits[t, h * gsize + c] - mx[0]) / den[0])
                            if hs > gs or (hs == gs and h < g):
                                keep[g] = keep[g] + T.float32(1)
                        keep[g] = T.Select(
                            keep[g] < T.float32(topk_group), T.float32(1), T.float32(0)
                        )
                    prev[0] = T.float32(3.0e38)
                    prev[1] = T.float32(-1)
                    acc[0] = T.float32(0)
                    for j in range(k_top):
                        best[0] = T.float32(-1)
                        best[1] = T.float32(-1)
                        for e in range(e_num):
                            s = keep[e // gsize] * (T.exp(logits[t, e] - mx[0]) / den[0])
                            after = s < prev[0] or (s == prev[0] and T.Cast("float32", e) > prev[1])
                            if after and s > best[0]:
                                best[0] = s
                                best[1] = T.Cast("float32", e)
                        weights[t, j] = best[0]
                        ids[t, j] = T.Cast("int32", best[1])
                        acc[0] = acc[0] + best[0]
                        prev[0] = best[0]
                        prev[1] = best[1]
                    for j in range(k_top):
                        if norm:
                            weights[t, j] = weights[t, j] / (acc[0] + T.float32(1e-20)) * scale
                        else:
                            weights[t, j] = weights[t, j] * scale

    return _named(route, f"moe_route_e{e_num}_k{k_top}")


ROUTE_WARPS = 4  # tokens per block of the warp routing kernel


def _route_warp(spec: RouteSpec) -> tirx.PrimFunc:
    """CUDA routing, one warp per token: lane l holds the scores of experts l, l + 32, ...;
    max, sum, group maxima and each of the k (score, index) arg-maxima are warp shuffles.
    A picked expert's score is set below every real score, so pick j is the best remaining
    expert in the order (score desc, index asc): the rule of ``_route_serial``."""
    e_num, k_top = spec.num_experts, spec.top_k
    per_lane = (e_num + 31) // 32
    gsize = e_num // spec.n_group
    n_group = spec.n_group if spec.method == "group_limited_greedy" else 1
    topk_group = spec.topk_group if spec.method == "group_limited_greedy" else n_group
    if n_group > 32:
        raise ValueError("group-limited routing supports at most 32 groups")
    norm = spec.norm_topk_prob and k_top > 1
    scale = float(spec.routed_scaling_factor)
    t_num = tirx.Var("t", "int64")
    nblk = (t_num + ROUTE_WARPS - 1) // ROUTE_WARPS
    full = T.uint32(0xFFFFFFFF)

    @T.prim_func
    def route(
        logits: T.Buffer((t_num, e_num), "float32"),
        weights: T.Buffer((t_num, k_top), "float32"),
        ids: T.Buffer((t_num, k_top), "int32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for bx in T.thread_binding(nblk, thread="blockIdx.x"):
            for ty in T.thread_binding(ROUTE_WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    s = T.alloc_buffer((per_lane,), "float32", scope="local")
                    red = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, other
                    best = T.alloc_buffer((2,), "float32", scope="local")  # score, index
                    oth = T.alloc_buffer((2,), "float32", scope="local")
                    keep = T.alloc_buffer((1,), "int32", scope="local")  # bit g: group kept
                    grp = T.alloc_buffer((n_group,), "float32", scope="local")
                    pick_w = T.alloc_buffer((k_top,), "float32", scope="local")
                    pick_i = T.alloc_buffer((k_top,), "int32", scope="local")
                    t = T.meta_var(bx * ROUTE_WARPS + ty)
                    for c in T.unroll(per_lane):
                        s[c] = T.if_then_else(
                            t < t_num and c * 32 + tx < e_num,
                            logits[T.min(t, t_num - 1), T.min(c * 32 + tx, e_num - 1)],
                            T.float32(-3.0e38),
                        )
                    red[0] = T.float32(-3.0e38)
                    for c in T.unroll(per_lane):
                        red[0] = T.max(red[0], s[c])
                    for o in T.unroll(5):
                        red[0] = T.max(
                            red[0], T.tvm_warp_shuffle_xor(full, red[0], 16 >> o, 32, 32)
                        )
                    red[1] = T.float32(0)
                    for c in T.unroll(per_lane):
                        s[c] = T.exp(s[c] - red[0])
                        red[1] = red[1] + s[c]
                    for o in T.unroll(5):
                        red[1] = red[1] + T.tvm_warp_shuffle_xor(full, red[1], 16 >> o, 32, 32)
                    for c in T.unroll(per_lane):  # padding lanes of E % 32: below every score
                        s[c] = T.if_then_else(c * 32 + tx < e_num, s[c] / red[1], T.float32(-1.0))
                    if n_group > 1:
                        for g in T.unroll(n_group):
                            red[2] = T.float32(-1.0)
                            for c in T.unroll(per_lane):
                                if (c * 32 + tx) // gsize == g:
                                    red[2] = T.max(red[2], s[c])
                            for o in T.unroll(5):
                                red[2] = T.max(
                                    red[2], T.tvm_warp_shuffle_xor(full, red[2], 16 >> o, 32, 32)
                                )
                            grp[g] = red[2]
                        # group g is kept when fewer than topk_group groups beat it (score, index)
                        keep[0] = 0
                        for g in T.unroll(n_group):
                            red[2] = T.float32(0)
                            for h in T.unroll(n_group):
                                if grp[h] > grp[g] or (grp[h] == grp[g] and h < g):
                                    red[2] = red[2] + T.float32(1)
                            if red[2] < T.float32(topk_group):
                                keep[0] = keep[0] | (1 << g)
                        for c in T.unroll(per_lane):
                            if c * 32 + tx < e_num:
                                if (keep[0] >> ((c * 32 + tx) // gsize)) & 1 == 0:
                                    s[c] = T.float32(0)
                    for j in T.unroll(k_top):
                        best[0] = T.float32(-3.0)
                        best[1] = T.float32(e_num)
                        for c in T.unroll(per_lane):
                            if s[c] > best[0]:  # ascending c: the lane's lowest index wins ties
                                best[0] = s[c]
                                best[1] = T.Cast("float32", c * 32 + tx)
                        for o in T.unroll(5):
                            oth[0] = T.tvm_warp_shuffle_xor(full, best[0], 16 >> o, 32, 32)
                            oth[1] = T.tvm_warp_shuffle_xor(full, best[1], 16 >> o, 32, 32)
                            if oth[0] > best[0] or (oth[0] == best[0] and oth[1] < best[1]):
                                best[0] = oth[0]
                                best[1] = oth[1]
                        for c in T.unroll(per_lane):
                            if T.Cast("float32", c * 32 + tx) == best[1]:
                                s[c] = T.float32(-2.0)
                        pick_w[j] = best[0]
                        pick_i[j] = T.Cast("int32", best[1])
                    red[2] = T.float32(0)
                    for j in T.unroll(k_top):
                        red[2] = red[2] + pick_w[j]
                    if t < t_num and tx == 0:
                        for j in T.unroll(k_top):
                            ids[t, j] = pick_i[j]
                            if norm:
                                weights[t, j] = pick_w[j] / (red[2] + T.float32(1e-20)) * scale
                            else:
                                weights[t, j] = pick_w[j] * scale

    return _named(route, f"moe_route_e{e_num}_k{k_top}")


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


def _grouped_workload(
    kind: str, *, d: int, inter: int, e_num: int, k_top: int, bm: int, dtype, early_exit: bool
):
    """kind "gate_up": H = silu_mul(gather(x) @ gate_up[e]^T); "down": Y = w * (H @ down[e]^T)."""
    nb = tirx.Var("nb", "int64")
    t_num = tirx.Var("t", "int64")
    g = _i64(G.SWIGLU_GROUP)
    d, inter, bm = _i64(d), _i64(inter), _i64(bm)

    if kind == "gate_up":
        n2 = 2 * inter

        @T.prim_func(s_tir=True)
        def func(
            x: T.Buffer((t_num, d), dtype),
            sorted_rows: T.Buffer((nb * bm,), "int32"),
            block_expert: T.Buffer((nb,), "int32"),
            w: T.Buffer((e_num, n2, d), dtype),
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
                    b[vb, vj, vk] = w[T.max(block_expert[vb], 0), vj, vk]
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
        w: T.Buffer((e_num, d, inter), dtype),
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
                b[vb, vj, vk] = w[T.max(block_expert[vb], 0), vj, vk]
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
    func, cfg: G.GemmConfig, target, *, epilogue: str | None, dtype: str
) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    if is_gpu(target):
        if not G.keep(cfg, target):
            raise ValueError(f"config {cfg} does not fit {target}")
        G.schedule_mma(sch, cfg, batched=True, epilogue=epilogue, dtype=dtype)
        # Partial tiles (N % block_n or K % block_k): pad_einsum puts a zero-fill block between
        # the gather and the shared-memory load; schedule_mma inlines that block only, so the
        # gather stayed a root-level loop nest with no thread binding - TVM ran it on the host
        # against device pointers (a segfault at D = I = 64). Fold it into the load.
        for name in ("gather_a", "gather_b"):
            if _has_block(sch, name):
                sch.compute_inline(sch.get_sblock(name))
        return sch.mod["main"]
    for name in ("gather_a", "gather_b"):
        sch.compute_inline(sch.get_sblock(name))
    G.schedule_cpu(sch, G.GemmCpuConfig())
    return sch.mod["main"]


def moe_gate_up(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: G.GemmConfig | None = None,
) -> tirx.PrimFunc:
    """(x [T, D], sorted_rows [NB*BM], block_expert [NB], gate_up [E, 2I, D] interleaved,
    h [NB*BM, I]) -> h = silu(gate) * up per routed row; padding rows hold zeros' image."""
    cfg = config or default_config(target)
    func = _grouped_workload(
        "gate_up",
        d=hidden,
        inter=inter,
        e_num=num_experts,
        k_top=top_k,
        bm=cfg.block_m,
        dtype=dtype,
        early_exit=is_gpu(target),
    )
    func = _schedule_grouped(func, cfg, target, epilogue="silu_mul", dtype=dtype)
    return _named(func, f"moe_gate_up_e{num_experts}_d{hidden}_i{inter}")


def moe_down(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: G.GemmConfig | None = None,
) -> tirx.PrimFunc:
    """(h [NB*BM, I], sorted_rows, block_expert, down [E, D, I], weights [T, k] f32,
    y [NB*BM, D]) -> y[r] = routing weight of row r * (h[r] @ down[e]^T); padding rows 0."""
    cfg = config or default_config(target)
    func = _grouped_workload(
        "down",
        d=hidden,
        inter=inter,
        e_num=num_experts,
        k_top=top_k,
        bm=cfg.block_m,
        dtype=dtype,
        early_exit=is_gpu(target),
    )
    func = _schedule_grouped(func, cfg, target, epilogue=None, dtype=dtype)
    return _named(func, f"moe_down_e{num_experts}_d{hidden}_i{inter}")


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
