"""Split arithmetic of absorbed-MLA decode: how many splits a sequence uses, which rows each
split owns, how many splits a step is compiled for, and how the CUDA merge spreads them over
lanes.

The split kernels (``attention_decode_mma.split_mma``, ``attention_decode``'s loop kernel), the
merge kernels and the tests share these formulas; most take Python ints or TIR int32
expressions alike, so the host and the kernels agree by construction.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

# default DecodeConfig.min_split_rows (why: attention_decode.DecodeConfig's docstring)
MIN_SPLIT_ROWS = 64


def _is_expr(*xs) -> bool:
    return any(isinstance(x, tvm.ir.expr.Expr) for x in xs)


def effective_splits(n, num_splits, *, block_n: int, min_split_rows: int):
    """Splits a sequence of ``n`` rows uses out of the ``num_splits`` compiled ones.

    ``min(num_splits, max(1, ceil(tiles / per)))`` with ``tiles = ceil(n / block_n)`` and
    ``per = ceil(min_split_rows / block_n)`` tiles: at most ``tiles``, so every used split of a
    non-empty sequence gets rows; an empty sequence uses one (empty) split. The ONE formula of
    the split kernels, the merge kernels and the tests: ``n`` and ``num_splits`` may be Python
    ints or TIR int32 expressions (``n >= 0``).
    """
    per = max(1, -(-min_split_rows // block_n))
    if _is_expr(n, num_splits):
        want = tvm.tirx.truncdiv(tvm.tirx.truncdiv(n + block_n - 1, block_n) + per - 1, per)
        return T.min(num_splits, T.max(want, 1))
    tiles = -(-n // block_n)
    return min(num_splits, max(1, -(-tiles // per)))


def split_range(n, split, used, *, block_n: int):
    """Rows ``[lo, hi)`` of split ``split`` (< ``used`` = ``effective_splits``) of a sequence of
    ``n`` rows: the ``ceil(n / block_n)`` tiles dealt out evenly (whole tiles, the last tile cut
    at ``n``), so splits differ by at most one tile. Python ints or TIR int32 expressions."""
    if _is_expr(n, split, used):
        tiles = tvm.tirx.truncdiv(n + block_n - 1, block_n)
        lo = tvm.tirx.truncdiv(split * tiles, used) * block_n
        hi = T.min(tvm.tirx.truncdiv((split + 1) * tiles, used) * block_n, n)
        return lo, hi
    tiles = -(-n // block_n)
    return split * tiles // used * block_n, min((split + 1) * tiles // used * block_n, n)


def choose_splits(
    batch: int,
    max_context: int,
    sm_count: int,
    *,
    block_n: int = 64,
    ctas_per_sm: int = 1,
    sm_bandwidth_ratio: float = 1.0,
    min_split_rows: int = MIN_SPLIT_ROWS,
) -> int:
    """Splits per sequence: enough CTAs to pull DRAM bandwidth, few enough partials to merge.

    Modelled step time, in units of one tile load per SM at a fair share of DRAM bandwidth::

        max(tiles_total / SMs, waves * tiles_per_split * ctas_per_sm / ratio)  # stream
        + waves                                      # pipeline fill, once per wave
        + 0.9 * batch * splits / SMs                 # f32 partials: written + merged

    ``sm_bandwidth_ratio``: how much faster than its fair share one SM streams when others
    idle; 1.0 as measured (``benchmarks/NOTES_decode.md``). ``benchmarks.bench_decode`` times
    S/2, S and 2S.
    Returns the smallest split count of least modelled time, at most ``effective_splits`` of
    ``max_context`` (more would never be used).
    """
    tiles = max(1, -(-max_context // block_n))
    slots = sm_count * ctas_per_sm
    most = effective_splits(
        max(max_context, 1), 4 * slots, block_n=block_n, min_split_rows=min_split_rows
    )
    best, best_cost = 1, math.inf
    for s in range(1, most + 1):
        waves = -(-(batch * s) // slots)
        per_split = -(-tiles // s)
        stream = max(batch * tiles / sm_count, waves * per_split * ctas_per_sm / sm_bandwidth_ratio)
        cost = stream + waves + 0.9 * batch * s / sm_count
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


def merge_split_lanes(num_splits, *, unroll: int = 4):
    """Lanes that share one output column group in the CUDA merge: the power of two (1..32)
    that lets ``num_splits`` partials load in one unrolled step (``unroll`` per lane). Python
    int or TIR expression (the merge picks it from the workspace's split count at run time)."""
    if _is_expr(num_splits):
        lanes = T.int32(32)
        for k in (4, 3, 2, 1, 0):
            lanes = T.if_then_else(num_splits <= unroll * (1 << k), 1 << k, lanes)
        return lanes
    return next((1 << k for k in range(6) if num_splits <= unroll * (1 << k)), 32)
