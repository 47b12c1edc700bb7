"""Warpgroup tensor-core GEMM for sm_90a: ``Y[M, n] = epilogue(X[M, k] @ W[N_w, k]^T)``.

Hand-written TIR (a schedule cannot express wgmma): one thread block owns a ``block_m x block_n``
tile of the accumulator; its ``block_m / 64`` warpgroups own 64 rows each and issue
``wgmma.mma_async m64n{block_n}k16`` (f16/bf16 in, f32 accumulate) with both operands read from
shared memory by descriptor. Operand tiles stream through a ``stages``-deep ``cp.async`` ring
(one commit group per ``block_k`` step), stored unpadded in core-matrix order (8 rows x 16 B
per 128-byte core matrix; consecutive threads fill consecutive 16-byte chunks, so the shared
stores are conflict-free). Rows past ``M`` (or past ``N_w``) are clamped to the last row: finite
data that the predicated stores never write back.

Per step: wait for the step's copies, barrier, issue the copy of step ``kt + lead`` into the
slot whose wgmmas are known complete, then the ``block_k / 16`` wgmmas of step ``kt``. Without
``overlap`` they are waited for at once (``lead = stages - 1``: the slot of step ``kt - 1``);
with it one group stays in flight across the next barrier (``lead = stages - 2``: the slot of
step ``kt - 2``, whose wgmmas every warpgroup waited for before that barrier).

The accumulators have the mma.sync per-warp layout (warp ``w`` of a warpgroup holds rows
``16w .. 16w+15``; lane ``4g + c`` holds columns ``8j + 2c, 8j + 2c + 1`` of rows ``g, g + 8``
for each 8-column chunk ``j``), so the epilogues work straight from registers: ``residual``
adds R; ``silu_mul`` pairs gate chunk ``j`` with up chunk ``j + 4`` of the same thread (weight
rows interleaved in groups of 32: ``gemm.transform_weight``); ``out_dtype="float32"`` keeps the
f32 accumulators (router logits).

Grouped MoE kernels (``moe_grouped``) skip padding: a row block holds its expert's routed rows
first, then -1 rows, so a warpgroup whose first row is padding holds only padding and issues no
wgmma (its fence / mma / commit / wait sit under one warpgroup-uniform branch; the barriers,
cp.async copies and waits stay on every thread), and no padding row is stored. Padding rows of
H are thus left unwritten; the down kernel still copies them into shared memory, where only a
skipped warpgroup's rows or a padding row of a live one (never stored) read them: an
accumulator row depends on its own A row only.
"""

# ruff: noqa: F821, F841

from __future__ import annotations

import dataclasses

import tvm
from tvm.script import tirx as T

from .target import gpu_spec
from .wgmma import mma_async, pin

