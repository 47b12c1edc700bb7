"""Routed experts for a small static token count (decode): expert GEMVs, no grouping pass.

With ``T <= GEMV_MAX_TOKENS`` the MoE layer is ``moe.moe_route`` then
:func:`moe_gate_up_gemv` (one GEMV per (token, slot) against its expert's interleaved gate/up
rows, SiLU·up fused) and :func:`moe_down_gemv` (the down GEMVs with the weighted sum over the k
slots folded in: no ``moe_combine``): 3 kernels, each weight row read once per (token, slot).

On CUDA both GEMVs run on tensor cores (``gemv_mma.moe_gate_up`` / ``gemv_mma.moe_down``: expert
rows as the mma's A operand straight from DRAM); the FMA schedules below serve the CPU (llvm)
build and stay selectable on CUDA with a :class:`MoeGemvConfig`.

``weight_format`` (a GGUF format of ``quant_formats.FORMATS``): the expert weights are that
format's bytes ``uint8 [E, rows, row_bytes(K)]``, decoded by ``fmt.value`` (to float32) inside
the FMA reduction, on CUDA too (the tensor-core GEMVs read f16 rows). A lane's K chunk is then
a whole GGUF block, or the largest power-of-two part of one that still gives every lane of a
warp a chunk (Q4_K at K = 2048: 64 values), so the lane's bytes are one contiguous run.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import tirx
from tvm.script import tirx as T

from . import gemm as G
from . import gemv_mma
from .moe_route import _i64, _named, _par
from .quant_formats import FORMATS
from .target import is_gpu

GEMV_MAX_TOKENS = 8  # static T up to this: per-(token, slot) GEMVs, no grouping (decode)


@dataclasses.dataclass(frozen=True)
class MoeGemvConfig:
    """Expert GEMV tiling: a block of ``warps`` warps; a warp owns ``cols`` output columns
    (gate_up: 2 * cols weight rows); lanes split K in ``vec``-element (16-byte) vectors."""

    warps: int = 4
    cols: int = 4
    vec: int = 8


# V2-Lite at T=1 on 132 SMs: gate_up 6 x 88 = 528 blocks (4 per SM, 128 KB of weights each;
# 8 warps x 2 columns: 4 columns per warp spilled 8-24 bytes at bf16); down 512 blocks (3.9 per
# SM, 6 experts x 4 rows x 2.8 KB each)
GEMV_GATE_UP = MoeGemvConfig(warps=8, cols=2)
GEMV_DOWN = MoeGemvConfig(warps=4, cols=1)


def _gemv_check(k_dim: int, cfg: MoeGemvConfig) -> None:
    if k_dim % cfg.vec:
        raise ValueError(f"expert GEMV needs K % {cfg.vec} == 0, got {k_dim}")


class _RegisterBytes:
    """A lane's staged block (``words`` of ``width`` bytes, a local array) as the byte buffer of
    ``fmt.value``: byte ``off`` is a shift and mask of its word. The value loop is unrolled,
    so after lowering every index and shift is a constant and the words stay registers."""

    def __init__(self, words, width: int):
        self.words, self.width = words, width

    def __getitem__(self, idx):
        off, dt = idx[-1], self.words.dtype
        shift = (off % self.width * 8).astype(dt)
        return (self.words[off // self.width] >> shift) & tirx.const(0xFF, dt)


@dataclasses.dataclass(frozen=True)
class _ExpertWeight:
    """An FMA expert GEMV's weight operand: ``shape`` / ``dtype`` per expert, ``value(w, e, r,
    k)`` element (e, r, k) in float32 read from memory. With ``staged``, a lane's chunk is one
    whole GGUF block: ``block_bytes // align`` loads of ``align`` bytes (``lanes`` words of
    ``word`` dtype) from the weight's word view copy it into registers, and ``in_block(wb, j)``
    decodes value j from them (nvcc splits byte-vector copies of a byte array into byte loads;
    word arrays it keeps)."""

    cfg: MoeGemvConfig
    shape: tuple
    dtype: str | None  # None: the kernel's dtype
    value: object
    staged: bool = False
    block_bytes: int = 1
    align: int = 1
    word: str = "uint8"
    in_block: object = None

    @property
    def width(self) -> int:  # bytes per word
        return tvm.DataType(self.word).bits // 8

    @property
    def lanes(self) -> int:  # words per load
        return max(self.align // self.width, 1)


def _fma_setup(config, weight_format, default: MoeGemvConfig, rows: int, k_dim: int):
    """The weight operand (:class:`_ExpertWeight`) of an FMA expert GEMV; a GGUF
    ``weight_format`` also sets the lane chunk ``vec`` (see the module docstring)."""
    if isinstance(config, gemv_mma.GemvMmaConfig):
        raise ValueError("GemvMmaConfig has no quantized-weight form: use MoeGemvConfig")
    cfg = config or default
    if weight_format is None:
        _gemv_check(k_dim, cfg)
        value = lambda w, e, r, k: T.Cast("float32", w[e, r, k])  # noqa: E731
        return _ExpertWeight(cfg, (_i64(rows), _i64(k_dim)), None, value)
    fmt = FORMATS[weight_format]
    rb = fmt.row_bytes(k_dim)  # raises unless K is a multiple of the block
    vec = max(fmt.block, 8)
    while vec > 8 and vec % 2 == 0 and k_dim // vec < 32:  # give all 32 lanes a chunk
        vec //= 2
    cfg = dataclasses.replace(cfg, vec=vec)
    _gemv_check(k_dim, cfg)
    align = 1  # blocks start at multiples of block_bytes: the widest load that divides it
    while align < 16 and fmt.block_bytes % (2 * align) == 0:
        align *= 2
    word = {1: "uint8", 2: "uint16"}.get(align, "uint32")
    width = tvm.DataType(word).bits // 8
    return _ExpertWeight(
        cfg, (_i64(rows), _i64(rb)), "uint8", lambda w, e, r, k: fmt.value(w, (e, r), k),
        staged=vec == fmt.block and fmt.block > 1, block_bytes=fmt.block_bytes, align=align,
        word=word, in_block=lambda wb, j: fmt.value(_RegisterBytes(wb, width), 0, j),
    )  # fmt: skip


@T.macro
def _stage(wb, ww, e, row, word0, n_ld, lanes):
    """wb = the lane's block: ``ww[e, row, word0 :]`` by ``n_ld`` loads of ``lanes`` words."""
    for u in T.unroll(n_ld):
        if lanes == 1:
            wb[u] = ww[e, row, word0 + u]
        else:
            wb[T.ramp(u * lanes, 1, lanes)] = ww[e, row, T.ramp(word0 + u * lanes, 1, lanes)]


