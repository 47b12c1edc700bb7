"""MoE routing: logits [T, E] -> (weights [T, k], ids [T, k]), and the loop helpers that the
MoE kernels share (``moe.py``, ``moe_gemv.py``).

Softmax, then greedy or group-limited greedy top-k; ties go to the lowest expert index
(``reference.moe_route_lowest_index`` follows the same rule). CUDA: one warp per token; CPU: one
thread per token.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .target import is_gpu

ROUTE_METHODS = ("greedy", "group_limited_greedy")
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