EPILOGUES = (None, "residual", "silu_mul")
SWIGLU_GROUP = 32  # = gemm.SWIGLU_GROUP (gate/up rows interleave in groups of this many rows)


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """Block tile ``block_m x block_n x block_k`` (``block_m / 64`` warpgroups), ring depth."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    stages: int = 4
    overlap: bool = False  # keep one wgmma group in flight while the next step starts
    swizzle: bool = True  # 128-byte swizzled rows (block_k = 64) instead of core-matrix tiles

    @property
    def lead(self) -> int:
        """Steps the copies run ahead of the MMAs: a slot is refilled once no wgmma reads it."""
        return self.stages - 2 if self.overlap else self.stages - 1

    @property
    def warpgroups(self) -> int:
        return self.block_m // 64

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups

    @property
    def stage_halfs(self) -> int:
        return (self.block_m + self.block_n) * self.block_k

    def shared_bytes(self) -> int:
        return self.stages * self.stage_halfs * 2


# the tuning space: swizzled tiles with one wgmma group in flight, the fastest at every V2-Lite
# shape (benchmarks/NOTES_gemm.md); one config without the overlap for reference
CONFIGS = (
    WgmmaConfig(128, 256, 64, 4, overlap=True),
    WgmmaConfig(256, 128, 64, 4, overlap=True),
    WgmmaConfig(128, 128, 64, 5, overlap=True),
    WgmmaConfig(64, 256, 64, 4, overlap=True),
    WgmmaConfig(128, 256, 64, 4),
)


def keep(config: WgmmaConfig, target: tvm.target.Target, *, k: int | None = None) -> bool:
    """Whether ``config`` is a valid wgmma tile on ``target`` (and divides ``k`` if given)."""
    spec = gpu_spec(target)
    c = config
    chunks_a, chunks_b = c.block_m * c.block_k // 8, c.block_n * c.block_k // 8
    return (
        spec.has_wgmma
        and c.block_m % 64 == 0
        and c.block_n % 64 == 0
        and 64 <= c.block_n <= 256
        and c.block_k % 16 == 0
        and (not c.swizzle or c.block_k == 64)  # one 128-byte swizzle atom per row
        and c.stages >= (3 if c.overlap else 2)
        and chunks_a % c.threads == 0
        and chunks_b % c.threads == 0
        and c.block_n // 2 <= 128  # f32 accumulator registers per thread
        and c.shared_bytes() <= spec.max_shared_bytes_per_block
        and (k is None or k % c.block_k == 0)
    )


def applies(n: int, k: int, *, target, config: WgmmaConfig | None = None) -> bool:
    """Whether the wgmma GEMM serves this shape on ``target`` (else use ``gemm.gemm``)."""
    cfg = config or WgmmaConfig()
    return keep(cfg, target, k=k) and n % 8 == 0


MOE_CONFIG = WgmmaConfig(128, 256, 64, 4, overlap=True)  # the fastest grouped tile at T=2048


def moe_config(target, *, hidden: int, inter: int) -> WgmmaConfig | None:
    """The grouped-GEMM wgmma config for experts ``[2I, D]`` / ``[D, I]`` on ``target``, or None
    where wgmma does not apply (no sm_90a, K not a multiple of 64, I not a multiple of 32)."""
    return MOE_CONFIG if moe_fits(MOE_CONFIG, target, hidden=hidden, inter=inter) else None


def moe_fits(config: WgmmaConfig, target, *, hidden: int, inter: int) -> bool:
    """Whether ``config`` serves both grouped GEMMs (K = D for gate+up, K = I for down; SiLU·up
    pairs 32-row gate/up groups inside one block_n)."""
    tgt = _as_target(target)
    return (
        keep(config, tgt, k=hidden)
        and keep(config, tgt, k=inter)
        and inter % SWIGLU_GROUP == 0
        and hidden % 8 == 0
        and config.block_n % (2 * SWIGLU_GROUP) == 0
    )


def _chunk_row(C, c):
    """Tile row of the ``c``-th 16-byte chunk a step copies (threads take consecutive chunks)."""
    if C.swizzle:
        return c // 8
    return c // 8 // (C.block_k // 8) * 8 + c % 8


@T.macro(hygienic=False)
def _load_step(C, src, base, src_rows, row0, n_chunks, step, slot, dst0, kk, gather):
    # cp.async one operand's block_k slice of tile rows into ring slot `slot`. Tile row r reads
    # source row row0 + r clamped to src_rows - 1, or (gather) the row this thread's chunk i
    # holds in `arow[i]` (fixed across steps, looked up once).
    for i in T.unroll(n_chunks // C.threads):
        c = tx + i * C.threads
        r = _chunk_row(C, c)
        if C.swizzle:  # row-major 128-byte rows, 16-byte chunk cc stored at cc ^ (r % 8)
            cc = c % 8
            off = r * 64 + T.bitwise_xor(cc, r % 8) * 8
        else:  # core matrices: 8 rows of one chunk column, 128 contiguous bytes
            cc = c // 8 % (C.block_k // 8)
            off = (r // 8 * (C.block_k // 8) + cc) * 64 + r % 8 * 8
        if gather:
            row = arow[i]
        else:
            row = T.min(row0 + r, src_rows - 1)
        T.ptx["cp.async.cg.shared.global"](
            smem.ptr_to([slot * C.stage_halfs + dst0 + off]),
            src.ptr_to([base + T.Cast("int64", row) * kk + step * C.block_k + cc * 8]),
            16,
        )


@dataclasses.dataclass(frozen=True)
class _Epilogue:
    """The static switches of a kernel's stores (``_store``)."""

    n: int  # output columns
    out_dtype: str
    top_k: int
    skip: bool  # padding rows (sorted_rows < 0) are not stored
    scaled: bool  # rows scaled by their routing weight (MoE down)
    silu: bool  # silu(gate) * up of paired accumulator chunks
    residual: bool  # plus R


