# The helper macros are TVMScript expanded inside `mma_body` (hygienic=False): they read its
# locals (tx, lane, smem, fragments, ...), which Python static analysis cannot see.
# ruff: noqa: F821, F841
"""CUDA tensor-core body of the prefill kernels: mma.sync (sm_80+) or wgmma (sm_90a).

One thread block owns ``tile_q`` consecutive query rows of one sequence (for absorbed MLA a row
is a (token, head) pair) and one head group (``blockIdx.x = tile * groups + group``, heaviest
causal tiles first). Its warps form a ``m_warps x d_split`` grid: warp ``(wm, wd)`` owns rows
``16*wm .. 16*wm+15`` and the V columns ``wd*dv_w .. (wd+1)*dv_w - 1`` (absorbed MLA: O is
16 x 512 f32 per slice, too big for one warp's registers). Per KV tile:

1. ``S = Q Kᵀ``: mma.sync ``m16n8k16`` on ``ldmatrix.x4`` fragments, or (``wgmma``) one
   ``wgmma m64nNk16`` per 16-deep step per warpgroup with Q and K read from shared memory by
   descriptor. With ``split_s`` the ``d_split`` warps of a row slice take ``1/d_split`` of S's
   columns each instead of all recomputing it.
2. Causal mask, online softmax in base 2 (row max and sum over the 4 lanes of a quad, and over
   the ``d_split`` warps through a small shared buffer when S is split).
3. ``O += P V``. Unsplit mma.sync keeps P in registers (the f32 accumulator layout of two
   adjacent 8-column S tiles is the f16 A-fragment layout of one k-step); otherwise P goes
   through shared memory. V is read with ``ldmatrix.x4.trans`` (or as an MN-major wgmma B
   operand) from the K rows themselves for absorbed MLA.

Hand-off (wgmma, unsplit S, two warpgroups splitting O's columns; the absorbed sm_90a default):
warpgroup 0 alone runs steps 1-2 and passes P (its A-fragment registers) and the rescale factors
to warpgroup 1 through shared memory and named barrier 1; warpgroup 1 issues the KV copies
meanwhile; both run step 3 with P from registers.

The wgmma accumulators have the mma.sync per-warp layout (warp ``w`` of a warpgroup holds rows
``16w..16w+15``), so masking, softmax and the epilogue are shared by both paths.

KV tiles stream through a ``stages``-deep ``cp.async`` ring (one commit group per tile); for
swizzled tiles each thread copies one 16-byte column chunk of whole rows, one clamped row address
and then constant offsets, with no per-chunk index arithmetic. Rows
past a sequence's end are clamped to its last row (finite data that the mask zeroes), so no
zero fill is needed. Query tiles are handed out latest first so the longest causal rows start
first.

With ``tma`` (decompressed, swizzled) one thread loads each KV tile as ``dk / 64 + dv / 64``
TMA boxes (``tkv`` rows x 64 columns of one head: TMA's 128-byte swizzle is the wgmma operand
layout) through two tensor maps that the kernel's host part encodes per call, completing on the
slot's mbarrier; rows past a sequence's end are the next sequence's (or TMA's zero fill past the
tensor), finite and masked. With ``producer`` an extra warp issues them, and the consumer warps
release each slot on a second mbarrier instead of meeting at a CTA barrier every tile; with
``setmaxnreg`` the producer is a whole warpgroup that gives its registers to the consumers.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .attention_prefill_tiles import PRODUCER_REGISTERS, consumer_registers
from .mma_sync import mma_f16
from .wgmma import mma_async, mma_async_rs, pin, store_before_wait

LOG2E = math.log2(math.e)
RESCALE_SLACK = 8.0  # lazy rescaling: P values up to 2^8 before normalisation (f16-safe)
LN2 = math.log(2.0)


def _chunk_offset(G, r, cc, stride, width, rows=0):
    """Shared offset (halfs) of the 16-byte chunk ``cc`` of tile row ``r``.

    mma.sync tiles are padded rows (``stride`` halfs apart). wgmma tiles are unpadded core
    matrices: 8 rows x 16 B stored as 128 contiguous bytes, core matrix (r // 8, cc) at
    ``((r // 8) * (width // 8) + cc) * 64``; their descriptors use LBO = 128 B between
    neighbours along the row and SBO = ``width * 16`` B between 8-row groups.
    With ``swizzle`` a tile of ``rows`` rows is stored as ``width / 64`` blocks of 64 columns;
    in a block row ``r`` takes 128 contiguous bytes whose 16-byte chunks are XOR-permuted by
    ``r % 8`` (wgmma's 128-byte swizzle; every tile starts 1024-byte aligned).
    """
    if G.swizzle:
        return cc // 8 * (rows * 64) + r * 64 + T.bitwise_xor(cc % 8, r % 8) * 8
    if G.wgmma:
        return ((r // 8) * (width // 8) + cc) * 64 + r % 8 * 8
    return r * stride + cc * 8


@T.macro(hygienic=False)
def _load_rows(G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, nt):
    # cp.async `n_rows x width` halfs; tile row r is source row first + min(start + r, last).
    # The last `nt` threads of the block issue the copies (all of them, or all but warpgroup 0).
    # Consecutive threads fill consecutive 16-byte chunks of shared memory (no bank conflicts):
    # row-major chunks for padded rows, core-matrix order (8 rows of one chunk column) for wgmma.
    # (Q, once per block: this general form keeps registers free for the KV loop)
    if tx >= G.threads - nt and tx < G.threads:  # (not the producer warp)
        for i in T.serial(G.iters(n_rows, width, nt)):
            c = tx - (G.threads - nt) + i * nt
            if c < n_rows * width // 8:
                if G.wgmma and not G.swizzle:
                    r = c // 8 // (width // 8) * 8 + c % 8
                    cc = c // 8 % (width // 8)
                else:
                    r = c // (width // 8)
                    cc = c % (width // 8)
                T.ptx["cp.async.cg.shared.global"](
                    smem.ptr_to([dst_off + _chunk_offset(G, r, cc, dst_stride, width, n_rows)]),
                    src.ptr_to(
                        [
                            base
                            + T.Cast("int64", (first + T.min(start + r, last)) * P.groups + g)
                            * stride
                            + cc * 8
                        ]
                    ),
                    16,
                )


@T.macro(hygienic=False)
def _load_rows_by_row(
    G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, nt
):
    # Thread t of the `nt` loaders copies chunk t % 8 of every 64-column block of the rows
    # t // 8 + j * nt / 8: one clamped source row per j, then one cp.async per block at a
    # constant offset from it (no per-chunk division); 8 threads fill 128 contiguous bytes of
    # a row (swizzled or padded: no bank conflicts).
    if tx >= G.threads - nt:
        lt = tx - (G.threads - nt)
        for j in T.unroll((n_rows + nt // 8 - 1) // (nt // 8)):
            r = T.meta_var(lt // 8 + j * (nt // 8))
            if n_rows % (nt // 8) == 0 or r < n_rows:  # no bound check when the rows divide
                _copy_row(
                    G,
                    P,
                    dst_off,
                    dst_stride,
                    width,
                    n_rows,
                    src,
                    base,
                    first,
                    start,
                    last,
                    stride,
                    r,
                    lt % 8,
                )


@T.macro(hygienic=False)
def _copy_row(
    G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, r, cc
):
    row = base + T.Cast("int64", (first + T.min(start + r, last)) * P.groups + g) * stride
    for blk in T.unroll(width // 64):
        T.ptx["cp.async.cg.shared.global"](
            smem.ptr_to([dst_off + _chunk_offset(G, r, blk * 8 + cc, dst_stride, width, n_rows)]),
            src.ptr_to([row + blk * 64 + cc * 8]),
            16,
        )


@T.macro(hygienic=False)
def _load_kv_rows(
    G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, nt
):
    if G.swizzle or not G.wgmma:  # the row-wise copy, but not into core-matrix tiles (conflicts)
        _load_rows_by_row(
            G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, nt
        )
    else:
        _load_rows(
            G, P, dst_off, dst_stride, width, n_rows, src, base, first, start, last, stride, nt
        )


@T.macro(hygienic=False)
def _load_kv(G, P, tile, stage):
    # KV tile `tile` into ring slot `stage`; rows past the sequence end repeat its last row
    # (cp.async) or are the next sequence's rows or zeros (TMA): finite, and masked.
    if G.tma:
        _tma_kv(G, P, tile, stage)
    else:
        _load_k(G, P, tile, stage)
        if not G.shared_kv:
            _load_v(G, P, tile, stage)


_TMA_COPY = "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"


def _full_bar(G, smem, stage):
    """The mbarrier of ring slot ``stage`` that its TMA loads complete."""
    return smem.ptr_to([G.bar_off + stage * 4])


def _empty_bar(G, smem, stage):
    """The mbarrier of ring slot ``stage`` that the consumer warps release it on."""
    return smem.ptr_to([G.bar_off + (G.stages + stage) * 4])


@T.macro(hygienic=False)
def _wait_full(G, it):
    # tile `it` landed: its slot's "full" mbarrier completed phase it // stages
    T.cuda.mbarrier_wait(_full_bar(G, smem, it % G.stages), it // G.stages % 2)


@T.macro(hygienic=False)
def _produce(G, P):
    # The producer warp's (warpgroup's) first lane: tile `it` goes into slot it % stages once
    # the consumer warps released that slot's previous tile (empty phase it // stages - 1).
    if G.setmaxnreg:  # (every warp of the warpgroup)
        T.ptx["setmaxnreg.dec.sync.aligned.u32"](PRODUCER_REGISTERS)
    if tx == G.threads:
        for it in T.serial(n_tiles):
            if it >= G.stages:
                T.cuda.mbarrier_wait(_empty_bar(G, smem, it % G.stages), (it // G.stages + 1) % 2)
            _tma_kv(G, P, it, it % G.stages)


@T.macro(hygienic=False)
def _consume(G, P):
    # Q (this block's cp.async copies) landed for every consumer warp, then per tile: wait for
    # its slot, S, softmax, P·V (waited), and release the slot (lane 0 of each warp).
    if G.setmaxnreg:  # the producer warpgroup's registers
        T.ptx["setmaxnreg.inc.sync.aligned.u32"](consumer_registers(G.warps))
    T.ptx["cp.async.commit_group"]()  # (wait_group waits for committed groups only)
    T.ptx["cp.async.wait_group"](0)
    T.ptx["fence.proxy.async.shared::cta"]()
    T.ptx["bar.sync"](1, G.threads)
    for it in T.serial(n_tiles):
        _wait_full(G, it)
        _tile_step(G, P, it % G.stages, it)
        if lane == 0:
            T.ptx.mbarrier.arrive.shared.b64(_empty_bar(G, smem, it % G.stages))
    _epilogue(G, P)


@T.macro(hygienic=False)
def _tma_kv(G, P, tile, stage):
    # Thread 0: the slot's expect-tx arrival, then one box of `tkv` rows x 64 columns per
    # swizzle block of K and of V (TMA's 128-byte swizzle is the wgmma operand layout).
    if tx == (G.threads if G.producer else 0):
        bar = T.meta_var(_full_bar(G, smem, stage))
        T.ptx.mbarrier.arrive.expect_tx.shared.b64(bar, T.uint32(G.tkv * (G.dk + G.dv) * 2))
        for blk in T.unroll(G.dk // 64):
            k_dst = T.meta_var(smem.ptr_to([G.k_off + stage * G.stage_halfs + blk * G.tkv * 64]))
            T.evaluate(
                T.ptx[_TMA_COPY](k_dst, T.address_of(tmap_k), blk * 64, g, k0 + tile * G.tkv, bar)
            )
        for blk in T.unroll(G.dv // 64):
            v_dst = T.meta_var(smem.ptr_to([G.v_off + stage * G.stage_halfs + blk * G.tkv * 64]))
            T.evaluate(
                T.ptx[_TMA_COPY](v_dst, T.address_of(tmap_v), blk * 64, g, k0 + tile * G.tkv, bar)
            )


@T.macro(hygienic=False)
def _wait_kv(G, it):
    # Tile `it` (and Q) landed: its cp.async group, or its slot's mbarrier phase.
    if G.tma:
        T.ptx["cp.async.wait_group"](0)  # Q's copies (a no-op after the first tile)
        _wait_full(G, it)
    else:
        T.ptx["cp.async.wait_group"](G.stages - 2)


@T.macro(hygienic=False)
def _load_k(G, P, tile, stage):
    _load_rows_of(G, P, tile, G.k_off + stage * G.stage_halfs, G.dkp, G.dk, kf, k_base, P.k_stride)


@T.macro(hygienic=False)
def _load_v(G, P, tile, stage):
    _load_rows_of(G, P, tile, G.v_off + stage * G.stage_halfs, G.v_stride, G.dv, vf, 0, P.v_stride)


@T.macro(hygienic=False)
def _load_rows_of(G, P, tile, dst_off, dst_stride, width, src, base, stride):
    # the K (or V) rows of KV tile `tile`: `width` halfs from row `k0 + tile * tkv + r` of src
    _load_kv_rows(
        G,
        P,
        dst_off,
        dst_stride,
        width,
        G.tkv,
        src,
        base,
        k0,
        tile * G.tkv,
        n_b - 1,
        stride,
        G.kv_loaders,
    )


@T.macro(hygienic=False)
def _tile_step(G, P, stage, it):
    # S = Q K^T for this warp's 16 rows and its s_cols columns of the tile (all, unless split).
    if G.handoff:
        _handoff_step(G, P, stage, it)
    else:
        if G.wgmma:
            _s_wgmma(G, stage)
        else:
            _s_mma(G, stage)
        _softmax_pv(G, P, stage, it)


@T.macro(hygienic=False)
def _handoff_step(G, P, stage, it):
    # Warpgroup 0: S (m64n{tkv}, the whole tile), softmax, P in registers; it stores P (32-bit
    # A-fragment registers, thread t's chunk j at 16 B x (j * 128 + t)) over the tile's dead
    # rope columns and its two rescale factors, then arrives at named barrier 1. Warpgroup 1
    # (the KV loader) waits there and reads the P and factors of its twin thread.
    # Every warpgroup then runs its O columns' P·V from registers.
    hand = T.meta_var(G.k_off + stage * G.stage_halfs + G.handoff_off)
    if wd == 0:
        _s_wgmma(G, stage)
        _softmax_p(G, P, stage, it, ph)
        for j in T.unroll(G.tkv // 16):
            smem[T.ramp(hand + (j * 128 + tx) * 8, 1, 8)] = ph[T.ramp(j * 8, 1, 8)]
        red[tx * 2] = tmp[2]
        red[tx * 2 + 1] = tmp[3]
        T.ptx["bar.arrive"](1, G.threads)
    else:
        T.ptx["bar.sync"](1, G.threads)
        for j in T.unroll(G.tkv // 16):
            ph[T.ramp(j * 8, 1, 8)] = smem[T.ramp(hand + (j * 128 + tx - 128) * 8, 1, 8)]
        tmp[2] = red[(tx - 128) * 2]
        tmp[3] = red[(tx - 128) * 2 + 1]
        moved[0] = T.if_then_else(tmp[2] < T.float32(1) or tmp[3] < T.float32(1), 1, 0)
        for k in T.unroll(5):  # warp-uniform, as in warpgroup 0: no divergence before wgmma
            moved[0] = T.max(
                moved[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), moved[0], 1 << k, 32, 32)
            )
    _rescale_o(G)
    _pv_wgmma(G, G.v_off + stage * G.stage_halfs, 0)


@T.macro(hygienic=False)
def _s_wgmma(G, stage):
    # The warpgroup's 64 rows x s_cols columns: m64n{s_cols}k16, Q and K from shared memory.
    if G.swizzle:
        _s_wgmma_swizzled(G, stage)
    else:
        T.cuda.wgmma.encode_matrix_descriptor(
            T.address_of(desc[0]), smem.ptr_to([wm // 4 * 64 * G.dk]), 8, G.dk, 0
        )
        T.cuda.wgmma.encode_matrix_descriptor(
            T.address_of(desc[1]),
            smem.ptr_to([G.k_off + stage * G.stage_halfs + s_col0 * G.dk]),
            8,
            G.dk,
            0,
        )
        T.ptx["wgmma.fence.sync.aligned"]()
        for kk in T.serial(G.dk // 16):
            a_desc, b_desc = desc[0] + T.uint64(kk * 16), desc[1] + T.uint64(kk * 16)
            mma_async(G.s_cols, s_acc, a_desc, b_desc, accumulate=kk > 0, trans_b=0)
        T.ptx["wgmma.commit_group.sync.aligned"]()
        T.ptx["wgmma.wait_group.sync.aligned"](0)
    pin(s_acc, G.s_cols // 2)


@T.macro(hygienic=False)
def _s_wgmma_swizzled(G, stage):
    _s_issue_swizzled(G, stage)
    T.ptx["wgmma.wait_group.sync.aligned"](0)


@T.macro(hygienic=False)
def _s_issue_swizzled(G, stage):
    # 128-byte swizzle, K-major: k16 step kk is block kk // 4 (rows * 128 B further), 32 B in;
    # SBO = 1024 B between 8-row groups (descriptor offsets in 16-byte units).
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[0]), smem.ptr_to([wm // 4 * 64 * 64]), 1, 64, 3
    )
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[1]),
        smem.ptr_to([G.k_off + stage * G.stage_halfs + s_col0 * 64]),
        1,
        64,
        3,
    )
    T.ptx["wgmma.fence.sync.aligned"]()
    for kk in T.serial(G.dk // 16):
        a_desc = desc[0] + T.Cast("uint64", kk // 4 * G.tq * 8 + kk % 4 * 2)
        b_desc = desc[1] + T.Cast("uint64", kk // 4 * G.tkv * 8 + kk % 4 * 2)
        mma_async(G.s_cols, s_acc, a_desc, b_desc, accumulate=kk > 0, trans_b=0)
    T.ptx["wgmma.commit_group.sync.aligned"]()  # the caller waits


@T.macro(hygienic=False)
def _s_mma(G, stage):
    for i in T.unroll(G.s_cols // 2):
        s_acc[i] = T.float32(0)
    k_tile = G.k_off + stage * G.stage_halfs + s_col0 * G.dkp
    for kk in T.serial(G.dk // 16):
        T.ptx_legacy.ldmatrix(
            False,
            4,
            ".b16",
            qa.data,
            0,
            smem.data,
            (wm * 16 + lane % 16) * G.dkp + kk * 16 + lane // 16 * 8,
            dtype="float16",
        )
        for n2 in T.unroll(G.s_cols // 16):
            T.ptx_legacy.ldmatrix(
                False,
                4,
                ".b16",
                kb.data,
                0,
                smem.data,
                k_tile
                + (n2 * 16 + lane // 16 * 8 + lane % 8) * G.dkp
                + kk * 16
                + lane // 8 % 2 * 8,
                dtype="float16",
            )
            mma_f16(qa, 0, kb, 0, s_acc, n2 * 8)
            mma_f16(qa, 0, kb, 4, s_acc, n2 * 8 + 4)


@T.macro(hygienic=False)
def _softmax_pv(G, P, stage, it):
    p_base = G.k_off + stage * G.stage_halfs if G.p_in_k else G.p_off  # where P's rows start
    _softmax_p(G, P, stage, it, ph)
    _rescale_o(G)
    if G.p_in_smem:
        if G.wgmma:
            T.ptx["fence.proxy.async.shared::cta"]()  # P stores -> wgmma reads
        T.tvm_storage_sync("shared")  # all of P is in shared memory
    # O += P V. Unsplit, P's accumulator layout already is the A-fragment layout.
    v_tile = G.v_off + stage * G.stage_halfs
    if G.wgmma:
        _pv_wgmma(G, v_tile, p_base)
    else:
        _pv_mma(G, v_tile, p_base)


@T.macro(hygienic=False)
def _rescale_o(G):
    # by the factor _softmax_p left in tmp[2:4], where some row of the warp moved its max
    if moved[0] > 0:
        for d in T.unroll(G.dv_w // 8):
            for c in T.unroll(4):
                o_acc[d * 4 + c] = o_acc[d * 4 + c] * tmp[2 + c // 2]


@T.macro(hygienic=False)
def _softmax_p(G, P, stage, it, pbuf):
    # Causal mask (query token of the row + offset) and online softmax in base 2; P goes to
    # shared memory, or (unsplit) to pbuf in the A-fragment layout. O is not rescaled here.
    p_base = G.k_off + stage * G.stage_halfs if G.p_in_k else G.p_off  # where P's rows start
    tmp[0] = T.float32(-math.inf)
    tmp[1] = T.float32(-math.inf)
    # Tiles that end at or before the causal limit of the warp's first row (the smallest) need
    # no mask: a warp-uniform branch skips the per-element compare and select there.
    # The maxima are taken over the raw scores (the scale is positive) and scaled once per row;
    # each score is scaled inside its exponent's FFMA.
    if it * G.tkv + s_col0 + G.s_cols - 1 <= (row0 + wm * 16) // P.rows_per_token + n_b - t_b:
        for n in T.unroll(G.s_cols // 8):
            for c in T.unroll(4):
                tmp[c // 2] = T.max(tmp[c // 2], s_acc[n * 4 + c])
    else:
        for n in T.unroll(G.s_cols // 8):
            for c in T.unroll(4):
                lim = (row0 + wm * 16 + lane // 4 + c // 2 * 8) // P.rows_per_token + n_b - t_b
                s_acc[n * 4 + c] = T.if_then_else(
                    it * G.tkv + s_col0 + n * 8 + lane % 4 * 2 + c % 2 <= lim,
                    s_acc[n * 4 + c],
                    T.float32(-math.inf),
                )
                tmp[c // 2] = T.max(tmp[c // 2], s_acc[n * 4 + c])
    for h in T.unroll(2):
        tmp[h] = T.max(tmp[h], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), tmp[h], 1, 32, 32))
        tmp[h] = T.max(tmp[h], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), tmp[h], 2, 32, 32))
    if G.split_s:
        _exchange_rows(G, tmp, T.max)
    for h in T.unroll(2):
        tmp[h] = tmp[h] * T.float32(P.sm_scale * LOG2E)
    # Lazy rescaling: a row keeps its running max until the tile's max passes it by more than
    # RESCALE_SLACK (base 2), so P <= 2^RESCALE_SLACK (exact in the end: O and l share the max)
    # and O is rescaled only when some row of the warp moved (a warp-uniform branch below).
    for h in T.unroll(2):
        m_new = T.if_then_else(tmp[h] > st[h] + T.float32(RESCALE_SLACK), tmp[h], st[h])
        tmp[2 + h] = T.exp2(st[h] - m_new)
        st[h] = m_new
        st[2 + h] = st[2 + h] * tmp[2 + h]
    # One vote, not five shuffles: ptxas sees a branch on it as warp-uniform, which lets the
    # pipelined loop rescale O between wgmmas (in a branch it cannot prove uniform, it
    # serialises every wgmma: C7518).
    moved[0] = T.cuda.any_sync(
        T.uint32(0xFFFFFFFF),
        T.if_then_else(tmp[2] < T.float32(1) or tmp[3] < T.float32(1), 1, 0),
    )
    for n in T.unroll(G.s_cols // 8):
        for h in T.unroll(2):  # rows g, g + 8 of the warp; two adjacent columns each
            for c2 in T.unroll(2):
                p = T.exp2(s_acc[n * 4 + h * 2 + c2] * T.float32(P.sm_scale * LOG2E) - st[h])
                st[2 + h] = st[2 + h] + p
                if G.p_in_smem:
                    p2[c2] = T.Cast("float16", p)
                else:
                    pbuf[n * 4 + h * 2 + c2] = T.Cast("float16", p)
            if G.p_in_smem:  # the pair is 4 bytes of one 16-byte chunk: one store
                col = G.p_col0 + s_col0 + n * 8 + lane % 4 * 2
                row = wm * 16 + lane // 4 + h * 8
                if G.wgmma:
                    at = (
                        p_base
                        + _chunk_offset(G, row, col // 8, G.p_stride, G.p_width, G.p_rows)
                        + col % 8
                    )
                else:
                    at = p_base + row * G.p_stride + col
                smem[T.ramp(at, 1, 2)] = p2[T.ramp(0, 1, 2)]


@T.macro(hygienic=False)
def _pv_wgmma(G, v_tile, p_base):
    if not G.p_in_smem:
        _pv_wgmma_rs(G, v_tile, ph)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        pin(o_acc, G.dv_w // 2)
    elif G.swizzle:
        _pv_wgmma_swizzled(G, v_tile, p_base)
    else:
        _pv_wgmma_tiled(G, v_tile, p_base)


@T.macro(hygienic=False)
def _pv_wgmma_rs(G, v_tile, pbuf):
    # A = P from registers: k-step ks is S's n8 tiles 2ks, 2ks+1, whose f32 accumulator pairs
    # (rows g, g + 8) are, as f16 pairs, the four 32-bit registers of the warp's A fragment.
    # B = V as in the smem forms (MN-major; per 64-column swizzle block when swizzled).
    if G.swizzle:
        T.cuda.wgmma.encode_matrix_descriptor(
            T.address_of(desc[3]), smem.ptr_to([v_tile + wd * G.dv_w // 64 * G.tkv * 64]), 1, 64, 3
        )
    else:
        T.cuda.wgmma.encode_matrix_descriptor(
            T.address_of(desc[3]), smem.ptr_to([v_tile + wd * G.dv_w * 8]), G.v_width, 8, 0
        )
    pin(o_acc, G.dv_w // 2)
    T.ptx["wgmma.fence.sync.aligned"]()
    for ks in T.unroll(G.tkv // 16):
        a_regs = [
            T.reinterpret("uint32", pbuf[T.ramp(ks * 8, 1, 2)]),
            T.reinterpret("uint32", pbuf[T.ramp(ks * 8 + 2, 1, 2)]),
            T.reinterpret("uint32", pbuf[T.ramp(ks * 8 + 4, 1, 2)]),
            T.reinterpret("uint32", pbuf[T.ramp(ks * 8 + 6, 1, 2)]),
        ]
        if G.swizzle:
            for a in T.unroll(G.dv_w // 64):
                mma_async_rs(
                    64,
                    o_acc,
                    a_regs,
                    desc[3] + T.uint64(a * G.tkv * 8 + ks * 128),
                    trans_b=1,
                    acc0=a * 32,
                )
        else:
            mma_async_rs(G.dv_w, o_acc, a_regs, desc[3] + T.uint64(ks * 2 * G.v_width), trans_b=1)
    T.ptx["wgmma.commit_group.sync.aligned"]()  # the caller waits


@T.macro(hygienic=False)
def _pv_wgmma_swizzled(G, v_tile, p_base):
    # A = P (K-major, swizzled rows of the P tile); B = V, MN-major: each 64-column block of V
    # is one swizzle atom (kv rows 128 B apart, SBO = 1024 B between 8-row groups), so one
    # m64n64k16 per block and k16 step (16 kv rows = 2048 B further).
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[2]),
        smem.ptr_to(
            [p_base + _chunk_offset(G, wm // 4 * 64, G.p_col0 // 8, 0, G.p_width, G.p_rows)]
        ),
        1,
        64,
        3,
    )
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[3]), smem.ptr_to([v_tile + wd * G.dv_w // 64 * G.tkv * 64]), 1, 64, 3
    )
    pin(o_acc, G.dv_w // 2)
    T.ptx["wgmma.fence.sync.aligned"]()
    for ks in T.unroll(G.tkv // 16):
        for a in T.unroll(G.dv_w // 64):
            mma_async(
                64,
                o_acc,
                desc[2] + T.uint64(ks // 4 * G.p_rows * 8 + ks % 4 * 2),
                desc[3] + T.uint64(a * G.tkv * 8 + ks * 128),
                accumulate=True,
                trans_b=1,
                acc0=a * 32,
            )
    T.ptx["wgmma.commit_group.sync.aligned"]()
    T.ptx["wgmma.wait_group.sync.aligned"](0)
    pin(o_acc, G.dv_w // 2)


@T.macro(hygienic=False)
def _pv_wgmma_tiled(G, v_tile, p_base):
    # m64n{dv_w}k16: A = P (K-major, 64 rows x tkv), B = V (MN-major: d contiguous in a core
    # matrix row, so LBO = one 8-row KV group, SBO = one 8-column d group = 128 B).
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[2]),
        smem.ptr_to([p_base + _chunk_offset(G, wm // 4 * 64, G.p_col0 // 8, 0, G.p_width)]),
        8,
        G.p_width,
        0,
    )
    T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(desc[3]), smem.ptr_to([v_tile + wd * G.dv_w * 8]), G.v_width, 8, 0
    )
    pin(o_acc, G.dv_w // 2)
    T.ptx["wgmma.fence.sync.aligned"]()
    for ks in T.unroll(G.tkv // 16):
        mma_async(
            G.dv_w,
            o_acc,
            desc[2] + T.uint64(ks * 16),
            desc[3] + T.uint64(ks * 2 * G.v_width),
            accumulate=True,
            trans_b=1,
        )
    T.ptx["wgmma.commit_group.sync.aligned"]()
    T.ptx["wgmma.wait_group.sync.aligned"](0)
    pin(o_acc, G.dv_w // 2)


@T.macro(hygienic=False)
def _pv_mma(G, v_tile, p_base):
    for ks in T.unroll(G.tkv // 16):
        if G.split_s:
            T.ptx_legacy.ldmatrix(
                False,
                4,
                ".b16",
                qa.data,
                0,
                smem.data,
                p_base + (wm * 16 + lane % 16) * G.p_stride + G.p_col0 + ks * 16 + lane // 16 * 8,
                dtype="float16",
            )
        for d2 in T.unroll(G.dv_w // 16):
            T.ptx_legacy.ldmatrix(
                True,
                4,
                ".b16",
                kb.data,
                0,
                smem.data,
                v_tile
                + (ks * 16 + lane // 8 % 2 * 8 + lane % 8) * G.v_stride
                + wd * G.dv_w
                + d2 * 16
                + lane // 16 * 8,
                dtype="float16",
            )
            if G.split_s:
                mma_f16(qa, 0, kb, 0, o_acc, d2 * 8)
                mma_f16(qa, 0, kb, 4, o_acc, d2 * 8 + 4)
            else:
                mma_f16(ph, ks * 8, kb, 0, o_acc, d2 * 8)
                mma_f16(ph, ks * 8, kb, 4, o_acc, d2 * 8 + 4)


@T.macro(hygienic=False)
def _exchange_rows(G, vals, combine):
    # vals[0], vals[1] (rows g, g+8 of this warp, quad-reduced) := combine over the d_split
    # warps of the row slice, through shared memory.
    if lane % 4 == 0:
        red[(wm * G.d_split + wd) * 16 + lane // 4] = vals[0]
        red[(wm * G.d_split + wd) * 16 + lane // 4 + 8] = vals[1]
    T.tvm_storage_sync("shared")
    for h in T.unroll(2):
        vals[h] = red[wm * G.d_split * 16 + lane // 4 + h * 8]
        for w in T.unroll(1, G.d_split):
            vals[h] = combine(vals[h], red[(wm * G.d_split + w) * 16 + lane // 4 + h * 8])


def _add(a, b):
    return a + b


@T.macro(hygienic=False)
def _epilogue(G, P):
    for h in T.unroll(2):
        st[2 + h] = st[2 + h] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), st[2 + h], 1, 32, 32)
        st[2 + h] = st[2 + h] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), st[2 + h], 2, 32, 32)
    if G.split_s or G.handoff:
        # Each warp summed only its columns of P (hand-off: warpgroup 0 all, the others none):
        # add the partial row sums of the slice.
        T.tvm_storage_sync("shared")
        tmp[0] = st[2]
        tmp[1] = st[3]
        _exchange_rows(G, tmp, _add)
        st[2] = tmp[0]
        st[3] = tmp[1]
    for h in T.unroll(2):
        row = row0 + wm * 16 + lane // 4 + h * 8
        if row < rows_b:
            orow = T.Cast("int64", (q0 * P.rows_per_token + row) * P.groups + g)
            inv = T.float32(1) / st[2 + h]
            for d in T.unroll(G.dv_w // 8):
                for c in T.unroll(2):
                    of[orow * G.dv + wd * G.dv_w + d * 8 + lane % 4 * 2 + c] = T.Cast(
                        "float16", o_acc[d * 4 + h * 2 + c] * inv
                    )
            if wd == 0 and lane % 4 == 0:
                lsef[orow] = (st[h] + T.log2(st[2 + h])) * T.float32(LN2)


@T.macro(hygienic=False)
def _pipelined_step(G, P, it, cur, prev, first):
    # Tile `it`: its S, then the previous tile's P·V (P from `prev`), both in flight while
    # this tile's softmax runs (P into `cur`); O is rescaled before the next P·V. The ring
    # keeps stages - 2 tiles ahead: tile it - 1's slot is still read by its P·V. Two stages
    # (split ring, K and V apart): K runs one tile ahead of V, so this step loads K of tile
    # it + 1 (over K of tile it - 1, whose S is done) and V of tile it (over V of tile it - 2,
    # whose P·V is done) and each K or V slot is read by one wgmma at a time.
    T.ptx["cp.async.wait_group"](0 if G.split_ring else G.stages - 3)
    T.ptx["fence.proxy.async.shared::cta"]()  # cp.async data -> wgmma reads
    T.tvm_storage_sync("shared")
    if G.split_ring:
        if it + 1 < n_tiles:
            _load_k(G, P, it + 1, (it + 1) % 2)
        _load_v(G, P, it, it % 2)
    elif it + G.stages - 2 < n_tiles:
        _load_kv(G, P, it + G.stages - 2, (it + G.stages - 2) % G.stages)
    T.ptx["cp.async.commit_group"]()
    _s_issue_swizzled(G, it % G.stages)
    if first:  # a Python bool: no branch around the wgmmas (ptxas would serialise them)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
    else:
        # O by tile it - 1's factors, under S(it), before the P·V that adds to it (FA3's
        # order), so that the wait for that P·V ends the step
        _rescale_o(G)
        _pv_wgmma_rs(G, G.v_off + (it - 1) % G.stages * G.stage_halfs, prev)
        T.ptx["wgmma.wait_group.sync.aligned"](1)  # S(it); P·V(it - 1) may still run
    pin(s_acc, G.s_cols // 2)
    _softmax_p(G, P, it % G.stages, it, cur)
    if not first:
        # Without this, ptxas hoists the wait below above every exponent: the softmax ran
        # after the P·V, not under it. The row sums need every exponent.
        store_before_wait(red[tx % G.red_floats], st[2] + st[3])
    T.ptx["wgmma.wait_group.sync.aligned"](0)
    pin(o_acc, G.dv_w // 2)


@T.macro(hygienic=False)
def _pipelined_loop(G, P):
    # Tile 0, then tiles in pairs, so that each P buffer is a fixed set of registers: even
    # tiles write ph, odd ones pq; the last tile's P·V runs after the loop.
    if G.split_ring:
        _load_k(G, P, 0, 0)
        T.ptx["cp.async.commit_group"]()
    for s in T.unroll(0 if G.split_ring else G.stages - 2):
        if s < n_tiles:
            _load_kv(G, P, s, s)
        T.ptx["cp.async.commit_group"]()
    _pipelined_step(G, P, 0, ph, pq, True)
    for it2 in T.serial((n_tiles - 1) // 2):
        _pipelined_step(G, P, it2 * 2 + 1, pq, ph, False)
        _pipelined_step(G, P, it2 * 2 + 2, ph, pq, False)
    if n_tiles % 2 == 0:
        _pipelined_step(G, P, n_tiles - 1, pq, ph, False)
    last = G.v_off + (n_tiles - 1) % G.stages * G.stage_halfs
    if G.split_ring:  # V of the last tile was loaded in its own step
        T.ptx["cp.async.wait_group"](0)
        T.ptx["fence.proxy.async.shared::cta"]()
        T.tvm_storage_sync("shared")
    _rescale_o(G)
    if n_tiles % 2 == 1:
        _pv_wgmma_rs(G, last, ph)
    else:
        _pv_wgmma_rs(G, last, pq)
    T.ptx["wgmma.wait_group.sync.aligned"](0)
    pin(o_acc, G.dv_w // 2)


@T.macro(hygienic=True)
def _encode_rows(tmap, data, width, stride, groups, n_rows, box_rows):
    # f16 rows [n_rows, groups, stride] (the first `width` columns) as a 3-d tensor map: boxes
    # of 64 columns x 1 group x box_rows rows, 128-byte swizzle, rows past n_rows zero-filled
    T.tensormap_encode_tiled(
        tmap, data, width, groups, n_rows, stride * 2, groups * stride * 2,
        64, 1, box_rows, 1, 1, 1,
        descriptor_dtype="float16", rank=3, interleave=0, swizzle=3, l2_promotion=2,
        oob_fill=0, force_cu_dtype=-1,
    )  # fmt: skip


@T.macro(hygienic=True)
def mma_body(P, G, qf, kf, vf, k_base, q_indptr, kv_indptr, of, lsef, batch, t_total):
    # P: prefill _Layout, G: Geometry; qf/kf/vf/of/lsef: flat views of q, k, v, o, lse.
    if G.tma:
        # host: K [N, groups, dk] and V [N, groups, dv] as tensor maps
        tmap_k: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
        tmap_v: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
        n_kv = T.meta_var(kf.shape[0] // (P.groups * P.k_stride))
        _encode_rows(tmap_k, kf.data, G.dk, P.k_stride, P.groups, n_kv, G.tkv)
        _encode_rows(tmap_v, vf.data, G.dv, P.v_stride, P.groups, n_kv, G.tkv)
    # one grid axis over (query tile, head group), group fastest: the heaviest causal tiles of
    # every group are dispatched first (longest-processing-time order), so no group's heavy
    # tiles are left for the tail of the launch
    bxg = T.launch_thread(
        "blockIdx.x",
        T.Cast("int32", (t_total * P.rows_per_token + G.tq - 1) // G.tq + batch) * P.groups,
    )
    bx = T.meta_var(bxg // P.groups)
    g = T.meta_var(bxg % P.groups)
    tx = T.launch_thread("threadIdx.x", G.block_threads)
    smem = T.alloc_buffer((G.smem_halfs,), "float16", scope="shared.dyn")
    # row max / sum exchange; 1024 B when swizzling: keeps the dynamic tiles 1024-byte aligned
    red = T.alloc_buffer((G.red_floats,), "float32", scope="shared")
    qa = T.alloc_buffer((8,), "float16", scope="local")  # A fragment of Q (16 x 16)
    kb = T.alloc_buffer((8,), "float16", scope="local")  # B fragments of two 8-wide n tiles
    s_acc = T.alloc_buffer((G.s_cols // 2,), "float32", scope="local")  # S, 16 x s_cols per warp
    ph = T.alloc_buffer((G.tkv // 2,), "float16", scope="local")  # P as A fragments
    pq = T.alloc_buffer((G.tkv // 2 if G.pipelined else 1,), "float16", scope="local")  # P, odd
    p2 = T.alloc_buffer((2,), "float16", scope="local")  # two adjacent P values, one store
    o_acc = T.alloc_buffer((G.dv_w // 2,), "float32", scope="local")  # O, 16 x dv_w per warp
    st = T.alloc_buffer((4,), "float32", scope="local")  # row max (lo, hi), row sum (lo, hi)
    tmp = T.alloc_buffer((4,), "float32", scope="local")  # tile max (lo, hi), rescale (lo, hi)
    moved = T.alloc_buffer((1,), "int32", scope="local")  # some row's max moved: rescale O
    sel = T.alloc_buffer((3,), "int32", scope="local")  # sequence, tile, first block of seq
    desc = T.alloc_buffer((4,), "uint64", scope="local")  # wgmma descriptors: Q, K, P, V
    # Which (sequence, query tile) this block owns: scan the per-sequence tile counts.
    sel[0] = -1
    sel[1] = 0
    sel[2] = 0
    for b in T.serial(T.Cast("int32", batch)):
        nt = ((q_indptr[b + 1] - q_indptr[b]) * P.rows_per_token + G.tq - 1) // G.tq
        if sel[2] <= bx and bx < sel[2] + nt:
            sel[0] = b
            sel[1] = nt - 1 - (bx - sel[2])
        sel[2] = sel[2] + nt
    if sel[0] >= 0:
        q0 = q_indptr[sel[0]]
        t_b = q_indptr[sel[0] + 1] - q0
        k0 = kv_indptr[sel[0]]
        n_b = kv_indptr[sel[0] + 1] - k0
        rows_b = t_b * P.rows_per_token
        row0 = sel[1] * G.tq
        last_row = T.min(row0 + G.tq, rows_b) - 1
        n_tiles = (last_row // P.rows_per_token + n_b - t_b + G.tkv) // G.tkv
        warp = tx // 32
        lane = tx % 32
        wm = warp % G.m_warps
        wd = warp // G.m_warps
        s_col0 = wd * G.s_cols if G.split_s else 0  # first S column of this warp in a tile
        if G.tma:
            if tx == 0:
                for s in T.unroll(G.stages):
                    T.ptx.mbarrier.init.shared.b64(_full_bar(G, smem, s), T.uint32(1))
                    if G.producer:  # one arrival per consumer warp
                        T.ptx.mbarrier.init.shared.b64(_empty_bar(G, smem, s), T.uint32(G.warps))
            T.ptx["fence.proxy.async.shared::cta"]()
            T.tvm_storage_sync("shared")
        _load_rows(
            G,
            P,
            0,
            G.dkp,
            G.dk,
            G.tq,
            qf,
            T.int64(0),
            q0 * P.rows_per_token,
            row0,
            rows_b - 1,
            G.dk,
            G.threads,
        )
        for d in T.unroll(G.dv_w // 2):
            o_acc[d] = T.float32(0)
        st[0] = T.float32(-math.inf)
        st[1] = T.float32(-math.inf)
        st[2] = T.float32(0)
        st[3] = T.float32(0)
        if G.producer:
            if tx >= G.threads:
                _produce(G, P)
            else:
                _consume(G, P)
        elif G.pipelined:
            _pipelined_loop(G, P)
        else:
            for s in T.unroll(G.stages - 1):
                if s < n_tiles:
                    _load_kv(G, P, s, s)
                T.ptx["cp.async.commit_group"]()
            for it in T.serial(n_tiles):
                _wait_kv(G, it)
                if G.wgmma:
                    T.ptx["fence.proxy.async.shared::cta"]()  # cp.async data -> wgmma reads
                T.tvm_storage_sync("shared")
                stage = it % G.stages
                if G.s_first:  # S runs on the tensor cores while this warp issues the copies
                    _s_issue_swizzled(G, stage)
                if it + G.stages - 1 < n_tiles:
                    _load_kv(G, P, it + G.stages - 1, (it + G.stages - 1) % G.stages)
                T.ptx["cp.async.commit_group"]()
                if G.s_first:
                    T.ptx["wgmma.wait_group.sync.aligned"](0)
                    pin(s_acc, G.s_cols // 2)
                    _softmax_pv(G, P, stage, it)
                else:
                    _tile_step(G, P, stage, it)
        if not G.producer:  # (the consumer warps' epilogue is in _consume)
            T.ptx["cp.async.wait_group"](0)
            _epilogue(G, P)
