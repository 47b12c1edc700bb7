# The body macros are TVMScript expanded inside `split_mma`'s kernel (hygienic=False): they read
# its locals (tid, lane, kvs, fragments, ...), which Python static analysis cannot see.
# ruff: noqa: F821, F841
"""Tensor-core split kernel of absorbed-MLA decode (see ``attention_decode.py`` for the contract).

CTA ``(s, b)`` = split ``s`` of sequence ``b``. Threads: ``m_tiles x warps_n`` warps; warp
``(wm, wn)`` owns query rows ``16 wm .. 16 wm + 15`` (row ``r`` = token ``r // H``, head
``r % H``), score columns ``wn * block_n / warps_n ..`` of each tile and output columns
``wn * kv_lora_rank / warps_n ..``.

Per tile of ``block_n`` cache rows, loaded into a ``stages``-deep shared ring either by every
thread's 16-byte cp.async (one commit group per tile) or, with ``config.tma`` (sm_90), by warp
0's one ``cp.async.bulk`` per row completing on the slot's mbarrier:
  S = Q Kᵀ       mma.sync m16n8k16, A = Q (ldmatrix from smem), B = K rows (ldmatrix)
  online softmax  row max across the ``warps_n`` warps through smem, base-2 exponent
  O += P V       A = P (f16 via smem, ldmatrix), B = V = first 512 columns (ldmatrix.trans)
Shared rows are padded by 8 halves (row stride an odd number of 16-byte chunks: ldmatrix is
bank-conflict free). Rows past the split end are masked: cp.async zero-fills them (src-size
0), TMA repeats the split's last row (finite data). The epilogue stores O (the f16 output of a
single-split sequence, else the f32 partial) as 16-byte (8-byte) vectors, see below.

Fragment layouts (PTX ISA, m16n8k16 f16): lane = 4 g + c. A regs: (g, 2c), (g + 8, 2c),
(g, 2c + 8), (g + 8, 2c + 8); B regs: k = 2c (+ 8), n = g; C: (g, 2c..2c+1), (g + 8, 2c..2c+1).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules import grid_dependency
from mla_compiler.schedules.attention_decode_tiles import PROBE_TILES, SplitGeometry
from mla_compiler.schedules.decode_splits import effective_splits, split_range
from mla_compiler.schedules.mma_sync import mma_f16

_LN2 = 0.6931471805599453
_NEG = -1.0e30  # running-max start: finite, so fully masked rows give exp2(-inf - _NEG) = 0


# globaltimer (ns, all SMs) for ``probe`` builds
_GLOBALTIMER = (
    "__device__ __forceinline__ unsigned int probe_globaltimer() { unsigned int t; "
    'asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(t)); return t; }\n'
)


@T.macro
def _qk_step(G, abuf, aoff, kvs, st_off, wn, lane, acc_s, b_frag, ks):
    """k-step ``ks`` of S = Q Kᵀ for this warp's score columns, A = ``abuf[aoff :]`` (even /
    odd k-steps accumulate apart: 2 mma chains)."""
    for np in T.unroll(G.NS // 2):
        T.evaluate(
            T.ptx_legacy.ldmatrix(
                False,
                4,
                ".b16",
                b_frag.data,
                0,
                kvs.access_ptr("r"),
                st_off
                + (wn * G.SN + np * 16 + lane % 8 + lane // 16 * 8) * G.DP
                + ks * 16
                + lane // 8 % 2 * 8,
                dtype="float16",
            )
        )
        for half in T.unroll(2):
            c_off = T.meta_var(ks % 2 * (G.NS * 4) + (np * 2 + half) * 4)  # even / odd chain
            mma_f16(abuf, aoff, b_frag, half * 4, acc_s, c_off)

    for _odd in T.unroll(G.NS % 2):  # a lone n8 tile: ldmatrix.x2 (lanes 0-15)
        T.evaluate(
            T.ptx_legacy.ldmatrix(
                False,
                2,
                ".b16",
                b_frag.data,
                0,
                kvs.access_ptr("r"),
                st_off
                + (wn * G.SN + (G.NS - 1) * 8 + lane % 8) * G.DP
                + ks * 16
                + lane // 8 % 2 * 8,
                dtype="float16",
            )
        )
        mma_f16(abuf, aoff, b_frag, 0, acc_s, ks % 2 * (G.NS * 4) + (G.NS - 1) * 4)


@T.macro
def _load_q_frag(src, base, stride, dst, wm, lane, col, off):
    """ldmatrix.x4: the A fragment of Q's columns ``col .. col + 15`` (rows ``16 wm ..``,
    ``stride`` halves apart from ``src[base]``) into ``dst[off : off + 8]``."""
    T.evaluate(
        T.ptx_legacy.ldmatrix(
            False,
            4,
            ".b16",
            dst.data,
            off,
            src.access_ptr("r"),
            base + (wm * 16 + lane % 16) * stride + col + lane // 16 * 8,
            dtype="float16",
        )
    )


@T.macro
def _load_tile(G, kvs, kv, layer, start, lo, hi, tid, tile, stage):
    """cp.async rows ``lo + tile * BN ..`` into ring slot ``stage`` (zero-fill past ``hi``)."""
    for i in T.unroll(G.KV_ITERS):
        idx = T.meta_var(i * G.NT + tid)
        if idx < G.BN * G.CH:
            row = T.meta_var(lo + tile * G.BN + idx // G.CH)
            T.evaluate(
                T.ptx["cp.async.cg.shared.global"](
                    kvs.ptr_to([stage, idx // G.CH, idx % G.CH * 8]),
                    kv.ptr_to([layer, start + T.min(row, hi - 1), idx % G.CH * 8]),
                    16,
                    T.Cast("uint32", T.if_then_else(row < hi, 16, 0)),
                )
            )


@T.macro
def _load_tile_tma(G, kvs, kv, bars, layer, start, lo, hi, tid, tile, stage):
    """Warp 0: one bulk copy per row of tile ``tile`` into ring slot ``stage``, completing
    on ``bars[stage]`` (rows past ``hi`` repeat row ``hi - 1``: finite, and masked)."""
    if tid < 32:
        if tid == 0:
            T.ptx.mbarrier.arrive.expect_tx.shared.b64(
                bars.ptr_to([stage]), T.uint32(G.BN * G.D * 2)
            )
        for i in T.unroll(G.BN // 32):
            row = T.meta_var(lo + tile * G.BN + i * 32 + tid)
            T.evaluate(
                T.ptx["cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"](
                    kvs.ptr_to([stage, i * 32 + tid, 0]),
                    kv.ptr_to([layer, start + T.min(row, hi - 1), 0]),
                    T.uint32(G.D * 2),
                    bars.ptr_to([stage]),
                )
            )


@T.macro(hygienic=False)
def _fill_slot(G, tile, stage):
    # tile `tile` into ring slot `stage`, if the split has it (cp.async: one group, maybe empty)
    if G.TMA:
        if tile < ntiles:
            _load_tile_tma(G, kvs, kv, bars, layer, start, lo, hi, tid, tile, stage)
    else:
        if tile < ntiles:
            _load_tile(G, kvs, kv, layer, start, lo, hi, tid, tile, stage)
        T.evaluate(T.ptx.cp.async_.commit_group())


@T.macro(hygienic=False)
def _load_q(G):
    # Q rows (padded rows zero-filled) ride in their own first cp.async group: into qs, or
    # (SQ) whole into ring slot ST - 1 and the non-resident columns into qs
    for i in T.unroll(G.QT_ITERS):
        idx = T.meta_var(i * G.NT + tid)
        if idx < G.MT * 16 * G.QCH and used:
            r = T.meta_var(idx // G.QCH)
            rc = T.meta_var(T.min(r, G.R - 1))
            T.evaluate(
                T.ptx["cp.async.cg.shared.global"](
                    qs.ptr_to([r, idx % G.QCH * 8]),
                    q.ptr_to([b, rc // G.H, rc % G.H, G.QO + idx % G.QCH * 8]),
                    16,
                    T.Cast("uint32", T.if_then_else(r < G.R, 16, 0)),
                )
            )
    if G.SQ:
        for i in T.unroll(G.Q_ITERS):
            idx = T.meta_var(i * G.NT + tid)
            if idx < G.MT * 16 * G.CH and used:
                r = T.meta_var(idx // G.CH)
                rc = T.meta_var(T.min(r, G.R - 1))
                T.evaluate(
                    T.ptx["cp.async.cg.shared.global"](
                        kvs.ptr_to([G.ST - 1, r, idx % G.CH * 8]),
                        q.ptr_to([b, rc // G.H, rc % G.H, idx % G.CH * 8]),
                        16,
                        T.Cast("uint32", T.if_then_else(r < G.R, 16, 0)),
                    )
                )
    T.evaluate(T.ptx.cp.async_.commit_group())


@T.macro(hygienic=False)
def _prologue(G):
    # tiles 0 .. ST-1 in flight (a slot refills once every warp is done with it; SQ: tile
    # ST - 1 once Q's fragments left slot ST - 1 for the registers), then Q's fragments
    for st in T.unroll(G.ST - int(G.SQ)):
        _fill_slot(G, st, st)
    # Q landed (the tiles may still fly: cp.async groups complete in order)
    T.evaluate(T.ptx.cp.async_.wait_group(0 if G.TMA else G.ST - int(G.SQ)))
    T.tvm_storage_sync("shared")
    for ks in T.unroll(G.QRK):  # q_regs: Q's A fragments of the first QRK k-steps, once
        if G.SQ:
            _load_q_frag(kvs, (G.ST - 1) * G.BN * G.DP, G.DP, q_frag, wm, lane, ks * 16, ks * 8)
        else:
            _load_q_frag(qs, 0, G.QP, q_frag, wm, lane, ks * 16, ks * 8)
    if G.SQ:
        T.tvm_storage_sync("shared")  # every warp has its fragments: slot ST - 1 is free
        if G.ST - 1 < ntiles:
            _load_tile(G, kvs, kv, layer, start, lo, hi, tid, G.ST - 1, G.ST - 1)
        T.evaluate(T.ptx.cp.async_.commit_group())


@T.macro(hygienic=False)
def _wait_tile(G, kt):
    if G.TMA:
        T.cuda.mbarrier_wait(bars.ptr_to([kt % G.ST]), T.truncdiv(kt, G.ST) % 2)
    else:  # tile kt's group: ST - 1 younger ones (tiles kt+1 .. kt+ST-1) may fly
        T.evaluate(T.ptx.cp.async_.wait_group(G.ST - 1))
        T.tvm_storage_sync("shared")
    _probe_tile(G, kt, 4)  # landed


@T.macro(hygienic=False)
def _scores(G, kt, st_off):
    # S = Q Kᵀ for this warp's SN columns
    for e in T.unroll(G.NS * 8):
        acc_s[e] = T.float32(0)
    for ks in T.unroll(G.QRK):  # Q's A fragments resident in registers
        _qk_step(G, q_frag, ks * 8, kvs, st_off, wn, lane, acc_s, b_frag, ks)
    for kr in T.unroll(G.D // 16 - G.QRK):  # the rest reloaded from shared memory
        _load_q_frag(qs, 0, G.QP, a_frag, wm, lane, (G.QRK + kr) * 16 - G.QO, 0)
        _qk_step(G, a_frag, 0, kvs, st_off, wn, lane, acc_s, b_frag, G.QRK + kr)
    for e in T.unroll(G.NS * 4):
        acc_s[e] = acc_s[e] + acc_s[G.NS * 4 + e]
    # scale, mask (split end and causal among the Q new tokens), row max
    for k in T.unroll(2):
        m_new[k] = T.float32(-math.inf)
    for i in T.unroll(G.NS):
        for e in T.unroll(4):
            jj = T.meta_var(lo + kt * G.BN + wn * G.SN + i * 8 + lane % 4 * 2 + e % 2)
            tok = T.meta_var((wm * 16 + lane // 4 + e // 2 * 8) // G.H)
            acc_s[i * 4 + e] = T.if_then_else(
                jj < hi and jj <= n - G.Q + tok,
                acc_s[i * 4 + e] * T.float32(G.scale_log2),
                T.float32(-math.inf),
            )
            m_new[e // 2] = T.max(m_new[e // 2], acc_s[i * 4 + e])
    for k in T.unroll(2):
        for sh in T.unroll(2):
            m_new[k] = T.max(
                m_new[k],
                T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), m_new[k], 1 << sh, 32, 32),
            )
        if lane % 4 == 0:
            red_m[wn, wm * 16 + lane // 4 + k * 8] = m_new[k]


@T.macro(hygienic=False)
def _softmax(G):
    # the row max over the WN warps, P = exp2(S - max) to shared memory, O and l rescaled
    for k in T.unroll(2):
        m_new[k] = m_i[k]
        for w in T.unroll(G.WN):
            m_new[k] = T.max(m_new[k], red_m[w, wm * 16 + lane // 4 + k * 8])
        alpha[k] = T.exp2(m_i[k] - m_new[k])
        m_i[k] = m_new[k]
        l_i[k] = l_i[k] * alpha[k]
    for i in T.unroll(G.NS):
        for e in T.unroll(4):
            acc_s[i * 4 + e] = T.exp2(acc_s[i * 4 + e] - m_new[e // 2])
            l_i[e // 2] = l_i[e // 2] + acc_s[i * 4 + e]
            ps[wm * 16 + lane // 4 + e // 2 * 8, wn * G.SN + i * 8 + lane % 4 * 2 + e % 2] = T.Cast(
                "float16", acc_s[i * 4 + e]
            )
    for j in T.unroll(G.NO):
        for e in T.unroll(4):
            acc_o[j * 4 + e] = acc_o[j * 4 + e] * alpha[e // 2]


@T.macro(hygienic=False)
def _pv(G, st_off):
    # O += P V over this warp's OW output columns
    for kk in T.unroll(G.BN // 16):
        T.evaluate(
            T.ptx_legacy.ldmatrix(
                False,
                4,
                ".b16",
                a_frag.data,
                0,
                ps.access_ptr("r"),
                (wm * 16 + lane % 16) * G.BNP + kk * 16 + lane // 16 * 8,
                dtype="float16",
            )
        )
        for np in T.unroll(G.NO // 2):
            T.evaluate(
                T.ptx_legacy.ldmatrix(
                    True,
                    4,
                    ".b16",
                    b_frag.data,
                    0,
                    kvs.access_ptr("r"),
                    st_off + (kk * 16 + lane % 16) * G.DP + wn * G.OW + np * 16 + lane // 16 * 8,
                    dtype="float16",
                )
            )
            for half in T.unroll(2):
                mma_f16(a_frag, 0, b_frag, half * 4, acc_o, (np * 2 + half) * 4)


@T.macro(hygienic=False)
def _row_sums(G):
    # l: quad lanes, then the warps_n warps of this M tile; alpha = 1 / l (0 for an empty row)
    for k in T.unroll(2):
        for sh in T.unroll(2):
            l_i[k] = l_i[k] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), l_i[k], 1 << sh, 32, 32)
        if lane % 4 == 0:
            red_l[wn, wm * 16 + lane // 4 + k * 8] = l_i[k]
    T.tvm_storage_sync("shared")
    for k in T.unroll(2):
        l_i[k] = T.float32(0)
        for w in T.unroll(G.WN):
            l_i[k] = l_i[k] + red_l[w, wm * 16 + lane // 4 + k * 8]
        alpha[k] = T.if_then_else(l_i[k] > T.float32(0), T.float32(1) / l_i[k], T.float32(0))


@T.macro(hygienic=False)
def _store_o(G):
    # Lanes 2i and 2i + 1 of a quad trade halves (one xor shuffle per value): the even lane
    # ends with columns 4 (i) .. +3 of row g, the odd one those of row g + 8, so each lane
    # stores one 16-byte float4 (8-byte half4) and two lanes fill a 32-byte sector per row.
    even = T.meta_var(lane % 2 == 0)
    for j in T.unroll(G.NO):
        for k in T.unroll(2):
            mine = T.meta_var(
                T.if_then_else(even, acc_o[j * 4 + k] * alpha[0], acc_o[j * 4 + 2 + k] * alpha[1])
            )
            give = T.meta_var(
                T.if_then_else(even, acc_o[j * 4 + 2 + k] * alpha[1], acc_o[j * 4 + k] * alpha[0])
            )
            got = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), give, 1, 32, 32)
            out4[k] = T.if_then_else(even, mine, got)
            out4[2 + k] = T.if_then_else(even, got, mine)
        r = T.meta_var(wm * 16 + lane // 4 + lane % 2 * 8)
        col = T.meta_var(wn * G.OW + j * 8 + lane % 4 // 2 * 4)
        if r < G.R:
            if single:
                o[b, r // G.H, r % G.H, T.ramp(col, 1, 4)] = T.Cast(
                    "float16x4", out4[T.ramp(0, 1, 4)]
                )
            elif used_end:
                o_part[sid, b, r // G.H, r % G.H, T.ramp(col, 1, 4)] = out4[T.ramp(0, 1, 4)]


@T.macro(hygienic=False)
def _store_lse(G):
    if wn == 0 and lane % 4 == 0:
        for k in T.unroll(2):
            r = T.meta_var(wm * 16 + lane // 4 + k * 8)
            value = T.meta_var(
                T.if_then_else(
                    l_i[k] > T.float32(0),
                    m_i[k] * T.float32(_LN2) + T.log(l_i[k]),
                    T.float32(-math.inf),
                )
            )
            if r < G.R:
                if single:
                    lse[b, r // G.H, r % G.H] = value
                elif used_end:
                    lse_part[sid, b, r // G.H, r % G.H] = value


@T.macro(hygienic=False)
def _probe_entry(G):
    if G.probe:
        for i in T.unroll(G.NSTAMP):
            stamp[i] = T.uint32(0)
        stamp[0] = T.cuda.func_call(
            "probe_globaltimer", source_code=_GLOBALTIMER, return_type="uint32"
        )
        stamp[2] = T.Cast("uint32", T.cuda.clock64())


@T.macro(hygienic=False)
def _probe_tile(G, kt, slot):
    # clock64 of the first PROBE_TILES tiles: landed (slot 4) and done (slot 5)
    if G.probe:
        for j in T.unroll(PROBE_TILES):
            if kt == j:
                stamp[slot + 2 * j] = T.Cast("uint32", T.cuda.clock64())


@T.macro(hygienic=False)
def _probe_exit(G):
    if G.probe:
        stamp[3] = T.Cast("uint32", T.cuda.clock64())
        stamp[1] = T.cuda.func_call(
            "probe_globaltimer", source_code=_GLOBALTIMER, return_type="uint32"
        )
        T.tvm_storage_sync("shared")  # orders the epilogue's stores before these
        if tid == 0:
            for i in T.unroll(G.NSTAMP):
                o_part[sid, b, 0, 0, i] = T.reinterpret("float32", stamp[i])


def split_mma(dims: MLADims, *, q_tokens: int, config, sm_scale: float, probe: bool = False):
    """The tensor-core split PrimFunc for ``config`` (already checked by ``keep``).

    ``probe`` (timing builds only, ``benchmarks/timeline_decode.py``): thread 0 of each CTA
    stamps its timeline and writes it over ``o_part[s, b, 0, 0, :12]`` (uint32 bits, wrong
    outputs): globaltimer at entry and end, clock64 at entry, end, and when each of the first
    ``PROBE_TILES`` tiles has landed and is done."""
    G = SplitGeometry.of(dims, q_tokens=q_tokens, config=config, sm_scale=sm_scale, probe=probe)
    D, DV, H, Q = G.D, G.DV, G.H, G.Q

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
        C = T.int64()  # rows per layer: L * C * 576 may pass 2^31
        S = T.int32()
        q = T.match_buffer(q_h, (B, Q, H, D), "float16")  # [B, Q, H, 576]
        kv = T.match_buffer(kv_h, (L, C, D), "float16")  # [L, C, 576]
        kv_indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
        o_part = T.match_buffer(o_part_h, (S, B, Q, H, DV), "float32")  # [S, B, Q, H, 512]
        lse_part = T.match_buffer(lse_part_h, (S, B, Q, H), "float32")  # [S, B, Q, H]
        o = T.match_buffer(o_h, (B, Q, H, DV), "float16")  # [B, Q, H, 512]
        lse = T.match_buffer(lse_h, (B, Q, H), "float32")  # [B, Q, H]

        sid = T.launch_thread("blockIdx.x", S)
        b = T.launch_thread("blockIdx.y", B)
        tid = T.launch_thread("threadIdx.x", G.NT)
        kvs = T.alloc_buffer((G.ST, G.BN, G.DP), "float16", scope="shared.dyn")  # tile ring
        qs = T.alloc_buffer((G.MT * 16, G.QP), "float16", scope="shared.dyn")  # Q (or its tail)
        ps = T.alloc_buffer((G.MT * 16, G.BNP), "float16", scope="shared.dyn")
        red_m = T.alloc_buffer((G.WN, G.MT * 16), "float32", scope="shared.dyn")
        red_l = T.alloc_buffer((G.WN, G.MT * 16), "float32", scope="shared.dyn")
        bars = T.alloc_buffer((G.ST,), "uint64", scope="shared")  # TMA: one mbarrier per slot
        acc_o = T.alloc_buffer((G.NO * 4,), "float32", scope="local")
        acc_s = T.alloc_buffer((G.NS * 8,), "float32", scope="local")  # 2 k-chains
        a_frag = T.alloc_buffer((8,), "float16", scope="local")
        q_frag = T.alloc_buffer((G.QF,), "float16", scope="local")  # q_regs: Q's A fragments
        b_frag = T.alloc_buffer((8,), "float16", scope="local")
        m_i = T.alloc_buffer((2,), "float32", scope="local")
        l_i = T.alloc_buffer((2,), "float32", scope="local")
        m_new = T.alloc_buffer((2,), "float32", scope="local")
        alpha = T.alloc_buffer((2,), "float32", scope="local")
        out4 = T.alloc_buffer((4,), "float32", scope="local")  # one lane's float4 of O
        stamp = T.alloc_buffer((G.NSTAMP,), "uint32", scope="local")  # probe builds only
        _probe_entry(G)

        if G.pdl:  # q, kv_indptr (and the cache row) come from the kernels before
            grid_dependency.wait()
        lane = T.meta_var(tid % 32)
        wm = T.meta_var(tid // 32 // G.WN)
        wn = T.meta_var(tid // 32 % G.WN)
        # per-CTA scalars, computed once: start row, rows, splits used, split begin / end
        geo = T.alloc_buffer((5,), "int32", scope="local")
        geo[0] = kv_indptr[b]
        geo[1] = kv_indptr[b + 1] - geo[0]
        geo[4] = effective_splits(geo[1], S, block_n=G.BN, min_split_rows=G.MR)
        rows = T.meta_var(split_range(geo[1], sid, geo[4], block_n=G.BN))
        geo[2] = rows[0]
        geo[3] = rows[1]
        start = T.meta_var(geo[0])
        n = T.meta_var(geo[1])
        lo = T.meta_var(geo[2])
        hi = T.meta_var(geo[3])
        ntiles = T.meta_var(T.truncdiv(T.max(hi - lo, 0) + G.BN - 1, G.BN))  # 0 past `used`
        # A CTA past its sequence's used splits loads and stores nothing (no tiles, no Q, no
        # output): it only runs the fixed epilogue (TVM cannot put barriers under a condition).
        # At the end the same test reads `lo < n or sid == 0` (equivalent, see split_range):
        # geo[4] kept live through the tile loop spills at 16 warps (Q=4).
        used = T.meta_var(sid < geo[4])
        used_end = T.meta_var(lo < n or sid == 0)
        # the sequence's only split (an empty sequence's too) writes O and LSE itself: the
        # merge skips it
        single = T.meta_var(sid == 0 and hi >= n)
        if G.TMA:
            if tid == 0:
                for i in T.unroll(G.ST):
                    T.ptx.mbarrier.init.shared.b64(bars.ptr_to([i]), T.uint32(1))
                T.evaluate(T.ptx["fence.proxy.async.shared::cta"]())
            T.tvm_storage_sync("shared")
        _load_q(G)
        _prologue(G)
        for e in T.unroll(G.NO * 4):
            acc_o[e] = T.float32(0)
        for k in T.unroll(2):
            m_i[k] = T.float32(_NEG)
            l_i[k] = T.float32(0)

        for kt in range(ntiles):
            _wait_tile(G, kt)
            st_off = T.meta_var(kt % G.ST * (G.BN * G.DP))
            _scores(G, kt, st_off)
            T.tvm_storage_sync("shared")
            _softmax(G)
            T.tvm_storage_sync("shared")
            _pv(G, st_off)
            T.tvm_storage_sync("shared")
            _probe_tile(G, kt, 5)  # done
            _fill_slot(G, kt + G.ST, kt % G.ST)  # every warp is done with slot kt % ST

        T.evaluate(T.ptx.cp.async_.wait_group(0))
        _row_sums(G)
        _store_o(G)
        _store_lse(G)
        if G.pdl:
            # the merge may launch now; at the start its CTAs would crowd the few SMs without
            # a split CTA, and the merge takes as long as its busiest SM
            grid_dependency.launch_dependents()
        _probe_exit(G)

    return split