@T.macro(hygienic=False)
def _store(C, E):
    # The accumulators to Y: this thread's rows g and g + 8 of its warp's 16, two adjacent
    # columns per 8-column chunk. Reads the kernel body's locals (acc, m0, n0, wg, lane, ...).
    for h in T.unroll(2):
        row = m0 + wg * 64 + warp * 16 + lane // 4 + h * 8
        if E.skip:  # padding rows are not written (nothing reads them)
            row_ok[0] = T.Cast("int32", sorted_rows[row] >= 0)
        else:
            row_ok[0] = T.Cast("int32", row < n_rows)
        if row_ok[0] != 0:
            scale[0] = T.float32(1)
            if E.scaled:
                sr = sorted_rows[row]
                scale[0] = T.if_then_else(
                    sr >= 0,
                    weights[T.max(sr, 0) // E.top_k, T.max(sr, 0) % E.top_k],
                    T.float32(0),
                )
            if E.silu:
                for j in T.unroll(C.block_n // 8):
                    if j % 8 < 4:
                        col = n0 // 2 + j // 8 * 32 + j % 8 * 8 + lane % 4 * 2
                        if col < E.n:
                            for c in T.vectorized(2):
                                yf[T.Cast("int64", row) * E.n + col + c] = T.Cast(
                                    E.out_dtype,
                                    acc[j * 4 + h * 2 + c]
                                    * T.sigmoid(acc[j * 4 + h * 2 + c])
                                    * acc[(j + 4) * 4 + h * 2 + c],
                                )
            else:
                for j in T.unroll(C.block_n // 8):
                    col = n0 + j * 8 + lane % 4 * 2
                    if col < E.n:
                        for c in T.vectorized(2):
                            if E.residual:
                                yf[T.Cast("int64", row) * E.n + col + c] = T.Cast(
                                    E.out_dtype,
                                    acc[j * 4 + h * 2 + c]
                                    + T.Cast("float32", rf[T.Cast("int64", row) * E.n + col + c]),
                                )
                            else:
                                yf[T.Cast("int64", row) * E.n + col + c] = T.Cast(
                                    E.out_dtype, acc[j * 4 + h * 2 + c] * scale[0]
                                )


def _check(C: WgmmaConfig, n: int, k: int, *, target, silu: bool) -> None:
    if target is not None and not keep(C, _as_target(target), k=k):
        raise ValueError(f"wgmma config {C} does not fit {target} with k={k}")
    if k % C.block_k or n % 8:
        raise ValueError(f"wgmma GEMM needs k % {C.block_k} == 0 and n % 8 == 0, got {n=} {k=}")
    if silu and (n % SWIGLU_GROUP or C.block_n % (2 * SWIGLU_GROUP)):
        raise ValueError("silu_mul needs n % 32 == 0 and block_n % 64 == 0")


def _body(
    C: WgmmaConfig,
    *,
    kind: str,
    n: int,
    k: int,
    dtype,
    out_dtype,
    epilogue,
    top_k,
    rows,
    skip_padding: bool = False,
):
    """The kernel body as a macro ``body(xf, wf, rf, yf, sorted_rows, block_expert, weights)``.

    ``kind``: "dense" (A rows ``m0 + r``, clamped to ``rows``), "gate_up" (A rows gathered:
    ``sorted_rows[m0 + r] // top_k``; expert ``block_expert[by]`` picks the weight), "down" (A
    rows ``m0 + r`` of H; output rows scaled by their routing weight). Grouped kinds exit at
    once on blocks without an expert (``block_expert < 0``).

    ``skip_padding`` (grouped kinds only): a warpgroup whose 64 rows are all padding issues no
    wgmma (every barrier and cp.async still runs on all threads), and padding rows are not
    stored. Valid rows come first in a block, so the warpgroup's first row decides.
    """
    grouped = kind != "dense"
    skip = grouped and skip_padding
    skip_mma = skip and C.warpgroups > 1  # a used block's first warpgroup has a routed row
    nw = 2 * n if epilogue == "silu_mul" else n
    steps = k // C.block_k
    n_tiles = (nw + C.block_n - 1) // C.block_n
    acc_n = C.block_n // 2
    a_chunks, b_chunks = C.block_m * C.block_k // 8, C.block_n * C.block_k // 8
    b_off = C.block_m * C.block_k
    # descriptors (16-byte units): 128B swizzle: 8-row atoms 1024 B apart, k16 steps 32 B apart;
    # core matrices: LBO 128 B along K, SBO one 8-row group (block_k * 16 B), k16 steps 256 B
    lbo, sbo, mode, k_step = (1, 64, 3, 2) if C.swizzle else (8, C.block_k, 0, 16)
    gather = kind == "gate_up"
    E = _Epilogue(
        n=n,
        out_dtype=out_dtype,
        top_k=top_k,
        skip=skip,
        scaled=kind == "down",
        silu=epilogue == "silu_mul",
        residual=epilogue == "residual",
    )

    @T.macro(hygienic=True)
    def mma_step(acc, desc):
        # one block_k step of wgmmas on the slot `desc` points at, committed as one group
        T.ptx["wgmma.fence.sync.aligned"]()
        for kk in T.unroll(C.block_k // 16):
            mma_async(
                C.block_n,
                acc,
                desc[0] + T.uint64(kk * k_step),
                desc[1] + T.uint64(kk * k_step),
                dtype=dtype,
            )
        T.ptx["wgmma.commit_group.sync.aligned"]()
        T.ptx["wgmma.wait_group.sync.aligned"](1 if C.overlap else 0)

    @T.macro(hygienic=True)
    def body(xf, wf, rf, yf, sorted_rows, block_expert, weights):
        bx = T.launch_thread("blockIdx.x", n_tiles)
        by = T.launch_thread("blockIdx.y", T.Cast("int32", (rows + C.block_m - 1) // C.block_m))
        tx = T.launch_thread("threadIdx.x", C.threads)
        smem = T.alloc_buffer((C.stages * C.stage_halfs,), dtype, scope="shared.dyn")
        arow = T.alloc_buffer((a_chunks // C.threads,), "int32", scope="local")  # gathered rows
        acc = T.alloc_buffer((acc_n,), "float32", scope="local")
        desc = T.alloc_buffer((2,), "uint64", scope="local")
        wsel = T.alloc_buffer((1,), "int64", scope="local")  # first element of the expert's W
        scale = T.alloc_buffer((1,), "float32", scope="local")  # output row scale (routing weight)
        live = T.alloc_buffer((1,), "int32", scope="local")  # this warpgroup has a routed row
        row_ok = T.alloc_buffer((1,), "int32", scope="local")  # this thread's output row is stored
        wg = tx // 128
        warp = tx // 32 % 4
        lane = tx % 32
        m0 = by * C.block_m
        n0 = bx * C.block_n
        n_rows = T.Cast("int32", rows)
        wsel[0] = T.int64(0)
        if grouped:
            if block_expert[by] < 0:  # unused row blocks (all at the end) exit
                T.evaluate(T.thread_return())
            wsel[0] = T.Cast("int64", block_expert[by]) * nw * k
        if skip_mma:  # padding rows come last in a block: the warpgroup's first row decides
            live[0] = T.Cast("int32", sorted_rows[m0 + wg * 64] >= 0)
        if gather:  # the token row of each A chunk this thread copies (same r every step)
            for i in T.unroll(a_chunks // C.threads):
                arow[i] = T.max(sorted_rows[m0 + _chunk_row(C, tx + i * C.threads)], 0) // top_k
        for i in T.unroll(acc_n):
            acc[i] = T.float32(0)
        for s in T.unroll(C.lead):
            if s < steps:
                _load_step(C, xf, T.int64(0), n_rows, m0, a_chunks, s, s, 0, k, gather)
                _load_step(C, wf, wsel[0], nw, n0, b_chunks, s, s, b_off, k, False)
            T.ptx["cp.async.commit_group"]()
        for kt in T.serial(steps):
            T.ptx["cp.async.wait_group"](C.lead - 1)
            T.ptx["fence.proxy.async.shared::cta"]()  # cp.async data -> wgmma reads
            T.tvm_storage_sync("shared")
            if kt + C.lead < steps:
                nxt = kt + C.lead
                _load_step(
                    C, xf, T.int64(0), n_rows, m0, a_chunks, nxt, nxt % C.stages, 0, k, gather
                )
                _load_step(C, wf, wsel[0], nw, n0, b_chunks, nxt, nxt % C.stages, b_off, k, False)
            T.ptx["cp.async.commit_group"]()
            T.cuda.wgmma.encode_matrix_descriptor(
                T.address_of(desc[0]),
                smem.ptr_to([kt % C.stages * C.stage_halfs + wg * 64 * C.block_k]),
                lbo,
                sbo,
                mode,
            )
            T.cuda.wgmma.encode_matrix_descriptor(
                T.address_of(desc[1]),
                smem.ptr_to([kt % C.stages * C.stage_halfs + b_off]),
                lbo,
                sbo,
                mode,
            )
            pin(acc, acc_n)
            if skip_mma:
                if live[0] != 0:  # warpgroup-uniform: no wgmma on an all-padding warpgroup
                    mma_step(acc, desc)
            else:
                mma_step(acc, desc)
            pin(acc, acc_n)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        pin(acc, acc_n)
        T.ptx["cp.async.wait_group"](0)
        _store(C, E)

    return body


def wgmma_gemm(
    m,
    n: int,
    k: int,
    *,
    dtype: str = "float16",
    target=None,
    config: WgmmaConfig | None = None,
    epilogue: str | None = None,
    out_dtype: str | None = None,
) -> tvm.tirx.PrimFunc:
    """``(x [M, k], w [N_w, k], [r [M, n],] y [M, n])``; ``m`` is an int or None (symbolic).

    ``N_w = 2n`` for ``silu_mul`` (weight in ``gemm.transform_weight`` layout), else ``n``.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}: use one of {EPILOGUES}")
    C = config or WgmmaConfig()
    _check(C, n, k, target=target, silu=epilogue == "silu_mul")
    out_dtype = out_dtype or dtype
    nw = 2 * n if epilogue == "silu_mul" else n
    mm = tvm.tirx.Var("m", "int64") if m is None else tvm.tirx.IntImm("int64", m)
    body = _body(
        C,
        kind="dense",
        n=n,
        k=k,
        dtype=dtype,
        out_dtype=out_dtype,
        epilogue=epilogue,
        top_k=1,
        rows=mm,
    )

    if epilogue == "residual":

        @T.prim_func
        def func(x_h: T.handle, w_h: T.handle, r_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True})
            x = T.match_buffer(x_h, (mm, k), dtype)  # [M, K]
            w = T.match_buffer(w_h, (nw, k), dtype)  # [N, K]
            r = T.match_buffer(r_h, (mm, n), dtype)  # [M, N]
            y = T.match_buffer(y_h, (mm, n), out_dtype)  # [M, N]
            xf = T.decl_buffer((mm * k,), dtype, data=x.data)
            wf = T.decl_buffer((nw * k,), dtype, data=w.data)
            rf = T.decl_buffer((mm * n,), dtype, data=r.data)
            yf = T.decl_buffer((mm * n,), out_dtype, data=y.data)
            body(xf, wf, rf, yf, yf, yf, yf)

    else:

        @T.prim_func
        def func(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True})
            x = T.match_buffer(x_h, (mm, k), dtype)  # [M, K]
            w = T.match_buffer(w_h, (nw, k), dtype)  # [N_w, K]
            y = T.match_buffer(y_h, (mm, n), out_dtype)  # [M, N]
            xf = T.decl_buffer((mm * k,), dtype, data=x.data)
            wf = T.decl_buffer((nw * k,), dtype, data=w.data)
            yf = T.decl_buffer((mm * n,), out_dtype, data=y.data)
            body(xf, wf, yf, yf, yf, yf, yf)

    name = f"gemm_wgmma_n{n}_k{k}" + (f"_{epilogue}" if epilogue else "")
    return func.with_attr("global_symbol", name)


def moe_grouped(
    kind: str,
    hidden: int,
    inter: int,
    *,
    num_experts: int,
    top_k: int,
    dtype: str = "float16",
    target=None,
    config: WgmmaConfig | None = None,
    skip_padding: bool = True,
) -> tvm.tirx.PrimFunc:
    """The fused-MoE grouped GEMMs of ``schedules.moe`` on wgmma, same signatures:

    - "gate_up": ``(x [T, D], sorted_rows [NB*BM], block_expert [NB], gate_up [E, 2I, D]
      interleaved, h [NB*BM, I])``: ``h = silu(gate) * up`` of the gathered token rows;
    - "down": ``(h, sorted_rows, block_expert, down [E, D, I], weights [T, k] f32,
      y [NB*BM, D])``: ``y[r] = routing weight of row r * (h[r] @ down[e]^T)``.

    ``BM = config.block_m`` must be the row-block size ``moe_align`` grouped the tokens with.
    ``skip_padding``: warpgroups of padding rows issue no wgmma and padding rows (``sorted_rows``
    -1) of h and y are left unwritten (``moe_combine`` reads only routed rows); without it they
    are computed, and y is 0 there.
    """
    C = config or WgmmaConfig(128, 128, 64, 5, overlap=True)
    if kind not in ("gate_up", "down"):
        raise ValueError(f"unknown grouped GEMM {kind!r}: use gate_up or down")
    gate_up = kind == "gate_up"
    n, k = (inter, hidden) if gate_up else (hidden, inter)
    _check(C, n, k, target=target, silu=gate_up)
    nw = 2 * n if gate_up else n
    nb = tvm.tirx.Var("nb", "int64")
    t_num = tvm.tirx.Var("t", "int64")
    bm = C.block_m
    body = _body(
        C,
        kind=kind,
        n=n,
        k=k,
        dtype=dtype,
        out_dtype=dtype,
        epilogue="silu_mul" if gate_up else None,
        top_k=top_k,
        rows=nb * bm,
        skip_padding=skip_padding,
    )
    e_num = num_experts

    if gate_up:

        @T.prim_func
        def func(x_h: T.handle, sr_h: T.handle, be_h: T.handle, w_h: T.handle, h_h: T.handle):
            T.func_attr({"tir.noalias": True})
            x = T.match_buffer(x_h, (t_num, hidden), dtype)  # [T, D]
            sorted_rows = T.match_buffer(sr_h, (nb * bm,), "int32")
            block_expert = T.match_buffer(be_h, (nb,), "int32")
            w = T.match_buffer(w_h, (e_num, nw, k), dtype)  # [E, 2I, D]
            h = T.match_buffer(h_h, (nb * bm, n), dtype)  # [NB*BM, I]
            xf = T.decl_buffer((t_num * hidden,), dtype, data=x.data)
            wf = T.decl_buffer((e_num * nw * k,), dtype, data=w.data)
            hf = T.decl_buffer((nb * bm * n,), dtype, data=h.data)
            body(xf, wf, hf, hf, sorted_rows, block_expert, sorted_rows)

    else:

        @T.prim_func
        def func(
            h_h: T.handle,
            sr_h: T.handle,
            be_h: T.handle,
            w_h: T.handle,
            wt_h: T.handle,
            y_h: T.handle,
        ):
            T.func_attr({"tir.noalias": True})
            h = T.match_buffer(h_h, (nb * bm, inter), dtype)  # [NB*BM, I]
            sorted_rows = T.match_buffer(sr_h, (nb * bm,), "int32")
            block_expert = T.match_buffer(be_h, (nb,), "int32")
            w = T.match_buffer(w_h, (e_num, n, k), dtype)  # [E, D, I]
            weights = T.match_buffer(wt_h, (t_num, top_k), "float32")  # [T, k]
            y = T.match_buffer(y_h, (nb * bm, n), dtype)  # [NB*BM, D]
            hf = T.decl_buffer((nb * bm * inter,), dtype, data=h.data)
            wf = T.decl_buffer((e_num * n * k,), dtype, data=w.data)
            yf = T.decl_buffer((nb * bm * n,), dtype, data=y.data)
            body(hf, wf, yf, yf, sorted_rows, block_expert, weights)

    name = f"moe_{kind}_wgmma_e{num_experts}_d{hidden}_i{inter}"
    return func.with_attr("global_symbol", name)


def _as_target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