def moe_gate_up_gemv(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: MoeGemvConfig | gemv_mma.GemvMmaConfig | None = None,
    weight_format: str | None = None,
) -> tirx.PrimFunc:
    """(x [T, D], ids [T, k] int32, gate_up [E, 2I, D] interleaved, h [T*k, I]):
    ``h[t*k + j] = silu(x[t] Wg[e]^T) * (x[t] Wu[e]^T)`` with ``e = ids[t, j]``.

    For small T (decode): every (token, slot) reads its expert's rows once, no grouping pass.
    Block (column block, entry); a warp owns ``cols`` output columns, i.e. the gate and up
    rows of each; lanes accumulate f32 partials over ``vec``-element K chunks; the 32 partials
    per row are summed through shared memory (a second thread loop: the same code runs on CPU).
    ``weight_format``: gate_up is ``[E, 2I, row_bytes(D)]`` uint8 (module docstring) in the
    checkpoint's ``[gate; up]`` row order (not interleaved).
    """
    if is_gpu(target) and weight_format is None and not isinstance(config, MoeGemvConfig):
        return gemv_mma.moe_gate_up(
            hidden, inter, num_experts=num_experts, top_k=top_k, dtype=dtype, target=target,
            config=config,
        )  # fmt: skip
    d, n_out, k_top, g = hidden, inter, top_k, G.SWIGLU_GROUP
    wt = _fma_setup(config, weight_format, GEMV_GATE_UP, 2 * n_out, d)
    cfg, w_shape, w_dtype, w_val, blk = wt.cfg, wt.shape, wt.dtype, wt.value, wt.in_block
    if n_out % g:
        raise ValueError(f"moe_gate_up_gemv needs I % {g} == 0, got {n_out}")
    par = _par(is_gpu(target))
    kv_n = (d + 32 * cfg.vec - 1) // (32 * cfg.vec)  # chunk steps per lane
    per_blk = cfg.warps * cfg.cols
    n_blk = (n_out + per_blk - 1) // per_blk
    t_num = tirx.Var("t", "int64")
    ws, cols, vec = cfg.warps, cfg.cols, cfg.vec
    ld = min(vec, 8)  # x loads: 16-byte vectors
    quant, staged = weight_format is not None, wt.staged
    n_ld, lanes, wd = wt.block_bytes // wt.align, wt.lanes, wt.width  # staging loads
    ww_shape = (_i64(num_experts), w_shape[0], w_shape[1] // wd)  # the weight as words

    @T.prim_func
    def gate_up(
        x: T.Buffer((t_num, d), dtype),
        ids: T.Buffer((t_num, k_top), "int32"),
        w: T.Buffer((_i64(num_experts), *w_shape), w_dtype or dtype),  # > 2^31 elements
        h: T.Buffer((t_num * k_top, n_out), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        ww = T.decl_buffer(ww_shape, wt.word, data=w.data)
        for ent in par(t_num * k_top, "blockIdx.y"):
            for bx in par(n_blk, "blockIdx.x"):
                part = T.alloc_buffer((ws, cols, 2, 32), "float32", scope="shared")
                for ty in par(ws, "threadIdx.y"):
                    for tx in par(32, "threadIdx.x"):
                        xv = T.alloc_buffer((ld,), dtype, scope="local")
                        xs = T.alloc_buffer((kv_n * vec,), "float32", scope="local")  # x in f32
                        wv = T.alloc_buffer((2 * cols * vec,), dtype, scope="local")
                        wb = T.alloc_buffer((n_ld * lanes,), wt.word, scope="local")  # staged block
                        acc = T.alloc_buffer((2 * cols,), "float32", scope="local")
                        e = T.meta_var(ids[ent // k_top, ent % k_top])
                        for q in T.unroll(2 * cols):
                            acc[q] = T.float32(0)
                        for kv in T.unroll(kv_n):
                            if (kv * 32 + tx) * vec < d:
                                for u in T.unroll(vec // ld):
                                    xv[T.ramp(0, 1, ld)] = x[
                                        ent // k_top, T.ramp((kv * 32 + tx) * vec + u * ld, 1, ld)
                                    ]
                                    for v in T.unroll(ld):
                                        xs[kv * vec + u * ld + v] = T.Cast("float32", xv[v])
                        for kv in T.unroll(kv_n):
                            if (kv * 32 + tx) * vec < d:
                                for q in T.unroll(2 * cols):  # q = 2 c + (0 gate, 1 up)
                                    col = T.meta_var((bx * ws + ty) * cols + q // 2)
                                    row = T.meta_var(  # quantized: [gate; up] row order
                                        T.min(
                                            col + q % 2 * n_out
                                            if quant
                                            else col // g * 2 * g + q % 2 * g + col % g,
                                            2 * n_out - 1,
                                        )
                                    )
                                    if staged:  # the lane's block: registers, then decode
                                        _stage(
                                            wb,
                                            ww,
                                            e,
                                            row,
                                            (kv * 32 + tx) * n_ld * lanes,
                                            n_ld,
                                            lanes,
                                        )
                                        for v in T.unroll(vec):
                                            acc[q] = acc[q] + xs[kv * vec + v] * blk(wb, v)
                                    elif quant:  # decoded in the reduction: no f16 copy
                                        for v in T.unroll(vec):
                                            acc[q] = acc[q] + xs[kv * vec + v] * w_val(
                                                w, e, row, (kv * 32 + tx) * vec + v
                                            )
                                    else:
                                        wv[T.ramp(q * vec, 1, vec)] = w[
                                            e, row, T.ramp((kv * 32 + tx) * vec, 1, vec)
                                        ]
                                if not quant:
                                    for q in T.unroll(2 * cols):
                                        for v in T.unroll(vec):
                                            acc[q] = acc[q] + xs[kv * vec + v] * T.Cast(
                                                "float32", wv[q * vec + v]
                                            )
                        for q in T.unroll(2 * cols):
                            part[ty, q // 2, q % 2, tx] = acc[q]
                for ty in par(ws, "threadIdx.y"):
                    for tx in par(32, "threadIdx.x"):
                        sums = T.alloc_buffer((2,), "float32", scope="local")
                        o = T.meta_var((bx * ws + ty) * cols + tx)
                        if tx < cols and o < n_out:
                            for q in T.unroll(2):
                                sums[q] = T.float32(0)
                                for ln in T.unroll(32):
                                    sums[q] = sums[q] + part[ty, tx, q, ln]
                            h[ent, o] = T.Cast(dtype, T.sigmoid(sums[0]) * sums[0] * sums[1])

    suffix = "" if weight_format is None else f"_{weight_format}"
    return _named(gate_up, f"moe_gate_up_gemv_e{num_experts}_d{hidden}_i{inter}{suffix}")


def moe_down_gemv(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: MoeGemvConfig | gemv_mma.GemvMmaConfig | None = None,
    weight_format: str | None = None,
) -> tirx.PrimFunc:
    """(h [T*k, I], ids [T, k] int32, down [E, D, I], weights [T, k] f32, out [T, D]):
    ``out[t] = sum_j weights[t, j] * (h[t*k + j] @ down[ids[t, j]]^T)`` - the down GEMVs with
    the combine folded in (f32 sum over the k slots). Block (column block, token).
    ``weight_format``: down is ``[E, D, row_bytes(I)]`` uint8 (module docstring)."""
    if is_gpu(target) and weight_format is None and not isinstance(config, MoeGemvConfig):
        return gemv_mma.moe_down(
            hidden, inter, num_experts=num_experts, top_k=top_k, dtype=dtype, target=target,
            config=config,
        )  # fmt: skip
    d, n_in, k_top = hidden, inter, top_k
    wt = _fma_setup(config, weight_format, GEMV_DOWN, d, n_in)
    cfg, w_shape, w_dtype, w_val, blk = wt.cfg, wt.shape, wt.dtype, wt.value, wt.in_block
    par = _par(is_gpu(target))
    kv_n = (n_in + 32 * cfg.vec - 1) // (32 * cfg.vec)
    per_blk = cfg.warps * cfg.cols
    n_blk = (d + per_blk - 1) // per_blk
    t_num = tirx.Var("t", "int64")
    ws, cols, vec = cfg.warps, cfg.cols, cfg.vec
    ld = min(vec, 8)  # h loads: 16-byte vectors
    quant, staged = weight_format is not None, wt.staged
    n_ld, lanes, wd = wt.block_bytes // wt.align, wt.lanes, wt.width  # staging loads
    ww_shape = (_i64(num_experts), w_shape[0], w_shape[1] // wd)  # the weight as words

    @T.prim_func
    def down(
        h: T.Buffer((t_num * k_top, n_in), dtype),
        ids: T.Buffer((t_num, k_top), "int32"),
        w: T.Buffer((_i64(num_experts), *w_shape), w_dtype or dtype),
        weights: T.Buffer((t_num, k_top), "float32"),
        out: T.Buffer((t_num, d), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        ww = T.decl_buffer(ww_shape, wt.word, data=w.data)
        for t in par(t_num, "blockIdx.y"):
            for bx in par(n_blk, "blockIdx.x"):
                part = T.alloc_buffer((ws, cols, 32), "float32", scope="shared")
                for ty in par(ws, "threadIdx.y"):
                    for tx in par(32, "threadIdx.x"):
                        hs = T.alloc_buffer((kv_n * vec,), dtype, scope="local")
                        wv = T.alloc_buffer((cols * vec,), dtype, scope="local")
                        wb = T.alloc_buffer((n_ld * lanes,), wt.word, scope="local")  # staged block
                        acc = T.alloc_buffer((cols,), "float32", scope="local")
                        dot = T.alloc_buffer((cols,), "float32", scope="local")
                        for c in T.unroll(cols):
                            acc[c] = T.float32(0)
                        for j in T.unroll(k_top):
                            for c in T.unroll(cols):
                                dot[c] = T.float32(0)
                            for kv in T.unroll(kv_n):
                                if (kv * 32 + tx) * vec < n_in:
                                    for u in T.unroll(vec // ld):
                                        hs[T.ramp(kv * vec + u * ld, 1, ld)] = h[
                                            t * k_top + j,
                                            T.ramp((kv * 32 + tx) * vec + u * ld, 1, ld),
                                        ]
                            for kv in T.unroll(kv_n):
                                if (kv * 32 + tx) * vec < n_in:
                                    if quant:  # decoded in the reduction: no f16 copy
                                        for c in T.unroll(cols):
                                            row = T.meta_var(
                                                T.min((bx * ws + ty) * cols + c, d - 1)
                                            )
                                            if staged:  # the lane's block: registers first
                                                _stage(
                                                    wb, ww, ids[t, j], row,
                                                    (kv * 32 + tx) * n_ld * lanes, n_ld, lanes,
                                                )  # fmt: skip
                                            for v in T.unroll(vec):
                                                hv = T.meta_var(T.Cast("float32", hs[kv * vec + v]))
                                                if staged:
                                                    dot[c] = dot[c] + hv * blk(wb, v)
                                                else:
                                                    dot[c] = dot[c] + hv * w_val(
                                                        w, ids[t, j], row, (kv * 32 + tx) * vec + v
                                                    )
                                    else:
                                        for c in T.unroll(cols):
                                            wv[T.ramp(c * vec, 1, vec)] = w[
                                                ids[t, j],
                                                T.min((bx * ws + ty) * cols + c, d - 1),
                                                T.ramp((kv * 32 + tx) * vec, 1, vec),
                                            ]
                                        for c in T.unroll(cols):
                                            for v in T.unroll(vec):
                                                dot[c] = dot[c] + T.Cast(
                                                    "float32", hs[kv * vec + v]
                                                ) * T.Cast("float32", wv[c * vec + v])
                            for c in T.unroll(cols):
                                acc[c] = acc[c] + weights[t, j] * dot[c]
                        for c in T.unroll(cols):
                            part[ty, c, tx] = acc[c]
                for ty in par(ws, "threadIdx.y"):
                    for tx in par(32, "threadIdx.x"):
                        total = T.alloc_buffer((1,), "float32", scope="local")
                        o = T.meta_var((bx * ws + ty) * cols + tx)
                        if tx < cols and o < d:
                            total[0] = T.float32(0)
                            for ln in T.unroll(32):
                                total[0] = total[0] + part[ty, tx, ln]
                            out[t, o] = T.Cast(dtype, total[0])

    suffix = "" if weight_format is None else f"_{weight_format}"
    return _named(down, f"moe_down_gemv_e{num_experts}_d{hidden}_i{inter}{suffix}")
