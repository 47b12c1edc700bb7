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

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .target import gpu_spec

MAX_TOKENS = 8  # the mma's N
GROUP = 32  # = gemm.SWIGLU_GROUP (gate/up rows interleave in groups of this many rows)
_MMA_TYPE = {"float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Config:
    """``tiles`` 16-row mma tiles per block (all warps share them), ``warps`` warps along K,
    ``unroll`` 32-wide k steps loaded before their mmas."""

    tiles: int = 1
    warps: int = 4
    unroll: int = 4


def default_config(
    *, rows: int, k: int, items: int, epilogue=None, target=None, slots: int = 1
) -> Config:
    """Measured on the H100 (``benchmarks/sweep_gemv.py``, every V2-Lite decode product): many
    K-warps with a short unroll beat deep unrolls - 16 warps (``slots`` x warps <= 24 for the
    MoE down GEMV), 32 for SiLU·up (2 tiles: 16 gate + 16 up rows) and for grids of more than
    8 blocks per SM, each warp with at least one full unroll of 2 k steps.
    ``items``: blocks along the grid's second axis; ``slots``: warp groups per block."""
    silu = epilogue == "silu_mul"
    tiles, unroll = (2 if silu else 1), 2
    sms = gpu_spec(target).sm_count if target is not None else 132
    blocks = -(-rows // (16 * tiles)) * items
    cap = 32 if silu or blocks >= 8 * sms else 16
    steps, warps = -(-k // 32), 1
    while 2 * warps <= cap and 2 * warps * slots <= max(24, cap) and 2 * warps * unroll <= steps:
        warps *= 2
    return Config(tiles=tiles, warps=warps, unroll=unroll)


def candidates(*, rows: int, k: int, epilogue=None, slots: int = 1) -> list[Config]:
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
                    out.append(Config(tiles=tiles, warps=warps, unroll=unroll))
    return out


def applies(m, k: int, *, dtype: str) -> bool:
    """Static 1..8 tokens, 16-byte rows, f16/bf16: the shapes this kernel serves."""
    return isinstance(m, int) and 1 <= m <= MAX_TOKENS and k % 8 == 0 and dtype in _MMA_TYPE


def _body(*, k: int, cfg: Config, slots: int, dtype: str, silu: bool):
    """The per-block macros shared by every variant (``warp_dot``, ``to_shared``,
    ``reduce_store``) and the block's warp count. ``slots``: warp groups that each read their own
    weight matrix and activation (MoE down: the top-k slots)."""
    TL, U, WK = cfg.tiles, cfg.unroll, cfg.warps
    NWARP = WK * slots
    OUT_ROWS = TL * 8 if silu else TL * 16  # output rows per block (silu: gate tiles, then up)
    SUMS = 2 if silu else 1
    steps = -(-k // 32)
    spw = -(-steps // WK)  # k steps per warp
    NIT = -(-spw // U)
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
                kk = T.meta_var((ks * spw + it * U + u) * 32 + lane % 4 * 8)
                ok = T.meta_var(it * U + u < spw and kk < k)
                for t in T.unroll(TL):
                    for h in T.unroll(2):
                        if ok:
                            wa[T.ramp(((u * TL + t) * 2 + h) * 8, 1, 8)] = wvec(
                                t * 16 + h * 8 + lane // 4, kk
                            )
                        else:
                            wa[T.ramp(((u * TL + t) * 2 + h) * 8, 1, 8)] = zero8
                if ok and lane // 4 < n_tok:
                    xb[T.ramp(u * 8, 1, 8)] = xvec(lane // 4, kk)
                else:
                    xb[T.ramp(u * 8, 1, 8)] = zero8
            for u in T.unroll(U):
                for t in T.unroll(TL):
                    for q in T.unroll(2):
                        # fragments are copied (register moves after nvcc): a buffer only ever
                        # accessed as 8-wide vectors is stored as uint4, and an mma operand
                        # offset into it would count in uint4s
                        for p in T.unroll(4):  # B regs: 4 contiguous halves of the token vector
                            fa[8 + p] = xb[u * 8 + q * 4 + p]
                        for p in T.unroll(8):  # A regs: (g, 2c) (g+8, 2c) (g, 2c+8) (g+8, 2c+8)
                            fa[p] = wa[
                                ((u * TL + t) * 2 + p // 2 % 2) * 8 + q * 4 + p // 4 * 2 + p % 2
                            ]
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
                                8,
                                acc.data,
                                (t * 2 + q) * 4,
                                False,
                                dtype="float32",
                            )
                        )

    @T.macro
    def to_shared(red, acc, warp, lane, scale):
        """red[warp, row, token] = scale * (both chains of this warp's C fragments)."""
        for t in T.unroll(TL):
            for e in T.unroll(4):
                red[warp, t * 16 + lane // 4 + e // 2 * 8, lane % 4 * 2 + e % 2] = scale * (
                    acc[(t * 2) * 4 + e] + acc[(t * 2 + 1) * 4 + e]
                )

    @T.macro
    def reduce_store(red, tid, n_tok, store, ctx):
        """``store(ctx, n, r, value)`` for each token ``n`` and output row ``r`` of the block:
        the sum over warps; for ``silu_mul`` (first half of the rows gate, second half the
        matching up rows) ``silu(gate) * up``."""
        for i in T.unroll(-(-(OUT_ROWS * MAX_TOKENS) // (32 * NWARP))):
            idx = T.meta_var(i * 32 * NWARP + tid)
            if idx < OUT_ROWS * MAX_TOKENS and idx % MAX_TOKENS < n_tok:
                total = T.alloc_buffer((2,), "float32", scope="local")
                for s in T.unroll(SUMS):
                    total[s] = T.float32(0)
                    for wi in T.unroll(NWARP):
                        total[s] = (
                            total[s] + red[wi, idx // MAX_TOKENS + s * OUT_ROWS, idx % MAX_TOKENS]
                        )
                if silu:
                    store(
                        ctx,
                        idx % MAX_TOKENS,
                        idx // MAX_TOKENS,
                        T.sigmoid(total[0]) * total[0] * total[1],
                    )
                else:
                    store(ctx, idx % MAX_TOKENS, idx // MAX_TOKENS, total[0])

    return warp_dot, to_shared, reduce_store, NWARP


def _check(rows: int, k: int, cfg: Config, *, silu: bool, dtype: str) -> None:
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
    """The 8-wide weight vector of block ``bx``'s row ``r`` at column ``kk``; ``lead``: the
    expert / head index of a 3-D weight (None: 2-D); rows past the end re-read the last (never
    stored). SiLU·up: the block's first ``tiles / 2`` tiles are gate rows of its ``8 * tiles``
    outputs, the others the matching up rows (``GROUP`` rows later in the interleaved layout)."""

    def f(r, kk):
        if silu:
            out0 = bx * (8 * tiles)  # first output column of the block
            gate = out0 // GROUP * (2 * GROUP) + out0 % GROUP
            row = T.if_then_else(r < 8 * tiles, gate + r, gate + GROUP + r - 8 * tiles)
        else:
            row = T.min(bx * (16 * tiles) + r, rows - 1)
        return w[row, T.ramp(kk, 1, 8)] if lead is None else w[lead, row, T.ramp(kk, 1, 8)]

    return f


def dense(
    m: int,
    n: int,
    k: int,
    *,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: Config | None = None,
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
    warp_dot, to_shared, reduce_store, nwarp = _body(k=k, cfg=cfg, slots=1, dtype=dtype, silu=silu)
    TL, NT = cfg.tiles, 32 * nwarp
    n_blk = -(-rows // (16 * TL))
    out_blk = 8 * TL if silu else 16 * TL  # output columns per block
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    lead = () if batch is None else (i64(batch),)
    x_shape, w_shape, y_shape = (m, *lead, k), (*lead, i64(rows), i64(k)), (m, *lead, n)

    def at(tok, hd, col):  # index of an [m, (b,) cols] activation
        return (tok, col) if batch is None else (tok, hd, col)

    @T.macro
    def store(ctx, tok, r, v):
        y, r_buf, bx, hd = T.meta_var(ctx)
        if bx * out_blk + r < n:
            if residual:
                y[at(tok, hd, bx * out_blk + r)] = T.Cast(
                    out_dtype, v + T.Cast("float32", r_buf[at(tok, hd, bx * out_blk + r)])
                )
            else:
                y[at(tok, hd, bx * out_blk + r)] = T.Cast(out_dtype, v)

    @T.macro
    def block(x, w, r_buf, y):
        bx = T.launch_thread("blockIdx.x", n_blk)
        hd = T.launch_thread("blockIdx.y", heads)
        tid = T.launch_thread("threadIdx.x", NT)
        red = T.alloc_buffer((nwarp, TL * 16, MAX_TOKENS), "float32", scope="shared")
        acc = T.alloc_buffer((TL * 8,), "float32", scope="local")
        wa = T.alloc_buffer((cfg.unroll * TL * 16,), dtype, scope="local")
        xb = T.alloc_buffer((cfg.unroll * 8,), dtype, scope="local")
        fa = T.alloc_buffer((12,), dtype, scope="local")  # A, B fragments
        wvec = T.meta_var(
            _wvec(w, lead=None if batch is None else hd, bx=bx, rows=rows, tiles=TL, silu=silu)
        )
        warp_dot(
            acc,
            wa,
            xb,
            fa,
            wvec,
            lambda tok, kk: x[at(tok, hd, T.ramp(kk, 1, 8))],
            m,
            tid // 32,
            tid % 32,
        )
        to_shared(red, acc, tid // 32, tid % 32, T.float32(1))
        T.tvm_storage_sync("shared")
        reduce_store(red, tid, m, store, (y, r_buf, bx, hd))

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


def _i64(v: int):
    return tirx.IntImm("int64", v)


def moe_gate_up(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: Config | None = None,
) -> tirx.PrimFunc:
    """``moe_gemv.moe_gate_up_gemv`` on tensor cores: ``(x [T, D], ids [T, k] int32,
    gate_up [E, 2I, D] interleaved, h [T*k, I])``, ``h[t*k + j] = silu(x[t] Wg^T) * (x[t] Wu^T)``
    of expert ``ids[t, j]``. Block = (64 weight rows = 32 outputs, entry ``t*k + j``); the
    token is the one B column."""
    rows, d = 2 * inter, hidden
    cfg = config or default_config(rows=rows, k=d, items=top_k, epilogue="silu_mul", target=target)
    _check(rows, d, cfg, silu=True, dtype=dtype)
    warp_dot, to_shared, reduce_store, nwarp = _body(k=d, cfg=cfg, slots=1, dtype=dtype, silu=True)
    TL, NT, n_blk = cfg.tiles, 32 * nwarp, rows // (16 * cfg.tiles)
    out_blk = 8 * TL
    t_num = tirx.Var("t", "int64")

    @T.macro
    def store(ctx, tok, r, v):
        h, ent, bx = T.meta_var(ctx)
        h[ent, bx * out_blk + r] = T.Cast(dtype, v)

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
        red = T.alloc_buffer((nwarp, TL * 16, MAX_TOKENS), "float32", scope="shared")
        acc = T.alloc_buffer((TL * 8,), "float32", scope="local")
        wa = T.alloc_buffer((cfg.unroll * TL * 16,), dtype, scope="local")
        xb = T.alloc_buffer((cfg.unroll * 8,), dtype, scope="local")
        fa = T.alloc_buffer((12,), dtype, scope="local")  # A, B fragments
        e = T.meta_var(ids[ent // top_k, ent % top_k])
        wvec = T.meta_var(_wvec(w, lead=e, bx=bx, rows=rows, tiles=TL, silu=True))
        warp_dot(
            acc,
            wa,
            xb,
            fa,
            wvec,
            lambda tok, kk: x[ent // top_k, T.ramp(kk, 1, 8)],
            1,
            tid // 32,
            tid % 32,
        )
        to_shared(red, acc, tid // 32, tid % 32, T.float32(1))
        T.tvm_storage_sync("shared")
        reduce_store(red, tid, 1, store, (h, ent, bx))

    return gate_up.with_attr("global_symbol", f"moe_gate_up_gemv_e{num_experts}_d{d}_i{inter}")


def moe_down(
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target: tvm.target.Target,
    config: Config | None = None,
) -> tirx.PrimFunc:
    """``moe_gemv.moe_down_gemv`` on tensor cores: ``(h [T*k, I], ids [T, k] int32,
    down [E, D, I], weights [T, k] f32, out [T, D])``,
    ``out[t] = sum_j weights[t, j] * (h[t*k + j] @ down[ids[t, j]]^T)``. Block = (16 output
    rows, token); warp group ``j`` reads slot ``j``'s expert and scales its tile by the routing
    weight before the block sum."""
    d, n_in = hidden, inter
    cfg = config or default_config(rows=d, k=n_in, items=1, target=target, slots=top_k)
    _check(d, n_in, cfg, silu=False, dtype=dtype)
    warp_dot, to_shared, reduce_store, nwarp = _body(
        k=n_in, cfg=cfg, slots=top_k, dtype=dtype, silu=False
    )
    TL, WK, NT = cfg.tiles, cfg.warps, 32 * nwarp
    n_blk = -(-d // (16 * TL))
    t_num = tirx.Var("t", "int64")

    @T.macro
    def store(ctx, tok, r, v):
        out, t, bx = T.meta_var(ctx)
        if bx * 16 * TL + r < d:
            out[t, bx * 16 * TL + r] = T.Cast(dtype, v)

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
        red = T.alloc_buffer((nwarp, TL * 16, MAX_TOKENS), "float32", scope="shared")
        acc = T.alloc_buffer((TL * 8,), "float32", scope="local")
        wa = T.alloc_buffer((cfg.unroll * TL * 16,), dtype, scope="local")
        xb = T.alloc_buffer((cfg.unroll * 8,), dtype, scope="local")
        fa = T.alloc_buffer((12,), dtype, scope="local")  # A, B fragments
        j = T.meta_var(tid // 32 // WK)
        wvec = T.meta_var(_wvec(w, lead=ids[t, j], bx=bx, rows=d, tiles=TL, silu=False))
        warp_dot(
            acc,
            wa,
            xb,
            fa,
            wvec,
            lambda tok, kk: h[t * top_k + j, T.ramp(kk, 1, 8)],
            1,
            tid // 32 % WK,
            tid % 32,
        )
        to_shared(red, acc, tid // 32, tid % 32, weights[t, j])
        T.tvm_storage_sync("shared")
        reduce_store(red, tid, 1, store, (out, t, bx))

    return down.with_attr("global_symbol", f"moe_down_gemv_e{num_experts}_d{d}_i{n_in}")
