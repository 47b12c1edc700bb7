"""Absorbed-MLA decode (FlashMLA-style): split-KV attention over the f16 latent cache.

One decode step reads every cache row of every sequence once, so the kernel is bandwidth-bound.
``absorbed_decode`` builds two kernels:

- ``split``: grid ``(num_splits, batch)``. CTA ``(s, b)`` streams its slice of sequence ``b``'s
  rows ``kv[layer, kv_indptr[b]:kv_indptr[b+1]]`` once, scores them against all ``H x Q`` query
  rows (heads x new tokens form the MMA M dimension) and keeps an online softmax; it writes a
  float32 partial output and its LSE (``-inf`` for an empty slice). A sequence that uses a
  single split (short, or one split per sequence at large batch) gets its final O and LSE
  written by that split: no partial round trip.
- ``merge``: combines the used partials of the other sequences with ``reference.merge_states``
  semantics, in place in the same ``o`` / ``lse``. With ``num_splits = 1`` it has nothing to
  do and need not run.

V is the first ``kv_lora_rank`` columns of the same rows, read from the same shared-memory tile.
``num_splits`` is the leading extent of ``o_part``: the caller picks it at run time with
``choose_splits`` and allocates the workspace with ``workspace_shapes``.

On CUDA the split kernel uses mma.sync m16n8k16 (ldmatrix operands, ldmatrix.trans for V) and a
cp.async multi-stage pipeline of 16-byte copies (``attention_decode_mma.py``). On ``llvm`` (and as
the simple CUDA fallback, ``DecodeConfig(tensor_cores=False)``) it is a plain two-pass loop nest.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import tvm
from tvm.script import tirx as T

from mla_compiler.errors import TargetError
from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules import grid_dependency
from mla_compiler.schedules.attention_decode_mma import split_mma
from mla_compiler.schedules.attention_decode_tiles import (
    Q_RESIDENT_STEPS,
    q_tail_columns,
    stages_q_in_ring,
)
from mla_compiler.schedules.decode_splits import (  # re-exported: callers import them from here
    MIN_SPLIT_ROWS,
    choose_splits,
    effective_splits,
    merge_split_lanes,
    split_range,
)
from mla_compiler.schedules.target import gpu_spec, is_gpu, register_cap

MAX_Q_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Schedule knobs of the split kernel.

    ``block_n`` cache rows per pipeline tile; ``stages`` tiles in flight (cp.async groups);
    ``warps_n`` warps sharing one 16-row M tile (each owns ``block_n / warps_n`` score columns and
    ``kv_lora_rank / warps_n`` output columns); one such warp group per M tile of ``H x Q``.
    ``tensor_cores=False`` selects the simple loop kernel (the llvm schedule, slow on a GPU).
    ``tma`` (sm_90): warp 0 fills a ring slot with one ``cp.async.bulk`` per cache row, completing
    on the slot's mbarrier, instead of every thread's 16-byte ``cp.async``; all ``stages`` slots
    are in flight and a slot refills as soon as every warp is done with it: one SM streams far
    more this way (measured: ``benchmarks/NOTES_decode.md``).
    ``min_split_rows``: the rows that open one more split. A sequence of ``n`` rows uses only
    ``effective_splits`` = ``min(S, ceil(n / min_split_rows))`` (in whole tiles) of the ``S``
    compiled splits: uncapped, each split gets at most ``min_split_rows`` rows (rounded up to
    a tile) and the splits together more than ``used - 1`` times that. 64 = one 64-row tile:
    a short context is latency-bound (a CTA's fixed chain of index load, first tile, math,
    epilogue), so more CTAs with one tile each finish sooner than fewer with two; long contexts
    and big batches are capped by the split count ``choose_splits`` picks.
    ``q_regs``: every warp keeps Q's A fragments of the first ``Q_RESIDENT_STEPS`` (28) of the
    ``latent_dim / 16`` k-steps in registers (112 per thread) instead of reloading them from
    shared memory for every tile. At 8 warps those reloads were 147 of the ~380 KB of
    shared-memory traffic per 64-row tile, which bounds the tile's math.
    ``pdl`` (sm_90): both kernels are launched as programmatic dependents
    (``grid_dependency``): the split waits for the kernel before it at its first instruction,
    the merge computes its rows' split counts before waiting for the split; each lets the next
    kernel launch once its stores are issued. The launch latency and the merge's index chain
    overlap the predecessor's tail.
    """

    block_n: int = 64
    stages: int = 2
    warps_n: int = 4
    tensor_cores: bool = True
    min_split_rows: int = MIN_SPLIT_ROWS
    tma: bool = False
    q_regs: bool = False
    pdl: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeKernels:
    """The two PrimFuncs of one decode attention, plus the config they were built with."""

    split: tvm.tirx.PrimFunc
    merge: tvm.tirx.PrimFunc
    config: DecodeConfig


