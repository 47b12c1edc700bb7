"""Tensor-core GEMV for decode: a few tokens (<= 8) against weight rows read once from DRAM.

The product is memory-bound, so the kernel is laid out for bytes in flight, not for data reuse:
weight rows are the ``A`` operand of ``mma.sync.m16n8k16`` loaded straight from global memory
into registers (no shared memory, no ``ldmatrix``), and the tokens are the 8 ``B`` columns.

Per thread (lane ``4 g + c``) and 32-wide k step ``s``: two 16-byte loads, rows ``g`` and
``g + 8`` of its 16-row tile at columns ``32 s + 8 c .. + 7`` (4 lanes read 64 contiguous bytes
of a row: whole sectors), and one 16-byte load of token ``g``'s activations at the same columns.
The k order inside an mma is a free permutation as long as A and B agree: mma ``q`` of the step
takes columns ``32 s + 8 c + 4 q .. + 3`` as the fragment's logical k ``2c, 2c+1, 2c+8, 2c+9``, so
the B fragment is 4 contiguous halves of the token vector and the A fragment two pairs of each
row vector. Accumulators: C ``(g, 2c..2c+1)`` and ``(g + 8, 2c..2c+1)``; one chain per ``q``.

A block is ``tiles`` 16-row tiles x ``warps`` warps; warps split K (and, for the MoE down GEMV,
the top-k slots), then sum their f32 tiles through shared memory, where the epilogue runs:
cast, residual add, SiLU(gate)·up (gate/up rows interleaved by ``gemm.SWIGLU_GROUP``), the
routing weight. ``unroll`` k steps are loaded before their mmas: ``unroll * tiles * 2`` 16-byte
weight loads in flight per thread.

Factories: :func:`dense` (``gemm.gemm`` for static M <= 8 on CUDA, same parameters as the
other GEMM kernels), :func:`moe_gate_up` and :func:`moe_down` (the decode expert GEMVs of
``moe_gemv``, same parameters).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from .target import gpu_spec

MAX_TOKENS = 8  # the mma's N
GROUP = 32  # = gemm.SWIGLU_GROUP (gate/up rows interleave in groups of this many rows)
_MMA_TYPE = {"float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class GemvMmaConfig:
    """``tiles`` 16-row mma tiles per block (all warps share them), ``warps`` warps along K,
    ``unroll`` 32-wide k steps loaded before their mmas."""

    tiles: int = 1
    warps: int = 4
    unroll: int = 4


def default_config(
    *, rows: int, k: int, items: int, epilogue=None, target=None, slots: int = 1
) -> GemvMmaConfig:
    """Many K-warps with a short unroll beat deep unrolls (``benchmarks/sweep_gemv.py`` over
    every V2-Lite decode product, ``benchmarks/NOTES_gemm.md``): 16 warps (``slots`` x warps
    <= 24 for the MoE down GEMV), 32 for SiLU·up (2 tiles: 16 gate + 16 up rows) and for grids
    of more than 8 blocks per SM, each warp with at least one full unroll of 2 k steps.
    ``items``: blocks along the grid's second axis; ``slots``: warp groups per block."""
    silu = epilogue == "silu_mul"
    tiles, unroll = (2 if silu else 1), 2
    sms = gpu_spec(target).sm_count if target is not None else 132
    blocks = -(-rows // (16 * tiles)) * items
    cap = 32 if silu or blocks >= 8 * sms else 16
    steps, warps = -(-k // 32), 1
    while 2 * warps <= cap and 2 * warps * slots <= max(24, cap) and 2 * warps * unroll <= steps:
        warps *= 2
    return GemvMmaConfig(tiles=tiles, warps=warps, unroll=unroll)


# ---------------------------------------------------------------------------------------------
# Index formulas: plain functions of ints / numpy arrays (tests/test_gemv_mma_emulation.py walks
# every block, warp, lane and step with them) or of TIR expressions (the kernel below).


def _tir(*xs) -> bool:
    return any(tvm.ir.is_prim_expr(x) for x in xs)


def _and(a, b):
    return tirx.And(a, b) if _tir(a, b) else np.logical_and(a, b)


def _min(a, b):
    return T.min(a, b) if _tir(a, b) else np.minimum(a, b)


def _select(cond, a, b):
    return T.if_then_else(cond, a, b) if _tir(cond, a, b) else np.where(cond, a, b)


def k_split(k: int, *, warps: int, unroll: int) -> tuple[int, int]:
    """(k steps of 32 columns per K-warp, iterations of ``unroll`` steps per K-warp)."""
    steps = -(-k // 32)
    spw = -(-steps // warps)
    return spw, -(-spw // unroll)


def out_rows(tiles: int, silu: bool) -> int:
    """Output rows of a block (SiLU·up: ``8 * tiles`` of its ``16 * tiles`` rows are gate rows,
    the others the matching up rows)."""
    return 8 * tiles if silu else 16 * tiles


def k_col(ks, it, u, lane, *, spw: int, unroll: int):
    """First of the 8 columns that lane ``lane`` of K-warp ``ks`` loads (its A rows' and its
    token's) at step ``u`` of iteration ``it``; ``spw``: k steps (of 32 columns) per K-warp."""
    return (ks * spw + it * unroll + u) * 32 + lane % 4 * 8


def k_ok(it, u, kk, *, spw: int, unroll: int, k: int):
    """Whether that step loads (else its registers are zero): in the warp's range and in K."""
    return _and(it * unroll + u < spw, kk < k)


def a_row(t, h, lane):
    """Block row of the weight vector that lane ``lane`` loads for tile ``t``, half ``h``."""
    return t * 16 + h * 8 + lane // 4


def b_tok(lane):
    """Token whose activation vector lane ``lane`` loads."""
    return lane // 4


def wa_at(u, t, h, *, tiles: int):
    """Offset in ``wa`` (halves) of the weight vector of step ``u``, tile ``t``, half ``h``."""
    return ((u * tiles + t) * 2 + h) * 8


def xb_at(u):
    """Offset in ``xb`` (halves) of the token vector of step ``u``."""
    return u * 8


FA_B = 8  # fa[0:8]: the A fragment (a0..a7), fa[8:12]: the B fragment (b0..b3)


def frag_a(p, u, t, q, *, tiles: int):
    """Offset in ``wa`` of A register ``a{p}`` of mma ``q`` (step ``u``, tile ``t``): a0..a7
    are halves ``4q + (0, 1, 0, 1, 2, 3, 2, 3)`` of the vectors of rows ``g, g, g+8, g+8, g, g,
    g+8, g+8`` (logical k ``2c, 2c+1`` then ``2c+8, 2c+9``, as ``frag_b``'s b0..b3)."""
    return wa_at(u, t, p // 2 % 2, tiles=tiles) + q * 4 + p // 4 * 2 + p % 2


def frag_b(p, u, q):
    """Offset in ``xb`` of B register ``b{p}`` of mma ``q``: halves ``8c + 4q + p``."""
    return xb_at(u) + q * 4 + p


def acc_at(t, q):
    """Offset in ``acc`` of the C fragment (c0..c3) of mma ``q`` of tile ``t``."""
    return (t * 2 + q) * 4


def c_row(t, e, lane):
    """Block row of element ``c{e}`` of a lane's C fragment of tile ``t``."""
    return t * 16 + lane // 4 + e // 2 * 8


def c_tok(e, lane):
    """Token (column) of element ``c{e}`` of a lane's C fragment."""
    return lane % 4 * 2 + e % 2


def red_rounds(*, rows: int, nwarp: int) -> int:
    """Rounds of the block sum: every thread takes one (output row, token) item per round."""
    return -(-(rows * MAX_TOKENS) // (32 * nwarp))


def red_idx(i, tid, *, nwarp: int):
    """Item of thread ``tid`` in round ``i`` of the block sum."""
    return i * 32 * nwarp + tid


def red_row(idx):
    """Output row of block-sum item ``idx``."""
    return idx // MAX_TOKENS


def red_tok(idx):
    """Token of block-sum item ``idx``."""
    return idx % MAX_TOKENS


def red_at(idx, s, *, rows: int):
    """Row of ``red`` summed for item ``idx``: its gate row (``s = 0``) or up row (``s = 1``)."""
    return red_row(idx) + s * rows


def red_ok(idx, *, rows: int, n_tok):
    """Whether item ``idx`` is stored: a row of the block, a token of the call."""
    return _and(idx < rows * MAX_TOKENS, red_tok(idx) < n_tok)


def silu_mul(gate, up):
    sig = T.sigmoid(gate) if _tir(gate) else 1 / (1 + np.exp(-gate))
    return sig * gate * up


def w_row(bx, r, *, rows: int, tiles: int, silu: bool):
    """Weight row of block ``bx``'s row ``r``; rows past the end re-read the last (never
    stored). SiLU·up: the block's first ``tiles / 2`` tiles are gate rows of its ``8 * tiles``
    outputs, the others the matching up rows (``GROUP`` rows later in the interleaved layout)."""
    if silu:
        out0 = bx * (8 * tiles)  # first output column of the block
        gate = out0 // GROUP * (2 * GROUP) + out0 % GROUP
        return _select(r < 8 * tiles, gate + r, gate + GROUP + r - 8 * tiles)
    return _min(bx * (16 * tiles) + r, rows - 1)


def out_col(bx, r, *, tiles: int, silu: bool):
    """Output column of block ``bx``'s output row ``r`` (``8 * tiles`` outputs per block for
    SiLU·up, else ``16 * tiles``)."""
    return bx * out_rows(tiles, silu) + r


def slot_of(warp, *, warps: int):
    """MoE down: the top-k slot of warp ``warp`` (``warps`` K-warps per slot)."""
    return warp // warps


def kwarp_of(warp, *, warps: int):
    """MoE down: the K-warp index of warp ``warp`` within its slot."""
    return warp % warps


def candidates(*, rows: int, k: int, epilogue=None, slots: int = 1) -> list[GemvMmaConfig]:
    """The config space searched by ``benchmarks/sweep_gemv.py``: tiles 1-2 (SiLU·up 2-4),
    unroll 2-16 with at most 32 loads in flight per thread, 1-32 K-warps (``slots`` x warps
    <= 32 per block), no more loads in flight per block than registers hold, every warp with
    at least half an unroll of k steps."""
    steps, out = -(-k // 32), []
    for tiles in (2, 4) if epilogue == "silu_mul" else (1, 2):
        for unroll in (2, 4, 8, 16):
            for warps in (1, 2, 4, 8, 16, 32):
                loads = unroll * tiles * 2  # 16-byte loads in flight per thread
                # past ~256 loads x warps per block ptxas spills (register file of 64K)
                fits = loads <= 32 and warps * slots <= 32 and loads * warps * slots <= 256
                if fits and 2 * steps >= warps * unroll:
                    out.append(GemvMmaConfig(tiles=tiles, warps=warps, unroll=unroll))
    return out


def applies(m, k: int, *, dtype: str) -> bool:
    """Static 1..8 tokens, 16-byte rows, f16/bf16: the shapes this kernel serves."""
    return isinstance(m, int) and 1 <= m <= MAX_TOKENS and k % 8 == 0 and dtype in _MMA_TYPE


def _body(*, k: int, cfg: GemvMmaConfig, slots: int, dtype: str, silu: bool):
    """The block body shared by every variant, ``run(tid, wvec, xvec, n_tok, ks, scale, store,
    ctx)``, and the block's warp count. ``slots``: warp groups that each read their own weight
    matrix and activation (MoE down: the top-k slots)."""
    TL, U, WK = cfg.tiles, cfg.unroll, cfg.warps
    NWARP = WK * slots
    OUT_ROWS = out_rows(TL, silu)  # output rows per block (silu: gate tiles, then up)
    SUMS = 2 if silu else 1
    spw, NIT = k_split(k, warps=WK, unroll=U)  # k steps per warp, iterations
    mma_t = _MMA_TYPE[dtype]
    zero8 = T.Broadcast(tirx.const(0, dtype), 8)

    @T.macro
    def warp_dot(acc, wa, xb, fa, wvec, xvec, n_tok, ks, lane):
        """acc[TL, 2, 4] += this warp's k range of (rows of the block) x (token vectors).
        ``wvec(r, kk)``: the 8-wide weight vector of block row ``r``; ``xvec(n, kk)``: token
        ``n``'s; tokens ``>= n_tok`` and columns past the warp's range read as zero."""
        for e in T.unroll(TL * 8):
            acc[e] = T.float32(0)
        for it in range(NIT):
            for u in T.unroll(U):
                kk = T.meta_var(k_col(ks, it, u, lane, spw=spw, unroll=U))
                ok = T.meta_var(k_ok(it, u, kk, spw=spw, unroll=U, k=k))
                for t in T.unroll(TL):
                    for h in T.unroll(2):
                        if ok:
                            wa[T.ramp(wa_at(u, t, h, tiles=TL), 1, 8)] = wvec(a_row(t, h, lane), kk)
                        else:
                            wa[T.ramp(wa_at(u, t, h, tiles=TL), 1, 8)] = zero8
                if ok and b_tok(lane) < n_tok:
                    xb[T.ramp(xb_at(u), 1, 8)] = xvec(b_tok(lane), kk)
                else:
                    xb[T.ramp(xb_at(u), 1, 8)] = zero8
            for u in T.unroll(U):
                for t in T.unroll(TL):
                    for q in T.unroll(2):
                        # fragments are copied (register moves after nvcc): a buffer only ever
                        # accessed as 8-wide vectors is stored as uint4, and an mma operand
                        # offset into it would count in uint4s
                        for p in T.unroll(4):  # B regs: 4 contiguous halves of the token vector
                            fa[FA_B + p] = xb[frag_b(p, u, q)]
                        for p in T.unroll(8):  # A regs: (g, 2c) (g+8, 2c) (g, 2c+8) (g+8, 2c+8)
                            fa[p] = wa[frag_a(p, u, t, q, tiles=TL)]
                        T.evaluate(
                            T.ptx_legacy.mma(
                                "m16n8k16",
                                "row",
                                "col",
                                mma_t,
                                mma_t,
                                "fp32",
                                fa.data,
                                0,
                                fa.data,
                                FA_B,
                                acc.data,
                                acc_at(t, q),
                                False,
                                dtype="float32",
                            )
                        )

    @T.macro
    def to_shared(red, acc, warp, lane, scale):
        """red[warp, row, token] = scale * (both chains of this warp's C fragments)."""
        for t in T.unroll(TL):
            for e in T.unroll(4):
                red[warp, c_row(t, e, lane), c_tok(e, lane)] = scale * (
                    acc[acc_at(t, 0) + e] + acc[acc_at(t, 1) + e]
                )

    @T.macro
    def reduce_store(red, tid, n_tok, store, ctx):
        """``store(ctx, n, r, value)`` for each token ``n`` and output row ``r`` of the block:
        the sum over warps; for ``silu_mul`` (first half of the rows gate, second half the
        matching up rows) ``silu(gate) * up``."""
        for i in T.unroll(red_rounds(rows=OUT_ROWS, nwarp=NWARP)):
            idx = T.meta_var(red_idx(i, tid, nwarp=NWARP))
            if red_ok(idx, rows=OUT_ROWS, n_tok=n_tok):
                total = T.alloc_buffer((2,), "float32", scope="local")
                for s in T.unroll(SUMS):
                    total[s] = T.float32(0)
                    for wi in T.unroll(NWARP):
                        total[s] = total[s] + red[wi, red_at(idx, s, rows=OUT_ROWS), red_tok(idx)]
                if silu:
                    store(
                        ctx,
                        red_tok(idx),
                        red_row(idx),
                        silu_mul(total[0], total[1]),
                    )
                else:
                    store(ctx, red_tok(idx), red_row(idx), total[0])

    @T.macro
    def run(tid, wvec, xvec, n_tok, ks, scale, store, ctx):
        """One block: this warp's tiles (``warp_dot`` over K-warp ``ks``, scaled by ``scale``),
        their sum over the block's warps and the epilogue ``store(ctx, n, r, value)``."""
        red = T.alloc_buffer((NWARP, TL * 16, MAX_TOKENS), "float32", scope="shared")
        acc = T.alloc_buffer((TL * 8,), "float32", scope="local")
        wa = T.alloc_buffer((U * TL * 16,), dtype, scope="local")
        xb = T.alloc_buffer((U * 8,), dtype, scope="local")
        fa = T.alloc_buffer((12,), dtype, scope="local")  # A, B fragments
        warp_dot(acc, wa, xb, fa, wvec, xvec, n_tok, ks, tid % 32)
        to_shared(red, acc, tid // 32, tid % 32, scale)
        T.tvm_storage_sync("shared")
        reduce_store(red, tid, n_tok, store, ctx)

    return run, NWARP


def _i64(v: int):
    return tirx.IntImm("int64", v)


def _check(rows: int, k: int, cfg: GemvMmaConfig, *, silu: bool, dtype: str) -> None:
    if dtype not in _MMA_TYPE:
        raise ValueError(f"tensor-core GEMV supports float16/bfloat16, not {dtype}")
    if k % 8:
        raise ValueError(f"tensor-core GEMV needs K % 8 == 0 (16-byte rows), got {k}")
    if silu and (cfg.tiles not in (2, 4) or rows % (2 * GROUP)):
        raise ValueError(
            f"silu_mul needs tiles 2 or 4 and rows % {2 * GROUP} == 0, got "
            f"tiles={cfg.tiles}, rows={rows}"
        )


def _wvec(w, *, lead, bx, rows: int, tiles: int, silu: bool):
    """The 8-wide weight vector of block ``bx``'s row ``r`` at column ``kk`` (row: :func:`w_row`);
    ``lead``: the expert / head index of a 3-D weight (None: 2-D)."""

    def f(r, kk):
        row = w_row(bx, r, rows=rows, tiles=tiles, silu=silu)
        return w[row, T.ramp(kk, 1, 8)] if lead is None else w[lead, row, T.ramp(kk, 1, 8)]

    return f


def dense(
    m: int,
    n: int,
    k: int,
    *,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: GemvMmaConfig | None = None,
    epilogue: str | None = None,
    out_dtype: str | None = None,
    batch: int | None = None,
) -> tirx.PrimFunc:
    """``gemm.gemm`` for ``m <= 8`` tokens: ``(x [m, (b,) k], w [(b,) n_w, k], (r,) y)``, the
    parameters and epilogues of ``gemm.gemm_workload`` (``w`` in ``transform_weight`` layout).
    Block = (``16 * tiles`` weight rows, head)."""
    silu, residual = epilogue == "silu_mul", epilogue == "residual"
    rows = 2 * n if silu else n
    heads = batch or 1
    cfg = config or default_config(rows=rows, k=k, items=heads, epilogue=epilogue, target=target)
    _check(rows, k, cfg, silu=silu, dtype=dtype)
    out_dtype = out_dtype or dtype
    run, nwarp = _body(k=k, cfg=cfg, slots=1, dtype=dtype, silu=silu)
    TL, NT = cfg.tiles, 32 * nwarp
    n_blk = -(-rows // (16 * TL))
    lead = () if batch is None else (_i64(batch),)
    x_shape, w_shape, y_shape = (m, *lead, k), (*lead, _i64(rows), _i64(k)), (m, *lead, n)

    def at(tok, hd, col):  # index of an [m, (b,) cols] activation
        return (tok, col) if batch is None else (tok, hd, col)

    @T.macro
    def store(ctx, tok, r, v):
        y, r_buf, bx, hd = T.meta_var(ctx)
        col = T.meta_var(out_col(bx, r, tiles=TL, silu=silu))
        if col < n:
            if residual:
                y[at(tok, hd, col)] = T.Cast(
                    out_dtype, v + T.Cast("float32", r_buf[at(tok, hd, col)])
                )
            else:
                y[at(tok, hd, col)] = T.Cast(out_dtype, v)

    @T.macro
    def block(x, w, r_buf, y):
        bx = T.launch_thread("blockIdx.x", n_blk)
        hd = T.launch_thread("blockIdx.y", heads)
        tid = T.launch_thread("threadIdx.x", NT)
        wvec = T.meta_var(
            _wvec(w, lead=None if batch is None else hd, bx=bx, rows=rows, tiles=TL, silu=silu)
        )
        xvec = T.meta_var(lambda tok, kk: x[at(tok, hd, T.ramp(kk, 1, 8))])
        run(tid, wvec, xvec, m, tid // 32, T.float32(1), store, (y, r_buf, bx, hd))

    if residual:

        @T.prim_func
        def kernel(
            x: T.Buffer(x_shape, dtype),
            w: T.Buffer(w_shape, dtype),
            r_buf: T.Buffer(y_shape, dtype),
            y: T.Buffer(y_shape, out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            block(x, w, r_buf, y)

    else:

        @T.prim_func
        def kernel(
            x: T.Buffer(x_shape, dtype),
            w: T.Buffer(w_shape, dtype),
            y: T.Buffer(y_shape, out_dtype),
        ):
            T.func_attr({"tirx.noalias": True})
            block(x, w, None, y)

    return kernel


def moe_gate_up(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: GemvMmaConfig | None = None,
) -> tirx.PrimFunc:
    """``moe_gemv.moe_gate_up_gemv`` on tensor cores: ``(x [T, D], ids [T, k] int32,
    gate_up [E, 2I, D] interleaved, h [T*k, I])``, ``h[t*k + j] = silu(x[t] Wg^T) * (x[t] Wu^T)``
    of expert ``ids[t, j]``. Block = (64 weight rows = 32 outputs, entry ``t*k + j``); the
    token is the one B column."""
    rows, d = 2 * inter, hidden
    cfg = config or default_config(rows=rows, k=d, items=top_k, epilogue="silu_mul", target=target)
    _check(rows, d, cfg, silu=True, dtype=dtype)
    run, nwarp = _body(k=d, cfg=cfg, slots=1, dtype=dtype, silu=True)
    TL, NT, n_blk = cfg.tiles, 32 * nwarp, rows // (16 * cfg.tiles)
    t_num = tirx.Var("t", "int64")

    @T.macro
    def store(ctx, tok, r, v):
        h, ent, bx = T.meta_var(ctx)
        h[ent, out_col(bx, r, tiles=TL, silu=True)] = T.Cast(dtype, v)

    @T.prim_func
    def gate_up(
        x: T.Buffer((t_num, d), dtype),
        ids: T.Buffer((t_num, top_k), "int32"),
        w: T.Buffer((_i64(num_experts), _i64(rows), _i64(d)), dtype),  # > 2^31 elements
        h: T.Buffer((t_num * top_k, inter), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        bx = T.launch_thread("blockIdx.x", n_blk)
        ent = T.launch_thread("blockIdx.y", t_num * top_k)
        tid = T.launch_thread("threadIdx.x", NT)
        e = T.meta_var(ids[ent // top_k, ent % top_k])
        wvec = T.meta_var(_wvec(w, lead=e, bx=bx, rows=rows, tiles=TL, silu=True))
        xvec = T.meta_var(lambda tok, kk: x[ent // top_k, T.ramp(kk, 1, 8)])
        run(tid, wvec, xvec, 1, tid // 32, T.float32(1), store, (h, ent, bx))

    return gate_up.with_attr("global_symbol", f"moe_gate_up_gemv_e{num_experts}_d{d}_i{inter}")


def moe_down(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: GemvMmaConfig | None = None,
) -> tirx.PrimFunc:
    """``moe_gemv.moe_down_gemv`` on tensor cores: ``(h [T*k, I], ids [T, k] int32,
    down [E, D, I], weights [T, k] f32, out [T, D])``,
    ``out[t] = sum_j weights[t, j] * (h[t*k + j] @ down[ids[t, j]]^T)``. Block = (16 output
    rows, token); warp group ``j`` reads slot ``j``'s expert and scales its tile by the routing
    weight before the block sum."""
    d, n_in = hidden, inter
    cfg = config or default_config(rows=d, k=n_in, items=1, target=target, slots=top_k)
    _check(d, n_in, cfg, silu=False, dtype=dtype)
    run, nwarp = _body(k=n_in, cfg=cfg, slots=top_k, dtype=dtype, silu=False)
    TL, WK, NT = cfg.tiles, cfg.warps, 32 * nwarp
    n_blk = -(-d // (16 * TL))
    t_num = tirx.Var("t", "int64")

    @T.macro
    def store(ctx, tok, r, v):
        out, t, bx = T.meta_var(ctx)
        col = T.meta_var(out_col(bx, r, tiles=TL, silu=False))
        if col < d:
            out[t, col] = T.Cast(dtype, v)

    @T.prim_func
    def down(
        h: T.Buffer((t_num * top_k, n_in), dtype),
        ids: T.Buffer((t_num, top_k), "int32"),
        w: T.Buffer((_i64(num_experts), _i64(d), _i64(n_in)), dtype),
        weights: T.Buffer((t_num, top_k), "float32"),
        out: T.Buffer((t_num, d), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        bx = T.launch_thread("blockIdx.x", n_blk)
        t = T.launch_thread("blockIdx.y", t_num)
        tid = T.launch_thread("threadIdx.x", NT)
        j = T.meta_var(slot_of(tid // 32, warps=WK))
        wvec = T.meta_var(_wvec(w, lead=ids[t, j], bx=bx, rows=d, tiles=TL, silu=False))
        xvec = T.meta_var(lambda tok, kk: h[t * top_k + j, T.ramp(kk, 1, 8)])
        ks = T.meta_var(kwarp_of(tid // 32, warps=WK))
        run(tid, wvec, xvec, 1, ks, weights[t, j], store, (out, t, bx))

    return down.with_attr("global_symbol", f"moe_down_gemv_e{num_experts}_d{d}_i{n_in}")
