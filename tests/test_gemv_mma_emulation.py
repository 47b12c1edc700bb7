"""The tensor-core GEMV's index math (``schedules/gemv_mma.py``), checked numerically on the CPU.

The kernel itself only runs on a GPU; CPU CI compiles it (HMMA, no spills) but cannot tell a
wrong lane / fragment index from a right one. This test emulates it with numpy, driven by the
kernel's own index formulas (``GM.k_col``, ``GM.a_row``, ``GM.frag_a``, ``GM.c_row``,
``GM.w_row``, ...: the functions the kernel calls on TIR expressions, called here on ints and
arrays): every block, warp, lane and step loads its vectors into per-lane registers, the
fragments are built from them, and each ``mma.sync.m16n8k16`` is done as a matrix product of the
A (16x16) and B (16x8) operands that the PTX ISA's fragment layouts (written down below,
independently of the kernel) assemble from the 32 lanes' registers; C goes back to the lanes by
the same ISA layout, then the block sum through ``red`` and the epilogue use the kernel's
formulas again. The result is compared with a plain float64 reference. Registers and ``red``
start as NaN, outputs as NaN with a write count: an unloaded register, an unwritten ``red`` cell,
a missed or doubly stored output all show.
"""

from __future__ import annotations

import numpy as np
import pytest

from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import gemv_mma as GM

# ------------------------------------------------------- PTX ISA fragment layouts (m16n8k16)
# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": lane = 4 g + c
# (groupID g, threadID_in_group c); .f16/.bf16 A: a0..a7 (two halves per .b32 register),
# B: b0..b3, .f32 C/D: c0..c3.
_LANE = np.arange(32)
_g, _c = _LANE // 4, _LANE % 4
_A_POS = [  # (row, k) of a0..a7
    (_g, 2 * _c),
    (_g, 2 * _c + 1),
    (_g + 8, 2 * _c),
    (_g + 8, 2 * _c + 1),
    (_g, 2 * _c + 8),
    (_g, 2 * _c + 9),
    (_g + 8, 2 * _c + 8),
    (_g + 8, 2 * _c + 9),
]
_B_POS = [(2 * _c, _g), (2 * _c + 1, _g), (2 * _c + 8, _g), (2 * _c + 9, _g)]  # (k, n) b0..b3
_C_POS = [(_g, 2 * _c), (_g, 2 * _c + 1), (_g + 8, 2 * _c), (_g + 8, 2 * _c + 1)]  # (row, n)


def _table(pos):
    """[32, regs] row and column index arrays of a fragment layout."""
    return np.stack([p[0] for p in pos], 1), np.stack([p[1] for p in pos], 1)


A_ROW, A_K = _table(_A_POS)
B_K, B_N = _table(_B_POS)
C_ROW, C_N = _table(_C_POS)


def test_fragment_layouts_cover_each_element_once():
    for (r, c), shape in (((A_ROW, A_K), (16, 16)), ((B_K, B_N), (16, 8)), ((C_ROW, C_N), (16, 8))):
        count = np.zeros(shape, int)
        np.add.at(count, (r, c), 1)
        assert (count == 1).all()


# ----------------------------------------------------------------------------- the emulator


def _load(mat, lead, row, col, ok):
    """8-wide vectors ``mat[lead, row, col:col + 8]`` where ``ok`` (a predicated-off load
    leaves zeros); every load that happens must be in bounds (the kernel does not clamp)."""
    lead, row, col, ok = np.broadcast_arrays(lead, row, col, ok)
    _, n_row, n_col = mat.shape
    if ok.any():
        assert row[ok].min() >= 0 and row[ok].max() < n_row, "row out of bounds"
        assert col[ok].min() >= 0 and col[ok].max() + 8 <= n_col, "column out of bounds"
    cols = np.where(ok, col, 0)[..., None] + np.arange(8)
    v = mat[np.where(ok, lead, 0)[..., None], np.where(ok, row, 0)[..., None], cols]
    return np.where(ok[..., None], v, 0.0)