CPU_CONFIG = DecodeConfig(block_n=64, stages=1, warps_n=1, tensor_cores=False)


def m_tiles(heads: int, q_tokens: int) -> int:
    """16-row MMA tiles the ``heads x q_tokens`` query rows take (the last one padded)."""
    return -(-heads * q_tokens // 16)


def shared_bytes(config: DecodeConfig, dims: MLADims, *, q_tokens: int) -> int:
    """Dynamic shared memory of the tensor-core split kernel (rows padded by 8 halves)."""
    rows = 16 * m_tiles(dims.heads, q_tokens)
    row = (dims.latent_dim + 8) * 2
    kv = config.stages * config.block_n * row
    q = rows * (q_tail_columns(dims, config) + 8) * 2  # Q, or its tail (staged in the ring)
    p = rows * (config.block_n + 8) * 2
    red = 2 * config.warps_n * rows * 4
    return kv + q + p + red


def keep(config: DecodeConfig, target: tvm.target.Target, dims: MLADims, *, q_tokens: int) -> bool:
    """Whether ``config`` builds a valid kernel on ``target`` (tile shapes, smem, threads)."""
    if not config.tensor_cores:
        return True
    if not is_gpu(target):
        return False
    spec = gpu_spec(target)
    warps = config.warps_n * m_tiles(dims.heads, q_tokens)
    if config.pdl and not spec.has_pdl:
        return False
    if config.tma and not (spec.has_tma and config.block_n % 32 == 0 and dims.latent_dim % 8 == 0):
        return False  # bulk copies move whole rows: 16-byte multiples, 16-byte aligned
    if config.q_regs:  # resident Q fragments + O and S accumulators + ~96 must fit 255 registers
        q_regs = min(dims.latent_dim // 16, Q_RESIDENT_STEPS) * 4
        acc = dims.kv_lora_rank // (2 * config.warps_n) + config.block_n // config.warps_n
        need = q_regs + acc + 96
        if need > register_cap(warps, spec.registers_per_sm):
            return False
    if stages_q_in_ring(config) and 16 * m_tiles(dims.heads, q_tokens) > config.block_n:
        return False  # Q is staged in one ring slot
    return (
        config.block_n % (8 * config.warps_n) == 0
        and dims.kv_lora_rank % (16 * config.warps_n) == 0
        and dims.latent_dim % 16 == 0
        and 1 <= config.stages <= (5 if config.tma else 4)
        and warps * 32 <= 1024
        and shared_bytes(config, dims, q_tokens=q_tokens) <= spec.max_shared_bytes_per_block
    )


# Preferred first, per arch, in measured order (benchmarks/NOTES_decode.md); the rest of the
# space follows, most rows in flight first.
PREFERRED: dict[str, tuple[DecodeConfig, ...]] = {
    "sm_90a": (
        DecodeConfig(block_n=64, stages=2, warps_n=8, q_regs=True, pdl=True),
        DecodeConfig(block_n=64, stages=2, warps_n=8, q_regs=True),
        DecodeConfig(block_n=64, stages=2, warps_n=8),  # 1 CTA/SM, 2 warps per SM sub-partition
        DecodeConfig(block_n=64, stages=2, warps_n=4, tma=True),
        DecodeConfig(block_n=32, stages=4, warps_n=4, tma=True),  # 3 tiles in flight during compute
        DecodeConfig(block_n=64, stages=2, warps_n=8, tma=True),
        DecodeConfig(block_n=32, stages=5, warps_n=4, tma=True),
        # 95 KB: 2 CTAs/SM overlap each other's syncs
        DecodeConfig(block_n=32, stages=2, warps_n=4),
        DecodeConfig(block_n=64, stages=2, warps_n=4),
        DecodeConfig(block_n=32, stages=2, warps_n=2),
        DecodeConfig(block_n=32, stages=4, warps_n=4),
        DecodeConfig(block_n=32, stages=3, warps_n=2),
    ),
    "sm_89": (
        DecodeConfig(block_n=32, stages=2, warps_n=4),
        DecodeConfig(block_n=32, stages=2, warps_n=2),
        DecodeConfig(block_n=64, stages=1, warps_n=4),
    ),
}


def candidate_configs(target, dims: MLADims, *, q_tokens: int) -> list[DecodeConfig]:
    """Every tensor-core config ``keep`` accepts: ``PREFERRED`` first, then by rows in flight."""
    space = [
        DecodeConfig(block_n=block_n, stages=stages, warps_n=warps_n, tma=tma, q_regs=q_regs)
        for block_n, stages, warps_n, tma, q_regs in itertools.product(
            (32, 64, 128), (1, 2, 3, 4, 5), (2, 4, 8, 16), (True, False), (False, True)
        )
    ]
    space.sort(key=lambda c: (not c.tma, -(max(c.stages - 1, 0.5) * c.block_n), c.warps_n != 4))
    preferred = PREFERRED.get(str(target.attrs.get("arch", "")), ())
    ordered = list(preferred) + [c for c in space if c not in preferred]
    return [c for c in ordered if keep(c, target, dims, q_tokens=q_tokens)]


def default_config(target, dims: MLADims, *, q_tokens: int = 1):
    """sm_90a: 64-row tiles, 2 stages, 8 warps, cp.async, Q's fragments in registers (171 KB
    smem); sm_89 (99 KB): 32 rows, 2 stages, 4 warps, cp.async. The first of
    ``PREFERRED[arch]`` that ``keep`` accepts.

    Where no tensor-core config fits (sm_89 with 4 query tokens: Q alone takes 75 KB of smem)
    this falls back to the simple loop kernel, which is correct but slow.
    """
    if not is_gpu(target):
        return CPU_CONFIG
    found = candidate_configs(target, dims, q_tokens=q_tokens)
    return found[0] if found else DecodeConfig(tensor_cores=False)


def ctas_per_sm(config: DecodeConfig, target, dims: MLADims, *, q_tokens: int) -> int:
    """Split CTAs one SM holds at once, as shared memory allows (per-SM smem = per-block + 1 KB)."""
    if not config.tensor_cores:
        return 1
    per_sm = gpu_spec(target).max_shared_bytes_per_block + 1024
    need = shared_bytes(config, dims, q_tokens=q_tokens) + 1024  # +1 KB reserved
    return max(1, per_sm // need)


def splits_for(
    config: DecodeConfig,
    target,
    dims: MLADims,
    *,
    q_tokens: int,
    batch: int,
    max_context: int,
    sm_count: int | None = None,
) -> int:
    """``choose_splits`` for this config on this GPU (its tile size and CTAs per SM).

    ``sm_count`` overrides the arch's nominal count (e.g. the device's real one).
    """
    return choose_splits(
        batch,
        max_context,
        sm_count or gpu_spec(target).sm_count,
        block_n=config.block_n,
        ctas_per_sm=ctas_per_sm(config, target, dims, q_tokens=q_tokens),
        min_split_rows=config.min_split_rows,
    )


def workspace_shapes(
    dims: MLADims, *, batch: int, q_tokens: int, num_splits: int
) -> dict[str, tuple[int, ...]]:
    """Float32 workspace the split kernel writes: ``o_part`` and ``lse_part``."""
    return {
        "o_part": (num_splits, batch, q_tokens, dims.heads, dims.kv_lora_rank),
        "lse_part": (num_splits, batch, q_tokens, dims.heads),
    }


def absorbed_decode(
    dims: MLADims,
    *,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: DecodeConfig | None = None,
    sm_scale: float,
    q_tokens: int = 1,
) -> DecodeKernels:
    """Split + merge kernels of absorbed decode attention over the whole latent cache.

    split(q [B, Q, H, 576], kv [L, C, 576], kv_indptr [B+1] i32, layer i32,
          o_part [S, B, Q, H, 512] f32, lse_part [S, B, Q, H] f32,
          o [B, Q, H, 512] dtype, lse [B, Q, H] f32)
    merge(o_part, lse_part, kv_indptr, o, lse)

    ``split`` writes ``o`` / ``lse`` of the sequences that use one split, ``merge`` (same
    buffers, in place) those of the others.
    """
    if not 1 <= q_tokens <= MAX_Q_TOKENS:
        raise TargetError(f"q_tokens={q_tokens} is not supported: use 1..{MAX_Q_TOKENS}")
    if dtype != "float16":
        raise TargetError(f"decode dtype {dtype!r} is not supported: use float16 (the f16 cache)")
    gpu = is_gpu(target)
    if config is None:
        config = default_config(target, dims, q_tokens=q_tokens)
    if not keep(config, target, dims, q_tokens=q_tokens):
        raise TargetError(f"decode config {config} does not fit target {target}")
    if config.tensor_cores:
        split = split_mma(dims, q_tokens=q_tokens, config=config, sm_scale=sm_scale)
    else:
        split = _split_simple(dims, q_tokens=q_tokens, config=config, sm_scale=sm_scale, gpu=gpu)
    if gpu and dims.kv_lora_rank % 8 == 0:
        merge = _merge_gpu(dims, q_tokens=q_tokens, dtype=dtype, config=config)
    else:
        merge = _merge(dims, q_tokens=q_tokens, dtype=dtype, config=config, gpu=gpu)
    return DecodeKernels(split=split, merge=merge, config=config)


def _split_simple(dims: MLADims, *, q_tokens: int, config: DecodeConfig, sm_scale, gpu: bool):
    """Two-pass loop kernel: one (split, sequence, query row) per CPU task / GPU thread."""
    D, DV, H, Q = dims.latent_dim, dims.kv_lora_rank, dims.heads, q_tokens
    block_n, min_rows = config.block_n, config.min_split_rows
    R = H * Q
    scale = float(sm_scale)
    neg_inf = -math.inf

    @T.prim_func
    def split(
        q_h: T.handle,
        kv_h: T.handle,
        indptr_h: T.handle,
        layer: T.int32,
        o_part_h: T.handle,
        lse_part_h: T.handle,
        o_h: T.handle,
        lse_h: T.handle,
    ):
        T.func_attr({"global_symbol": "decode_split", "tirx.noalias": True})
        B = T.int32()
        L = T.int64()
        C = T.int64()
        S = T.int32()
        q = T.match_buffer(q_h, (B, Q, H, D), "float16")
        kv = T.match_buffer(kv_h, (L, C, D), "float16")
        kv_indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
        o_part = T.match_buffer(o_part_h, (S, B, Q, H, DV), "float32")
        lse_part = T.match_buffer(lse_part_h, (S, B, Q, H), "float32")
        o = T.match_buffer(o_h, (B, Q, H, DV), "float16")
        lse = T.match_buffer(lse_h, (B, Q, H), "float32")
        for task_o in (
            T.parallel(S * B * R)
            if not gpu
            else T.thread_binding(T.ceildiv(S * B * R, 64), "blockIdx.x")
        ):
            for task_i in T.serial(1) if not gpu else T.thread_binding(64, "threadIdx.x"):
                task = T.meta_var(task_o * (64 if gpu else 1) + task_i)
                s = T.meta_var(task // (B * R))
                b = T.meta_var(task // R % B)
                start = T.meta_var(kv_indptr[b])
                n = T.meta_var(kv_indptr[b + 1] - start)
                used = T.meta_var(effective_splits(n, S, block_n=block_n, min_split_rows=min_rows))
                if task < S * B * R and s < used:  # splits past `used` write nothing
                    t = task % R // H
                    h = task % H
                    rows = T.meta_var(split_range(n, s, used, block_n=block_n))
                    lo = rows[0]
                    hi = T.min(rows[1], n - Q + t + 1)
                    m = T.alloc_buffer((1,), "float32", scope="local")
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    l_sum = T.alloc_buffer((1,), "float32", scope="local")
                    m[0] = T.float32(neg_inf)
                    l_sum[0] = T.float32(0)
                    for d in range(DV):
                        o_part[s, b, t, h, d] = T.float32(0)
                    for j in range(T.max(hi - lo, 0)):
                        acc[0] = T.float32(0)
                        for d in range(D):
                            acc[0] = acc[0] + T.Cast("float32", q[b, t, h, d]) * T.Cast(
                                "float32", kv[layer, start + lo + j, d]
                            )
                        m[0] = T.max(m[0], acc[0] * T.float32(scale))
                    for j in range(T.max(hi - lo, 0)):
                        acc[0] = T.float32(0)
                        for d in range(D):
                            acc[0] = acc[0] + T.Cast("float32", q[b, t, h, d]) * T.Cast(
                                "float32", kv[layer, start + lo + j, d]
                            )
                        acc[0] = T.exp(acc[0] * T.float32(scale) - m[0])
                        l_sum[0] = l_sum[0] + acc[0]
                        for d in range(DV):
                            o_part[s, b, t, h, d] = o_part[s, b, t, h, d] + acc[0] * T.Cast(
                                "float32", kv[layer, start + lo + j, d]
                            )
                    if l_sum[0] > T.float32(0):
                        for d in range(DV):
                            o_part[s, b, t, h, d] = o_part[s, b, t, h, d] / l_sum[0]
                        lse_part[s, b, t, h] = m[0] + T.log(l_sum[0])
                    else:
                        lse_part[s, b, t, h] = T.float32(neg_inf)
                    if used == 1:  # the only split: final O and LSE (o_part was scratch)
                        for d in range(DV):
                            o[b, t, h, d] = T.Cast("float16", o_part[s, b, t, h, d])
                        lse[b, t, h] = lse_part[s, b, t, h]

    return split


def _merge(dims: MLADims, *, q_tokens: int, dtype: str, config: DecodeConfig, gpu: bool):
    """o = sum_s exp(lse_s - lse) o_s with lse = logsumexp_s lse_s over the sequence's
    ``effective_splits``; empty splits weigh 0. Sequences of one used split are skipped (the
    split kernel wrote them).

    One GPU thread per output element (blocks of 64 columns, so even batch 1 spreads over
    ``16 x 512 / 64`` CTAs); each reads the split LSEs of its row (L1 hits) and one float32
    partial per split.
    """
    DV, H, Q = dims.kv_lora_rank, dims.heads, q_tokens
    CW = 64 if gpu and DV % 64 == 0 else DV  # columns per block
    NC = DV // CW
    block_n, min_rows = config.block_n, config.min_split_rows
    neg_inf = -math.inf

    @T.prim_func
    def merge(
        o_part_h: T.handle, lse_part_h: T.handle, indptr_h: T.handle, o_h: T.handle, lse_h: T.handle
    ):
        T.func_attr({"global_symbol": "decode_merge", "tirx.noalias": True})
        B = T.int32()
        S = T.int32()
        o_part = T.match_buffer(o_part_h, (S, B, Q, H, DV), "float32")  # [S, B, Q, H, 512]
        lse_part = T.match_buffer(lse_part_h, (S, B, Q, H), "float32")  # [S, B, Q, H]
        kv_indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
        o = T.match_buffer(o_h, (B, Q, H, DV), dtype)  # [B, Q, H, 512]
        lse = T.match_buffer(lse_h, (B, Q, H), "float32")  # [B, Q, H]
        for blk in (
            T.parallel(B * Q * H * NC)
            if not gpu
            else T.thread_binding(B * Q * H * NC, "blockIdx.x")
        ):
            for tx in T.serial(CW) if not gpu else T.thread_binding(CW, "threadIdx.x"):
                b = blk // NC // (Q * H)
                t = blk // NC // H % Q
                h = blk // NC % H
                col = blk % NC * CW + tx
                used = T.meta_var(
                    effective_splits(
                        kv_indptr[b + 1] - kv_indptr[b],
                        S,
                        block_n=block_n,
                        min_split_rows=min_rows,
                    )
                )
                m = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "float32", scope="local")
                acc = T.alloc_buffer((1,), "float32", scope="local")
                if used > 1:  # a single split wrote its sequence's O and LSE itself
                    m[0] = T.float32(neg_inf)
                    for s in range(used):
                        m[0] = T.max(m[0], lse_part[s, b, t, h])
                    total[0] = T.float32(0)
                    acc[0] = T.float32(0)
                    if m[0] > T.float32(neg_inf):
                        for s in range(used):
                            w = T.exp(lse_part[s, b, t, h] - m[0])
                            total[0] = total[0] + w
                            acc[0] = acc[0] + w * o_part[s, b, t, h, col]
                    o[b, t, h, col] = T.Cast(
                        dtype, T.if_then_else(total[0] > 0, acc[0] / total[0], T.float32(0))
                    )
                    if col == 0:
                        lse[b, t, h] = T.if_then_else(
                            total[0] > 0, m[0] + T.log(total[0]), T.float32(neg_inf)
                        )

    return merge


def _merge_gpu(dims: MLADims, *, q_tokens: int, dtype: str, config: DecodeConfig):
    """CUDA merge: one pass over the sequence's ``effective_splits``, memory-level parallel.

    ``SL = merge_split_lanes(S)`` lanes (1..32, a power of two, chosen at run time from the
    workspace's ``S``) share output columns ``8 g .. 8 g + 7`` of one row (two float4 loads, a
    full 32-byte sector per split); lane ``sl`` reads splits ``sl, sl + SL, ...``, four per
    unrolled step: each step issues its 4 LSE and 8 float4 loads together and folds them into a
    running (max, sum, acc) (online softmax), so a full workspace loads in one memory round trip
    (b = 1 with 128 splits: 32 lanes; 32 sequences x 4 splits: 1 lane, no idle lanes). The SL
    lanes then combine (max, rescale, sum) with xor shuffles: no smem, no barrier.
    """
    DV, H, Q = dims.kv_lora_rank, dims.heads, q_tokens
    U, CG = 4, 8  # unroll, columns per lane
    GROUPS = DV // CG  # column groups per row
    THREADS = 128
    block_n, min_rows = config.block_n, config.min_split_rows
    neg_inf = -math.inf
    start_max = -1.0e30  # finite: exp(-inf - start_max) = 0 and exp(start_max - M) never NaN

    @T.prim_func
    def merge(
        o_part_h: T.handle, lse_part_h: T.handle, indptr_h: T.handle, o_h: T.handle, lse_h: T.handle
    ):
        T.func_attr({"global_symbol": "decode_merge", "tirx.noalias": True})
        B = T.int32()
        S = T.int32()
        o_part = T.match_buffer(o_part_h, (S, B, Q, H, DV), "float32")  # [S, B, Q, H, 512]
        lse_part = T.match_buffer(lse_part_h, (S, B, Q, H), "float32")  # [S, B, Q, H]
        kv_indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
        o = T.match_buffer(o_h, (B, Q, H, DV), dtype)  # [B, Q, H, 512]
        lse = T.match_buffer(lse_h, (B, Q, H), "float32")  # [B, Q, H]
        SL = T.meta_var(merge_split_lanes(S, unroll=U))
        for blk in T.thread_binding(T.ceildiv(B * Q * H * GROUPS * SL, THREADS), "blockIdx.x"):
            for tx in T.thread_binding(THREADS, "threadIdx.x"):
                m = T.alloc_buffer((2,), "float32", scope="local")  # running max, new max
                total = T.alloc_buffer((1,), "float32", scope="local")
                w = T.alloc_buffer((U,), "float32", scope="local")
                acc = T.alloc_buffer((CG,), "float32", scope="local")
                part = T.alloc_buffer((U * CG,), "float32", scope="local")
                used = T.alloc_buffer((2,), "int32", scope="local")  # used splits, lanes SL
                used[1] = SL
                gid = T.meta_var((blk * THREADS + tx) // used[1])  # (row, column group)
                sl = T.meta_var(tx % used[1])
                valid = T.meta_var(gid // GROUPS < B * Q * H)
                row = T.meta_var(T.min(gid // GROUPS, B * Q * H - 1))
                col = T.meta_var(gid % GROUPS * CG)
                b = T.meta_var(row // (Q * H))
                t = T.meta_var(row // H % Q)
                h = T.meta_var(row % H)
                used[0] = T.if_then_else(
                    valid,
                    effective_splits(
                        kv_indptr[b + 1] - kv_indptr[b],
                        S,
                        block_n=block_n,
                        min_split_rows=min_rows,
                    ),
                    0,
                )
                used[0] = T.if_then_else(used[0] > 1, used[0], 0)  # one split: written by it
                if config.pdl:  # kv_indptr predates the split kernel; its partials do not
                    grid_dependency.wait()
                m[0] = T.float32(start_max)
                total[0] = T.float32(0)
                for c in T.unroll(CG):
                    acc[c] = T.float32(0)
                for so in range(T.ceildiv(used[0], used[1] * U)):
                    for u in T.unroll(U):
                        split = T.meta_var((so * U + u) * used[1] + sl)
                        if split < used[0]:
                            for v in T.unroll(CG // 4):
                                part[T.ramp(u * CG + v * 4, 1, 4)] = o_part[
                                    split, b, t, h, T.ramp(col + v * 4, 1, 4)
                                ]
                            w[u] = lse_part[split, b, t, h]
                        else:
                            w[u] = T.float32(neg_inf)
                            for c in T.unroll(CG):
                                part[u * CG + c] = T.float32(0)
                    m[1] = m[0]
                    for u in T.unroll(U):
                        m[1] = T.max(m[1], w[u])
                    total[0] = total[0] * T.exp(m[0] - m[1])
                    for c in T.unroll(CG):
                        acc[c] = acc[c] * T.exp(m[0] - m[1])
                    for u in T.unroll(U):
                        w[u] = T.exp(w[u] - m[1])
                        total[0] = total[0] + w[u]
                        for c in T.unroll(CG):
                            acc[c] = acc[c] + w[u] * part[u * CG + c]
                    m[0] = m[1]
                # combine the SL split lanes (contiguous, warp-uniform SL): max, rescale, sum
                m[1] = m[0]
                for k in T.unroll(5):
                    if (1 << k) < used[1]:
                        m[1] = T.max(
                            m[1],
                            T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), m[1], 1 << k, 32, 32),
                        )
                total[0] = total[0] * T.exp(m[0] - m[1])
                for c in T.unroll(CG):
                    acc[c] = acc[c] * T.exp(m[0] - m[1])
                for k in T.unroll(5):
                    if (1 << k) < used[1]:
                        total[0] = total[0] + T.tvm_warp_shuffle_xor(
                            T.uint32(0xFFFFFFFF), total[0], 1 << k, 32, 32
                        )
                        for c in T.unroll(CG):
                            acc[c] = acc[c] + T.tvm_warp_shuffle_xor(
                                T.uint32(0xFFFFFFFF), acc[c], 1 << k, 32, 32
                            )
                if valid and sl == 0 and used[0] > 1:
                    for c in T.unroll(CG):
                        o[b, t, h, col + c] = T.Cast(
                            dtype,
                            T.if_then_else(total[0] > 0, acc[c] / total[0], T.float32(0)),
                        )
                    if col == 0:
                        lse[b, t, h] = T.if_then_else(
                            total[0] > 0, m[1] + T.log(total[0]), T.float32(neg_inf)
                        )
                if config.pdl:
                    grid_dependency.launch_dependents()

    return merge


def build(kernels: DecodeKernels, target: tvm.target.Target) -> tvm.runtime.Module:
    """Compile both kernels into one module with functions ``decode_split``/``decode_merge``."""
    mod = tvm.IRModule({"decode_split": kernels.split, "decode_merge": kernels.merge})
    return tvm.compile(mod, target=target)
