"""Tile configs of the CUDA prefill kernels and every compile-time constant derived from them.

``PrefillConfig`` is what tuning searches and artifacts record; ``Geometry`` is the config resolved
against a layout (head dims, whether V is part of the K rows): thread counts, warp grid,
shared-memory offsets, register estimate. ``fits`` prunes configs a target cannot run.
"""

from __future__ import annotations

import dataclasses

from .target import register_cap

_PAD = 8  # halfs of padding per shared-memory row: rows 16 B apart mod 128 B, no ldmatrix conflicts
# Registers the pipelined loop needs beside its accumulators (S, O, two P buffers): under
# ptxas 128 x 96 x 8 warps used 254 of 255; 128 x 128 x 8 and 192 x 64 x 12 warps spilled.
_PIPELINE_REGISTERS = 90


# The three feature axes of a CUDA prefill config, each a chain of steps (a step needs the ones
# before it), so each is one field rather than a boolean per step.
MMA_FORMS = (
    "mma_sync",  # mma.sync fragments loaded with ldmatrix
    "wgmma",  # sm_90a warpgroup MMAs, operands in core-matrix tiled shared memory
    "wgmma_swizzled",  # wgmma, operands in 128-byte swizzled rows
)
P_OPERANDS = (
    "smem",  # P·V reads P from shared memory (or from the A fragments, mma.sync)
    # wgmma, unsplit S: P·V takes P from registers (rs form). With split V columns (d_split > 1)
    # that is the hand-off: warpgroup 0 alone computes S and the softmax and passes P and the
    # rescale factors to the others through shared memory; they issue the KV loads meanwhile.
    "regs",
    "regs_pipelined",  # regs, and tile i's softmax runs under tile i-1's P·V wgmma (FA3)
)
KV_LOADS = (
    "cp_async",  # every thread issues its share of 16-byte cp.async copies
    # swizzled wgmma, separate K and V (decompressed): one thread loads each KV tile with TMA
    # (``cp.async.bulk.tensor`` through tensor maps the host encodes per call) into an mbarrier ring
    "tma",
    # tma, one warpgroup a row block: one extra warp issues the loads; the consumer warps wait on
    # a slot's "full" mbarrier and release its "empty" one, no CTA-wide barrier a tile (FA3)
    "tma_producer_warp",
    # a whole producer warpgroup (one lane issues) that gives its registers up with `setmaxnreg`
    # (to 24), so the consumer warps get 240 each (8 warps) instead of 168
    "tma_producer_warpgroup",
)
# a database record of an older version spells the chains as booleans
_LEGACY_FIELDS = ("wgmma", "swizzle", "p_regs", "pipelined", "tma", "producer", "setmaxnreg")


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """CUDA tile shape: ``tile_q`` query rows per block, ``tile_kv`` KV rows per pipeline step;
    the MMA form, where P·V takes P from and how KV tiles are loaded (``MMA_FORMS``,
    ``P_OPERANDS``, ``KV_LOADS``)."""

    tile_q: int
    tile_kv: int
    warps: int
    stages: int
    split_s: bool = True  # with split V columns, split S's columns too and share P via smem
    mma: str = "mma_sync"
    p_operand: str = "smem"
    # swizzled wgmma without hand-off: each tile's S wgmma is issued before the next tile's
    # copies, so the copies' address math and LDGSTS issue run under S
    s_first: bool = False
    kv_loads: str = "cp_async"

    def __post_init__(self):
        for name, allowed in (
            ("mma", MMA_FORMS),
            ("p_operand", P_OPERANDS),
            ("kv_loads", KV_LOADS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"PrefillConfig.{name}={getattr(self, name)!r}: use one of {allowed}"
                )

    @classmethod
    def from_dict(cls, data: dict) -> PrefillConfig:
        """From a database record, today's fields or an older version's booleans."""
        data = dict(data)
        if any(k in data for k in _LEGACY_FIELDS):
            old = {k: bool(data.pop(k, False)) for k in _LEGACY_FIELDS}
            data["mma"] = MMA_FORMS[old["wgmma"] * (1 + old["swizzle"])]
            p = old["wgmma"] and old["p_regs"]
            data["p_operand"] = P_OPERANDS[p * (1 + old["pipelined"])]
            steps = (old["tma"], old["tma"] and old["producer"])
            steps += (steps[1] and old["setmaxnreg"],)
            data["kv_loads"] = KV_LOADS[sum(steps)]
        return cls(**data)

    # the steps of the chains, as the CUDA body reads them
    wgmma = property(lambda self: self.mma != "mma_sync")
    swizzle = property(lambda self: self.mma == "wgmma_swizzled")
    p_regs = property(lambda self: self.p_operand != "smem")
    pipelined = property(lambda self: self.p_operand == "regs_pipelined")
    tma = property(lambda self: self.kv_loads != "cp_async")
    producer = property(lambda self: self.kv_loads.startswith("tma_producer"))
    setmaxnreg = property(lambda self: self.kv_loads == "tma_producer_warpgroup")

    @property
    def producer_warps(self) -> int:
        """Warps a block launches besides the compute warps."""
        return _producer_warps(self.producer, self.setmaxnreg)


def _producer_warps(producer: bool, setmaxnreg: bool) -> int:
    return (4 if setmaxnreg else 1) if producer else 0


# setmaxnreg's split of a 64K register file: the producer warpgroup keeps this many a thread,
# the consumer warps share the rest (in steps of 8)
PRODUCER_REGISTERS = 24


def consumer_registers(warps: int) -> int:
    """Registers a thread of ``warps`` consumer warps gets once the producer warpgroup gave
    its own up (`setmaxnreg`); ptxas bounds the code after the increase by it."""
    return min(240, (65536 - 128 * PRODUCER_REGISTERS) // (warps * 32) // 8 * 8)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every compile-time constant of the CUDA body, derived from a layout and a config."""

    dk: int
    dv: int
    tq: int
    tkv: int
    warps: int
    stages: int
    shared_kv: bool
    split: bool
    wgmma: bool
    swizzle: bool = False
    p_regs: bool = False
    pipelined: bool = False
    early_s: bool = False
    tma: bool = False
    producer: bool = False
    setmaxnreg: bool = False

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def block_threads(self) -> int:
        """Threads a block launches: the compute warps, and the producer warp(group)."""
        return self.threads + 32 * _producer_warps(self.producer, self.setmaxnreg)

    @property
    def m_warps(self) -> int:
        return self.tq // 16

    @property
    def d_split(self) -> int:
        return self.warps // self.m_warps

    @property
    def dv_w(self) -> int:
        return self.dv // self.d_split

    @property
    def split_s(self) -> bool:
        """Warps sharing a row slice each compute ``1/d_split`` of S and exchange P in smem."""
        return self.split and self.d_split > 1

    @property
    def s_cols(self) -> int:
        """Columns of S one warp computes per KV tile."""
        return self.tkv // self.d_split if self.split_s else self.tkv

    @property
    def pad(self) -> int:
        """Halfs appended to each shared row (mma.sync); wgmma tiles are unpadded core matrices."""
        return 0 if self.wgmma else _PAD

    @property
    def handoff(self) -> bool:
        """Warpgroup 0 computes S and the softmax for all; P reaches the others via smem."""
        return self.wgmma and self.p_regs and not self.split_s and self.d_split > 1

    @property
    def handoff_off(self) -> int:
        """Offset of the P hand-off tile within a ring slot: the K tile's rope columns.

        Swizzled, a ``tkv``-row tile is ``dk / 64`` blocks of ``tkv x 64``; the blocks past ``dv``
        hold only the rope key, dead once S is done. P [tq, tkv] fits there when tq <= dk - dv.
        """
        return self.dv * self.tkv

    @property
    def split_ring(self) -> bool:
        """Pipelined with two stages: K loads one tile ahead of V (separate K, V layouts)."""
        return self.pipelined and self.stages == 2 and not self.shared_kv

    @property
    def s_first(self) -> bool:
        """Each tile's S wgmma is issued before the next tile's copies (swizzled, no hand-off)."""
        return self.early_s and self.swizzle and not self.handoff and not self.pipelined

    @property
    def kv_loaders(self) -> int:
        """Threads that issue the KV tile copies (the hand-off keeps warpgroup 0 out of them)."""
        return self.threads - 128 if self.handoff else self.threads

    @property
    def p_in_smem(self) -> bool:
        return self.split_s or (self.wgmma and not self.p_regs)

    @property
    def p_in_k(self) -> bool:
        """P [tq, tkv] lives in the K tile's own rows, in columns ``dv..dv+tkv``.

        Absorbed MLA with ``tile_q <= tile_kv <= 64``: once S is done, the 64 rope columns of the
        current K tile are dead (P·V reads only the first ``dv``), so P needs no smem of its own.
        """
        return self.p_in_smem and self.shared_kv and self.tq <= self.tkv <= self.dk - self.dv

    @property
    def p_rows(self) -> int:
        """Rows of the tile P is stored in (the K tile's when P lives there)."""
        return self.tkv if self.p_in_k else self.tq

    @property
    def red_floats(self) -> int:
        n = self.tq * self.d_split
        return max(n, 256) if self.swizzle else n

    @property
    def p_width(self) -> int:
        """Width (halfs) of the rows P is stored in, and its first column there."""
        return self.dk if self.p_in_k else self.tkv

    @property
    def p_col0(self) -> int:
        return self.dv if self.p_in_k else 0

    @property
    def p_stride(self) -> int:
        return self.p_width + self.pad

    @property
    def p_off(self) -> int:
        """Shared-memory P tile [tq, tkv] (f16) of the split-S scheme, after the KV ring."""
        return self.k_off + self.stages * self.stage_halfs

    @property
    def dkp(self) -> int:
        return self.dk + self.pad

    @property
    def v_width(self) -> int:
        """Row width of the shared V tile: the K rows themselves when V is part of them."""
        return self.dk if self.shared_kv else self.dv

    @property
    def v_stride(self) -> int:
        return self.v_width + self.pad

    @property
    def k_off(self) -> int:
        return self.tq * self.dkp

    @property
    def v_off(self) -> int:
        return self.k_off if self.shared_kv else self.k_off + self.tkv * self.dkp

    @property
    def stage_halfs(self) -> int:
        return self.tkv * (self.dkp + (0 if self.shared_kv else self.v_stride))

    @property
    def tiles_end(self) -> int:
        """End (halfs) of Q, the KV ring and P."""
        return self.p_off + (self.tq * self.p_stride if self.p_in_smem and not self.p_in_k else 0)

    @property
    def bar_off(self) -> int:
        """The TMA ring's mbarriers (8 B a slot) after every tile: a static buffer before the
        dynamic one would shift the tiles off the 1024-byte alignment of the swizzle."""
        return -(-self.tiles_end // 4) * 4

    @property
    def smem_halfs(self) -> int:
        bars = self.stages * (2 if self.producer else 1)  # "full" (and "empty") per slot
        return self.bar_off + 4 * bars if self.tma else self.tiles_end

    def iters(self, rows: int, width: int, threads: int) -> int:
        """Loop trips for ``threads`` threads to cp.async ``rows x width`` halfs, 16 B each."""
        return (rows * width // 8 + threads - 1) // threads

    @property
    def acc_registers(self) -> int:
        """f32 registers per thread held across the KV loop (O, S, P as f16 pairs)."""
        p = 0 if self.p_in_smem else self.tkv // 4 * (2 if self.pipelined else 1)
        return self.dv_w // 2 + self.s_cols // 2 + p


def geometry(config: PrefillConfig, layout) -> Geometry:
    return Geometry(
        dk=layout.dk,
        dv=layout.dv,
        tq=config.tile_q,
        tkv=config.tile_kv,
        warps=config.warps,
        stages=config.stages,
        shared_kv=bool(layout.shared_kv),
        split=bool(config.split_s),
        wgmma=bool(config.wgmma),
        swizzle=bool(config.wgmma and config.swizzle),
        p_regs=bool(config.wgmma and config.p_regs),
        pipelined=bool(config.wgmma and config.p_regs and config.pipelined),
        early_s=bool(config.s_first),
        tma=bool(config.tma),
        producer=bool(config.producer),
        setmaxnreg=bool(config.producer and config.setmaxnreg),
    )


def shared_bytes(config: PrefillConfig, layout) -> int:
    return geometry(config, layout).smem_halfs * 2


def fits(config: PrefillConfig, layout, smem_limit: int, *, has_wgmma: bool = False) -> bool:
    """Tile shape valid for the MMA layout, registers bounded, shared memory within the limit."""
    c = config
    if c.tile_q % 16 or c.tile_kv % 16 or c.stages < 2 or not 0 < c.warps <= 16:
        return False
    if layout.dk % 16 or layout.dv % 16 or (c.warps * 16) % c.tile_q:
        return False
    g = geometry(c, layout)
    if g.d_split < 1 or g.dv % (g.d_split * 16) or g.s_cols % (8 if c.wgmma else 16):
        return False
    if c.wgmma:
        # A warpgroup owns 64 rows; the d_split warpgroups of a row block split S's and O's
        # columns (m64nNk16 with N = s_cols, then N = dv_w <= 256).
        if not has_wgmma or c.tile_q % 64 or g.dv_w > 256:
            return False
        if g.d_split > 1 and not c.split_s and not g.handoff:
            return False
    if g.handoff and (
        g.d_split != 2 or not g.shared_kv or not g.swizzle or c.pipelined or g.tq > g.dk - g.dv
    ):
        return False  # P is handed over in the K tile's rope columns (swizzled blocks)
    if c.p_regs and (not c.wgmma or g.split_s):  # the rs form needs the warp's whole P rows
        return False
    if c.pipelined and (not c.p_regs or not c.swizzle or c.stages < 3 and not g.split_ring):
        return False  # P·V of tile i - 1 still reads its slot while tile i + 1 loads
    if c.s_first and not g.s_first:
        return False  # S goes first only in the plain swizzled wgmma loop
    if c.tma and (not g.swizzle or g.shared_kv or g.pipelined or g.handoff):
        return False  # TMA boxes are the 128-byte swizzled K and V blocks of the plain loop
    if c.producer and (not c.tma or not g.p_regs or g.d_split != 1 or g.s_first):
        return False  # the consumer warps must not exchange anything within a tile
    if c.setmaxnreg and (not c.producer or c.warps % 4):
        return False  # setmaxnreg acts on whole warpgroups
    regs = consumer_registers(c.warps) if c.setmaxnreg else register_cap(c.warps + 1)
    if c.producer and regs < 160:
        return False  # 12 warps + 1: 128 registers (4 warps in a sub-partition); 192 x 64 spills
    if c.swizzle:
        # 128-byte swizzle atoms: every operand row a whole number of 64-half blocks, P too
        widths = (g.dk, g.v_width, g.dv_w) + ((g.p_width,) if g.p_in_smem else ())
        if not c.wgmma or any(w % 64 for w in widths) or c.tile_kv % 8 or g.p_col0 % 64:
            return False
    if c.pipelined and g.acc_registers + _PIPELINE_REGISTERS > register_cap(c.warps):
        return False
    return g.acc_registers <= 200 and shared_bytes(c, layout) <= smem_limit