def _emulate(cfg, *, k, slots, silu, n_tok, n_blocks, wvec, xvec, store, scale=1.0, n_items=1):
    """One launch: ``n_blocks`` blocks (``bx = b % n_blocks``, item ``b // n_blocks``: head,
    (token, slot) entry or token), ``cfg.warps * slots`` warps of 32 lanes, all as numpy axes
    ``[block, warp, lane]``. ``wvec(bx, item, warp, r, kk, ok)`` / ``xvec(item, warp, n, kk, ok)``:
    the kernel's 8-wide loads; ``scale(item, warp)``; ``store(bx, item, n, r, v)``."""
    TL, U, WK = cfg.tiles, cfg.unroll, cfg.warps
    nwarp, rows = WK * slots, GM.out_rows(TL, silu)
    spw, nit = GM.k_split(k, warps=WK, unroll=U)
    blk = np.arange(n_blocks * n_items)[:, None, None]
    bx, item = blk % n_blocks, blk // n_blocks
    warp = np.arange(nwarp)[None, :, None]
    lane = _LANE[None, None, :]
    ks = GM.kwarp_of(warp, warps=WK)  # = warp where slots == 1 (the kernel passes tid // 32)
    shape = (len(blk), nwarp, 32)

    # warp_dot
    acc = np.zeros((*shape, TL * 8))
    for it in range(nit):
        wa = np.full((*shape, U * TL * 16), np.nan)
        xb = np.full((*shape, U * 8), np.nan)
        for u in range(U):
            kk = GM.k_col(ks, it, u, lane, spw=spw, unroll=U)
            ok = GM.k_ok(it, u, kk, spw=spw, unroll=U, k=k)
            for t in range(TL):
                for h in range(2):
                    at = GM.wa_at(u, t, h, tiles=TL)
                    wa[..., at : at + 8] = wvec(bx, item, warp, GM.a_row(t, h, lane), kk, ok)
            n = GM.b_tok(lane)
            at = GM.xb_at(u)
            xb[..., at : at + 8] = xvec(item, warp, n, kk, ok & (n < n_tok))
        for u in range(U):
            for t in range(TL):
                for q in range(2):
                    fa = np.full((*shape, 12), np.nan)
                    for p in range(4):
                        fa[..., GM.FA_B + p] = xb[..., GM.frag_b(p, u, q)]
                    for p in range(8):
                        fa[..., p] = wa[..., GM.frag_a(p, u, t, q, tiles=TL)]
                    a = np.full((*shape[:2], 16, 16), np.nan)
                    b = np.full((*shape[:2], 16, 8), np.nan)
                    a[..., A_ROW, A_K] = fa[..., 0:8]  # A operand at fa + 0
                    b[..., B_K, B_N] = fa[..., GM.FA_B : GM.FA_B + 4]
                    c = a @ b
                    at = GM.acc_at(t, q)
                    acc[..., at : at + 4] += c[..., C_ROW, C_N]

    # to_shared
    red = np.full((len(blk), nwarp, TL * 16, GM.MAX_TOKENS), np.nan)
    sc = np.broadcast_to(scale(item, warp) if callable(scale) else scale, shape[:2])[..., None]
    for t in range(TL):
        for e in range(4):
            red[blk, warp, GM.c_row(t, e, lane), GM.c_tok(e, lane)] = sc * (
                acc[..., GM.acc_at(t, 0) + e] + acc[..., GM.acc_at(t, 1) + e]
            )

    # reduce_store
    tid = np.arange(32 * nwarp)
    for i in range(GM.red_rounds(rows=rows, nwarp=nwarp)):
        idx = GM.red_idx(i, tid, nwarp=nwarp)
        sel = np.broadcast_to(GM.red_ok(idx, rows=rows, n_tok=n_tok), (len(blk), len(tid)))
        b_i, t_i = np.nonzero(sel)
        idx, b_i = idx[t_i], blk[b_i, 0, 0]
        tot = [
            red[b_i[:, None], np.arange(nwarp), GM.red_at(idx, s, rows=rows)[:, None],
                GM.red_tok(idx)[:, None]].sum(1)
            for s in range(2 if silu else 1)
        ]  # fmt: skip
        v = GM.silu_mul(tot[0], tot[1]) if silu else tot[0]
        store(b_i % n_blocks, b_i // n_blocks, GM.red_tok(idx), GM.red_row(idx), v)


class _Out:
    """NaN-initialised output with a write count per element."""

    def __init__(self, shape):
        self.y = np.full(shape, np.nan)
        self.count = np.zeros(shape, int)

    def put(self, index, v):
        np.add.at(self.count, index, 1)
        self.y[index] = v

    def check(self, ref):
        assert (self.count == 1).all(), f"outputs stored {np.unique(self.count)} times"
        np.testing.assert_allclose(self.y, ref, rtol=1e-9, atol=1e-9)


def _halves(rng, *shape):
    """Random values exact in float16, as float64."""
    return rng.standard_normal(shape).astype(np.float16).astype(np.float64)


def _silu(v):
    return v / (1 + np.exp(-v))


# ----------------------------------------------------------------------------- dense (gemm.gemm)


def _dense(m, n, k, epilogue, cfg, batch, seed):
    rng = np.random.default_rng(seed)
    silu = epilogue == "silu_mul"
    rows, heads = G.weight_layout(n, k, epilogue=epilogue)[0], batch or 1
    cfg = cfg or GM.default_config(rows=rows, k=k, items=heads, epilogue=epilogue)
    x = _halves(rng, m, heads, k)
    w_torch = _halves(rng, heads, rows, k)  # [gate; up] for silu_mul
    w = G.transform_weight(w_torch, epilogue=epilogue)
    res = _halves(rng, m, heads, n)
    out = _Out((m, heads, n))

    def wvec(bx, hd, warp, r, kk, ok):
        row = GM.w_row(bx, r, rows=rows, tiles=cfg.tiles, silu=silu)
        return _load(w, hd, row, kk, ok)

    def xvec(hd, warp, tok, kk, ok):  # x[tok, hd, kk:kk + 8]
        return _load(x.transpose(1, 0, 2), hd, tok, kk, ok)

    def store(bx, hd, tok, r, v):
        col = GM.out_col(bx, r, tiles=cfg.tiles, silu=silu)
        keep = col < n
        tok, hd, col, v = tok[keep], hd[keep], col[keep], v[keep]
        out.put((tok, hd, col), v + res[tok, hd, col] if epilogue == "residual" else v)

    _emulate(
        cfg, k=k, slots=1, silu=silu, n_tok=m, n_blocks=-(-rows // (16 * cfg.tiles)),
        wvec=wvec, xvec=xvec, n_items=heads, store=store,
    )  # fmt: skip
    ref = np.einsum("mhk,hnk->mhn", x, w_torch)
    if silu:
        ref = _silu(ref[..., :n]) * ref[..., n:]
    elif epilogue == "residual":
        ref = ref + res
    out.check(ref)


DENSE = [  # m, n, k, epilogue, config, batch
    (3, 100, 200, None, GM.GemvMmaConfig(tiles=1, warps=4, unroll=2), None),  # ragged rows, K % 32
    (
        8,
        100,
        1000,
        "residual",
        GM.GemvMmaConfig(tiles=2, warps=3, unroll=4),
        None,
    ),  # uneven K split
    (1, 96, 520, "silu_mul", GM.GemvMmaConfig(tiles=4, warps=2, unroll=2), None),
    (5, 64, 4096, None, GM.GemvMmaConfig(tiles=1, warps=16, unroll=8), None),
    (2, 64, 264, "silu_mul", GM.GemvMmaConfig(tiles=2, warps=32, unroll=16), None),  # idle warps
    (7, 33, 72, None, GM.GemvMmaConfig(tiles=2, warps=1, unroll=16), None),
    (4, 40, 136, "residual", GM.GemvMmaConfig(tiles=1, warps=5, unroll=3), 3),  # per-head products
    (6, 17, 328, None, GM.GemvMmaConfig(tiles=4, warps=7, unroll=2), None),
    (8, 200, 1000, None, None, 2),  # default config
    (1, 128, 2048, "silu_mul", None, None),
]


@pytest.mark.parametrize(
    "m,n,k,epilogue,cfg,batch", DENSE, ids=[f"{c[0]}x{c[1]}x{c[2]}-{c[3]}" for c in DENSE]
)
def test_dense_emulation(m, n, k, epilogue, cfg, batch):
    _dense(m, n, k, epilogue, cfg, batch, seed=m * 1000 + n + k)


def test_dense_emulation_all_candidates():
    """Every config the sweep may pick, on one ragged shape per epilogue."""
    for m, n, k, epilogue in ((3, 40, 1000, None), (2, 64, 1000, "silu_mul")):
        rows = G.weight_layout(n, k, epilogue=epilogue)[0]
        for cfg in GM.candidates(rows=rows, k=k, epilogue=epilogue):
            _dense(m, n, k, epilogue, cfg, None, seed=7)


# ------------------------------------------------------------------------------- MoE GEMVs


def _moe_gate_up(t_num, hidden, inter, experts, top_k, cfg, seed):
    rng = np.random.default_rng(seed)
    rows = 2 * inter
    x = _halves(rng, 1, t_num, hidden)
    ids = rng.integers(0, experts, (t_num, top_k))
    w_torch = _halves(rng, experts, rows, hidden)  # [E, gate; up, D]
    w = G.transform_weight(w_torch, epilogue="silu_mul")
    out = _Out((t_num * top_k, inter))

    def wvec(bx, ent, warp, r, kk, ok):
        row = GM.w_row(bx, r, rows=rows, tiles=cfg.tiles, silu=True)
        return _load(w, ids[ent // top_k, ent % top_k], row, kk, ok)

    def xvec(ent, warp, tok, kk, ok):  # x[ent // top_k, kk:kk + 8]
        return _load(x, 0, ent // top_k, kk, ok)

    def store(bx, ent, tok, r, v):
        out.put((ent, GM.out_col(bx, r, tiles=cfg.tiles, silu=True)), v)

    _emulate(
        cfg, k=hidden, slots=1, silu=True, n_tok=1, n_blocks=rows // (16 * cfg.tiles),
        wvec=wvec, xvec=xvec, n_items=t_num * top_k, store=store,
    )  # fmt: skip
    g = np.einsum("td,tjnd->tjn", x[0], w_torch[ids])
    out.check((_silu(g[..., :inter]) * g[..., inter:]).reshape(t_num * top_k, inter))


def _moe_down(t_num, hidden, inter, experts, top_k, cfg, seed):
    rng = np.random.default_rng(seed)
    h = _halves(rng, 1, t_num * top_k, inter)
    ids = rng.integers(0, experts, (t_num, top_k))
    w = _halves(rng, experts, hidden, inter)
    weights = rng.random((t_num, top_k))
    out = _Out((t_num, hidden))

    def slot(warp):
        return GM.slot_of(warp, warps=cfg.warps)

    def wvec(bx, t, warp, r, kk, ok):
        row = GM.w_row(bx, r, rows=hidden, tiles=cfg.tiles, silu=False)
        return _load(w, ids[t, slot(warp)], row, kk, ok)

    def xvec(t, warp, tok, kk, ok):  # h[t * top_k + j, kk:kk + 8]
        return _load(h, 0, t * top_k + slot(warp), kk, ok)

    def store(bx, t, tok, r, v):
        col = GM.out_col(bx, r, tiles=cfg.tiles, silu=False)
        keep = col < hidden
        out.put((t[keep], col[keep]), v[keep])

    _emulate(
        cfg, k=inter, slots=top_k, silu=False, n_tok=1, n_blocks=-(-hidden // (16 * cfg.tiles)),
        wvec=wvec, xvec=xvec, scale=lambda t, warp: weights[t[..., 0], slot(warp[..., 0])],
        n_items=t_num, store=store,
    )  # fmt: skip
    per_slot = np.einsum("tji,tjdi->tjd", h[0].reshape(t_num, top_k, inter), w[ids])
    out.check(np.einsum("tj,tjd->td", weights, per_slot))


MOE = [  # tokens, hidden, inter, experts, top_k, config
    (3, 200, 96, 4, 2, GM.GemvMmaConfig(tiles=4, warps=3, unroll=2)),
    (2, 136, 64, 3, 3, GM.GemvMmaConfig(tiles=2, warps=5, unroll=4)),
    (1, 2048, 64, 8, 2, None),  # default config
]
MOE_DOWN = [
    (2, 100, 200, 4, 3, GM.GemvMmaConfig(tiles=2, warps=3, unroll=4)),
    (1, 72, 1000, 4, 6, GM.GemvMmaConfig(tiles=1, warps=4, unroll=2)),
    (3, 40, 136, 3, 2, GM.GemvMmaConfig(tiles=1, warps=1, unroll=16)),
    (1, 48, 1408, 8, 6, None),  # default config
]


@pytest.mark.parametrize("t_num,hidden,inter,experts,top_k,cfg", MOE)
def test_moe_gate_up_emulation(t_num, hidden, inter, experts, top_k, cfg):
    cfg = cfg or GM.default_config(rows=2 * inter, k=hidden, items=top_k, epilogue="silu_mul")
    _moe_gate_up(t_num, hidden, inter, experts, top_k, cfg, seed=hidden + inter)


@pytest.mark.parametrize("t_num,hidden,inter,experts,top_k,cfg", MOE_DOWN)
def test_moe_down_emulation(t_num, hidden, inter, experts, top_k, cfg):
    cfg = cfg or GM.default_config(rows=hidden, k=inter, items=1, slots=top_k)
    _moe_down(t_num, hidden, inter, experts, top_k, cfg, seed=hidden + inter)
