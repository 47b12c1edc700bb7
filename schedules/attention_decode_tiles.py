"""Compile-time constants of the CUDA decode split kernel (``attention_decode_mma``): which
k-steps of Q stay in registers, where Q is staged, and ``SplitGeometry``, every constant of the
kernel body derived from the dims, heads, query tokens and a config.
"""

from __future__ import annotations

import dataclasses

from mla_compiler.model_export.config import MLADims

_LOG2E = 1.4426950408889634

PROBE_TILES = 4  # tiles whose landing / end a probe build stamps
# q_regs: Q's first k-steps kept in registers (112 of the 255 a thread has at 8 warps: 254
# used, 0 spills; all 36 of 576 / 16, or 32, spill under TVM's ptxas register-usage level
# 10), the rest reloaded from shared memory per tile
Q_RESIDENT_STEPS = 28


def stages_q_in_ring(config) -> bool:
    """Whether Q is staged in the cp.async ring's last slot (read into registers, then the slot
    gets its tile), leaving only the non-resident k-steps of Q in a shared buffer of their own:
    how a 3-stage q_regs ring fits 227 KB."""
    return config.q_regs and config.stages >= 3 and not config.tma


def q_tail_columns(dims: MLADims, config) -> int:
    """Columns of Q the split kernel keeps in shared memory for the whole loop (all of them,
    or the non-resident k-steps' when Q is staged in the ring)."""
    if not stages_q_in_ring(config):
        return dims.latent_dim
    return dims.latent_dim - 16 * min(dims.latent_dim // 16, Q_RESIDENT_STEPS)


@dataclasses.dataclass(frozen=True)
class SplitGeometry:
    """Every compile-time constant of the split kernel, from the dims, heads, query tokens and
    the config (``keep`` has checked it); short names, as the fragment arithmetic uses them."""

    D: int  # latent row (576)
    DV: int  # V columns (kv_lora_rank)
    H: int  # heads
    Q: int  # new tokens per sequence
    BN: int  # cache rows per tile
    ST: int  # ring stages
    WN: int  # warps per 16-row M tile
    TMA: bool
    MR: int  # min_split_rows
    QRK: int  # k-steps of Q in registers (q_regs), else 0
    SQ: bool  # Q staged in ring slot ST - 1; qs keeps only columns QRK * 16 ..
    QC: int  # columns of qs
    scale_log2: float
    probe: bool
    pdl: bool

    @classmethod
    def of(cls, dims: MLADims, *, q_tokens: int, config, sm_scale, probe: bool):
        D = dims.latent_dim
        return cls(
            D=D,
            DV=dims.kv_lora_rank,
            H=dims.heads,
            Q=q_tokens,
            BN=config.block_n,
            ST=config.stages,
            WN=config.warps_n,
            TMA=config.tma,
            MR=config.min_split_rows,
            QRK=min(D // 16, Q_RESIDENT_STEPS) if config.q_regs else 0,
            SQ=stages_q_in_ring(config),
            QC=q_tail_columns(dims, config),
            scale_log2=float(sm_scale) * _LOG2E,
            probe=probe,
            pdl=config.pdl,
        )

    R = property(lambda g: g.H * g.Q, doc="valid query rows")
    MT = property(lambda g: -(-g.R // 16), doc="16-row M tiles, one warp group each")
    SN = property(lambda g: g.BN // g.WN, doc="score columns per warp")
    OW = property(lambda g: g.DV // g.WN, doc="output columns per warp")
    NS = property(lambda g: g.SN // 8, doc="n8 tiles of S per warp")
    NO = property(lambda g: g.OW // 8, doc="n8 tiles of O per warp")
    DP = property(lambda g: g.D + 8, doc="padded smem row (halves)")
    BNP = property(lambda g: g.BN + 8, doc="padded row of P")
    NT = property(lambda g: 32 * g.MT * g.WN, doc="threads")
    CH = property(lambda g: g.D // 8, doc="16-byte chunks per row")
    KV_ITERS = property(lambda g: -(-(g.BN * g.CH) // g.NT), doc="copies per thread per tile")
    Q_ITERS = property(lambda g: -(-(g.MT * 16 * g.CH) // g.NT), doc="copies per thread of Q")
    NSTAMP = property(lambda g: 4 + 2 * PROBE_TILES if g.probe else 1, doc="probe stamps")
    QF = property(lambda g: max(g.QRK, 1) * 8, doc="halves of Q's register fragments")
    QO = property(lambda g: g.D - g.QC, doc="Q column of qs column 0")
    QP = property(lambda g: g.QC + 8, doc="padded qs row")
    QCH = property(lambda g: g.QC // 8, doc="16-byte chunks of a qs row")
    QT_ITERS = property(lambda g: -(-(g.MT * 16 * g.QCH) // g.NT), doc="copies per thread of qs")
