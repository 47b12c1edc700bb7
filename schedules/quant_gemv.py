"""Decode GEMV on GGUF-quantized weights: ``y[m, n] = x[m, k] @ W^T``, W read as its raw blocks.

``quant_gemv(m, n, k, target=..., weight_format="q4_k")`` takes ``(x [m, k] dtype, wq [n,
row_bytes(k)] uint8, y [m, n] dtype)``. The weight stays in its GGUF bytes (no dequantized copy
anywhere); each value is decoded in registers by ``quant_formats.FORMATS[fmt].value`` and
summed in float32 for all ``m`` tokens (1..8) in one pass over the weight. One factory serves
every format: the format enters only through its block geometry and its decoder.

CUDA (:class:`QuantGemvConfig`). A lane owns whole *units* of ``unit`` blocks (no decode needs
another lane's bytes), their bytes a multiple of the shared-load width wanted (16: 1 block of
Q4_K, 8 of Q4_0; 4: 2 of Q6_K). ``lanes`` lanes split a row's units (``32 // lanes`` rows per
warp instruction), a lane takes ``row_iters`` rows (each x value it loads serves all),
``warps_k`` warps split K (sums meet in shared memory), ``warps_n`` split the rows. Per step a
warp copies the rows' chunk bytes its lanes decode next with coalesced vector loads (16 bytes
where the rows allow) into its shared slice; a lane reads its unit back with the unit's widest
aligned shared loads at compile-time offsets, so each byte the decoder asks for is a register
byte. (Lanes loading their own 144+-byte units from DRAM would hit a cache line each: 32 L1
wavefronts per load, about the rate DRAM delivers; the copy takes 4 per 512 bytes.) x is
staged once per block (float32, or ``dtype`` for many tokens), padded 16 bytes per unit against
bank conflicts. Lanes keep ``chains`` sums per (row, token) and meet through xor shuffles.
TVM's ThreadSync adds a block barrier after each step's copy (it cannot see that a slice is a
warp's own): a block's warps step in lockstep, blocks do not.

Decoding: ``fmt.value`` on a proxy of the lane's register bytes; each int -> float32 of a small
integer (quants, 6-bit scales) becomes ``bits(0x4B000000 | q) - 2^23``: a LOP3 and an FADD, not
a quarter-rate I2F, and exact (values stay bit-identical to gguf-py's). On CUDA 0x4B000000 is a
register the compilers cannot fold (``(q & 15) | M`` is then one LOP3, not two).

CPU (llvm): a plain kernel, rows in parallel; ``emulate=True`` runs the CUDA schedule's index
math instead (lanes as loops, shared memory as buffers, lane sums without shuffles): tests
check staging, unit windows and layouts with it on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import tvm
from tvm import tirx
from tvm.ir.prim import expr as E
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as I
from tvm.sym import Analyzer

from .quant_decode import TWO23, Bytes, decode, fast_value  # noqa: F401  (fast_value: tests)
from .quant_formats import FORMATS, WeightFormat
from .target import gpu_spec, is_gpu

MAX_TOKENS = 8
UNIT_SMEM_BUDGET = 28 * 1024  # staged bytes per warp and step (32 lanes x row_iters units)


@dataclasses.dataclass(frozen=True)
class QuantGemvConfig:
    """Quantized-GEMV tiling: a lane owns ``unit`` consecutive GGUF blocks of a row per step;
    ``lanes`` lanes split a row (``32 // lanes`` rows per warp instruction, ``row_iters`` such
    row groups per warp); ``warps_n`` x ``warps_k`` warps per block split rows x K; ``group``
    values are decoded per x load; ``chains`` independent f32 sums per (row, token);
    ``x_f32``: x staged in shared memory as float32 (else in the kernel's dtype)."""

    unit: int = 1
    lanes: int = 8
    row_iters: int = 1
    warps_n: int = 4
    warps_k: int = 1
    group: int = 16
    chains: int = 2
    x_f32: bool = True


def _pow2_divisor(v: int, cap: int = 16) -> int:
    """Largest power of two <= cap dividing v."""
    d = 1
    while d < cap and v % (2 * d) == 0:
        d *= 2
    return d


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Geometry:
    """Sizes the kernel's index math derives from (format, shape, config)."""

    def __init__(self, fmt: WeightFormat, m: int, n: int, k: int, cfg: QuantGemvConfig, dtype):
        self.fmt, self.m, self.n, self.k, self.cfg, self.dtype = fmt, m, n, k, cfg, dtype
        self.rb = fmt.row_bytes(k)  # bytes per row
        self.unit_el, self.unit_bytes = cfg.unit * fmt.block, cfg.unit * fmt.block_bytes
        self.n_units = k // self.unit_el
        self.rows_l = 32 // cfg.lanes  # rows per warp instruction
        self.rows_w = self.rows_l * cfg.row_iters  # rows per warp
        self.rows_blk = self.rows_w * cfg.warps_n
        self.n_blk = _cdiv(n, self.rows_blk)
        self.threads = 32 * cfg.warps_n * cfg.warps_k
        self.chunks = _cdiv(self.n_units, cfg.lanes)  # per row: ``lanes`` consecutive units
        self.steps = _cdiv(self.chunks, cfg.warps_k)  # chunks per warp
        self.span = cfg.lanes * self.unit_bytes  # bytes of a row's chunk
        pad = _cdiv(self.span, 16) * 16
        self.span_pad = pad + 16 * (pad // 16 % 2 == 0)  # odd x 16: rows start in other banks
        self.warp_bytes = self.rows_w * self.span_pad
        self.vec_copy = _pow2_divisor(math.gcd(self.rb, self.span))  # global -> shared
        self.vec_read = _pow2_divisor(self.unit_bytes)  # shared -> registers
        self.x_dtype = "float32" if cfg.x_f32 else dtype
        self.x_pad = 128 // tvm.DataType(self.x_dtype).bits if cfg.lanes > 1 else 0
        self.x_stride = self.n_units * (self.unit_el + self.x_pad)  # x elements per token

    def shared_bytes(self) -> int:
        cfg, x = self.cfg, self.m * self.x_stride * tvm.DataType(self.x_dtype).bits // 8
        red = _cdiv(cfg.warps_k * self.rows_blk * self.m, 4) * 16 if cfg.warps_k > 1 else 0
        return x + cfg.warps_n * cfg.warps_k * self.warp_bytes + red

    def x_pos(self, c):
        """Shared-memory position of x column ``c`` (a unit's columns, then ``x_pad``)."""
        return c // self.unit_el * (self.unit_el + self.x_pad) + c % self.unit_el


def _fmt(weight_format: str) -> WeightFormat:
    fmt = FORMATS.get(weight_format)
    if fmt is None or fmt.block == 1:
        names = ", ".join(name for name, f in FORMATS.items() if f.block > 1)
        raise ValueError(f"quant_gemv: unknown quantized weight format {weight_format!r}: {names}")
    return fmt


def check(weight_format, m, n, k, config: QuantGemvConfig, target=None, dtype="float16"):
    """The kernel's geometry, or ValueError saying what does not fit: K not a whole number of
    blocks, a token count outside 1..8, a config whose lanes, units, group or shared memory do
    not fit the shape or the target."""
    fmt, cfg = _fmt(weight_format), config
    if not isinstance(m, int) or not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"quant_gemv serves a static 1..{MAX_TOKENS} tokens, got m={m!r}")
    if n < 1:
        raise ValueError(f"quant_gemv needs n >= 1, got {n}")
    nb = fmt.row_bytes(k) // fmt.block_bytes  # ValueError unless K is a multiple of the block
    if cfg.lanes not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{cfg}: lanes must be a power of two dividing 32")
    if cfg.unit < 1 or nb % cfg.unit:
        raise ValueError(
            f"{cfg}: K={k} is {nb} {fmt.name} blocks, not a multiple of unit={cfg.unit}"
        )
    if min(cfg.row_iters, cfg.warps_n, cfg.warps_k, cfg.chains) < 1:
        raise ValueError(f"{cfg}: row_iters, warps_n, warps_k and chains must be >= 1")
    if cfg.group % 4 or fmt.block % cfg.group:
        raise ValueError(f"{cfg}: group must be a multiple of 4 dividing the block ({fmt.block})")
    g = _Geometry(fmt, m, n, k, cfg, dtype)
    if g.threads > 1024:
        raise ValueError(f"{cfg}: {g.threads} threads per block (at most 1024)")
    limit = gpu_spec(target).max_shared_bytes_per_block if target and is_gpu(target) else None
    if limit is not None and g.shared_bytes() > limit:
        raise ValueError(
            f"{cfg}: {g.shared_bytes()} bytes of shared memory for m={m}, k={k} ({fmt.name}), "
            f"more than the {limit} a block of {target.attrs['arch']} has"
        )
    return g


def keep(weight_format: str, m: int, n: int, k: int, config: QuantGemvConfig, target) -> bool:
    """Whether ``config`` fits (:func:`check` raises nothing)."""
    with contextlib.suppress(ValueError):
        return check(weight_format, m, n, k, config, target) is not None
    return False


def default_config(weight_format: str, n: int, k: int, target, m: int = 1) -> QuantGemvConfig:
    """The config for this format and shape (``target``: SM count and shared memory).

    - row_iters, unit: 2 rows per lane (at one token x loads would otherwise take most of the
      shared-memory bandwidth), then 1; units of the fewest blocks whose bytes are a multiple
      of 16, else 8, else 4, dividing the row. The first pair whose staged bytes (32 lanes x
      unit bytes x row_iters) fit ``UNIT_SMEM_BUDGET`` and that gives 4 warps per SM, else
      the last that fits: Q4_K 1 block (LDS.128); Q6_K 2 (LDS.32, 2 rows per lane on the
      102400-row LM head); Q4_0 / Q5_0 / Q8_0 / IQ4_NL 2-8 by the row count.
    - lanes: as many as split the row's units with at most 10% idle (up to 32); warps_k: a
      divisor of the row's chunks (up to 8) when the row groups give < 4 warps per SM;
      warps_n: the rest of an up-to-8-warp block in a quarter of the shared memory, with at
      least 2 blocks per SM where the rows allow (one's copy overlaps another's decode).
    - group / chains: fewer x values per load and FMA chains for more tokens; x_f32 when x
      takes at most 16 KB.
    """
    fmt = _fmt(weight_format)
    bb, nb = fmt.block_bytes, fmt.row_bytes(k) // fmt.block_bytes
    gpu = is_gpu(target)
    want = 4 * gpu_spec(target).sm_count if gpu else 1  # warps for the whole GPU
    smem = gpu_spec(target).max_shared_bytes_per_block if gpu else 1 << 20
    units = [u for u in dict.fromkeys(w // math.gcd(bb, w) for w in (16, 8, 4)) if nb % u == 0]
    fits = [
        (u, rows) for rows in (2, 1) for u in units or [1] if rows * 32 * u * bb <= UNIT_SMEM_BUDGET
    ] or [(1, 1)]
    unit, row_iters = next((c for c in fits if n * (nb // c[0]) // (32 * c[1]) >= want), fits[-1])
    n_units = nb // unit
    lanes = next(c for c in (32, 16, 8, 4, 2, 1) if _cdiv(n_units, c) * c * 10 <= n_units * 11)
    chunks, row_groups = _cdiv(n_units, lanes), _cdiv(n, 32 // lanes * row_iters)
    divisors = [d for d in range(1, min(chunks, 8) + 1) if chunks % d == 0]
    warps_k = next((d for d in divisors if row_groups * d >= want), divisors[-1])
    cfg = QuantGemvConfig(
        unit=unit,
        lanes=lanes,
        row_iters=row_iters,
        warps_n=1,
        warps_k=warps_k,
        group=16 if m <= 2 else 8,
        chains=2 if m * row_iters <= 2 else 1,
        x_f32=m * k * 4 <= 16 * 1024,
    )
    g = _Geometry(fmt, m, n, k, cfg, "float16")
    per_warp_n = g.warp_bytes * warps_k
    fit = (smem // 4 - (g.shared_bytes() - per_warp_n)) // per_warp_n
    spread = row_groups // max(1, want // 2)  # at least 2 blocks per SM where rows allow
    cfg = dataclasses.replace(cfg, warps_n=max(1, min(8 // warps_k, fit, spread)))
    if gpu and not keep(weight_format, m, n, k, cfg, target):
        cfg = dataclasses.replace(cfg, x_f32=False)
    return cfg


# ---------------------------------------------------------------------------------------------
# Kernel emission (IR builder: Python loops are compile-time unrolls)


@contextlib.contextmanager
def _frames(*make):
    """IR-builder frames entered in order, left in reverse; gives the first one's value."""
    with contextlib.ExitStack() as stack:
        values = [stack.enter_context(mk()) for mk in make]
        yield values[0] if values else None


def _when(cond):
    """``if cond:`` (no statement when cond is statically true)."""
    cond = Analyzer().simplify(cond)
    if isinstance(cond, E.IntImm) and int(cond.value) == 1:
        return _frames()
    return _frames(lambda: T.If(cond), T.Then)


class _Emitter:
    """The CUDA schedule's body. ``gpu``: threads are launched, lanes sum through shuffles;
    else (emulation) each phase between barriers is a loop over the threads, per-thread
    state lives in [threads, ...] buffers and lane sums read the other lanes' state."""

    def __init__(self, g: _Geometry, gpu: bool, bx, tid=None):
        self.g, self.gpu, self.bx, self.tid = g, gpu, bx, tid
        self.residual = None
        self.n_acc = g.cfg.row_iters * g.m * g.cfg.chains
        self.magic = None

    def lanes(self):
        """One phase of every thread's code: the launched thread, or a loop over threads."""
        if self.gpu:
            return _frames(lambda: contextlib.nullcontext(self.tid))
        return _frames(lambda: T.serial(0, self.g.threads))

    def sync(self, warp_only: bool):
        if self.gpu:
            T.evaluate(T.cuda.warp_sync() if warp_only else T.tvm_storage_sync("shared"))

    def acc_at(self, tid, i):
        return i if self.gpu else tid * self.n_acc + i

    def lane_of(self, tid):
        """(warp, wn, wk, lane, row slot rs, lane-in-row i)."""
        w, lane, lanes, wk = tid // 32, tid % 32, self.g.cfg.lanes, self.g.cfg.warps_k
        return w, w // wk, w % wk, lane, lane // lanes, lane % lanes

    def stage_x(self, x, xs, tid):
        """xs[t, x_pos(c)] = x[t, c], 16-byte vectors of x over all threads."""
        g = self.g
        vec = 128 // tvm.DataType(g.dtype).bits
        per_tok, xh = g.k // vec, T.alloc_buffer((vec,), g.dtype, scope="local")
        total = g.m * per_tok
        for it in range(_cdiv(total, g.threads)):
            q = tid + it * g.threads
            with _when(q < total):
                t, c = q // per_tok, q % per_tok * vec
                T.buffer_store(xh, x[t, T.ramp(c, 1, vec)], [T.ramp(0, 1, vec)])
                pos = t * g.x_stride + g.x_pos(c)
                if g.x_dtype == g.dtype:
                    T.buffer_store(xs, xh[T.ramp(0, 1, vec)], [T.ramp(pos, 1, vec)])
                for i in range(vec if g.x_dtype != g.dtype else 0):
                    T.buffer_store(xs, T.Cast(g.x_dtype, xh[i]), [pos + i])

    def stage_w(self, wq, ws, tid, step):
        """This warp's rows x chunk bytes -> its shared slice (vec_copy-byte vectors)."""
        g, cfg = self.g, self.g.cfg
        warp, wn, wk, lane, _, _ = self.lane_of(tid)
        vpr, vc = g.span // g.vec_copy, g.vec_copy  # vectors per row
        total = g.rows_w * vpr
        partial = g.chunks * cfg.lanes > g.n_units or g.steps * cfg.warps_k > g.chunks
        for it in range(_cdiv(total, 32)):
            q = lane + it * 32
            r, v = q // vpr, q % vpr
            col = (step * cfg.warps_k + wk) * g.span + v * vc
            ok = tirx.And(q < total, col < g.rb) if partial else q < total
            row = T.min(self.bx * g.rows_blk + wn * g.rows_w + r, g.n - 1)
            dst = warp * g.warp_bytes + r * g.span_pad + v * vc
            with _when(ok):
                T.buffer_store(ws, wq[row, T.ramp(col, 1, vc)], [T.ramp(dst, 1, vc)])

    def load_x(self, xs, xl, xh, xv, col):
        """xl[t, 0:group] = x[t, col:col + group] from shared memory (xv-wide loads), f32."""
        g, gx = self.g, self.g.cfg.group
        for t in range(g.m):
            for c in range(0, gx, xv):
                src = xs[T.ramp(t * g.x_stride + g.x_pos(col) + c, 1, xv)]
                if xh is None:
                    T.buffer_store(xl, src, [T.ramp(t * gx + c, 1, xv)])
                    continue
                T.buffer_store(xh, src, [T.ramp(0, 1, xv)])
                for j in range(xv):
                    T.buffer_store(xl, T.Cast("float32", xh[j]), [t * gx + c + j])

    def compute(self, ws, xs, acc, tid, step):
        """acc[rt, t, chain] += x[t, unit columns] * W[row, unit columns], this lane's unit:
        per group of values, x loads, then per row the register vectors the group's decode
        reads (each loaded once), the decode and the FMAs."""
        g, cfg, fmt = self.g, self.g.cfg, self.g.fmt
        warp, _, wk, _, rs, i = self.lane_of(tid)
        u = (step * cfg.warps_k + wk) * cfg.lanes + i
        vr, m, gx = g.vec_read, g.m, cfg.group
        wl = [
            T.alloc_buffer((_cdiv(g.unit_bytes, vr) * vr,), "uint8", scope="local")
            for _ in range(cfg.row_iters)
        ]
        xv = min(128 // tvm.DataType(g.x_dtype).bits, gx)  # x elements per shared load
        xl, dec = (T.alloc_buffer((size,), "float32", scope="local") for size in (m * gx, gx))
        xh = T.alloc_buffer((xv,), g.x_dtype, scope="local") if g.x_dtype != "float32" else None
        loaded = set()
        with _when(u < g.n_units):
            for b in range(cfg.unit):
                for e0 in range(0, fmt.block, gx):
                    self.load_x(xs, xl, xh, xv, u * g.unit_el + b * fmt.block + e0)
                    for rt in range(cfg.row_iters):
                        src = Bytes(wl[rt], b * fmt.block_bytes, fmt.block_bytes)
                        vals = [decode(fmt, src, e0 + e, self.magic) for e in range(gx)]
                        base = warp * g.warp_bytes + (rt * g.rows_l + rs) * g.span_pad
                        base += i * g.unit_bytes
                        for v in sorted({o // vr for o in src.read}):
                            if (rt, v) not in loaded:
                                loaded.add((rt, v))
                                vec = ws[T.ramp(base + v * vr, 1, vr)]
                                T.buffer_store(wl[rt], vec, [T.ramp(v * vr, 1, vr)])
                        for e in range(gx):
                            T.buffer_store(dec, vals[e], [e])
                        for e in range(gx):
                            for t in range(m):
                                a = self.acc_at(tid, (rt * m + t) * cfg.chains + e % cfg.chains)
                                T.buffer_store(acc, acc[a] + xl[t * gx + e] * dec[e], [a])

    def reduce_store(self, acc, red, y, tid):
        """Sum each (row, token) over its row's lanes: y, or the K-warp's partial in ``red``."""
        g, cfg = self.g, self.g.cfg
        _, wn, wk, _, rs, i = self.lane_of(tid)
        tot = T.alloc_buffer((1,), "float32", scope="local")
        for rt in range(cfg.row_iters):
            r_blk = wn * g.rows_w + rt * g.rows_l + rs
            for t in range(g.m):
                first = (rt * g.m + t) * cfg.chains
                # emulation: every lane of the row (no shuffles); CUDA: this lane's chains
                srcs = [tid] if self.gpu else [tid - i + li for li in range(cfg.lanes)]
                T.buffer_store(tot, T.float32(0), [0])
                for src in srcs:
                    for c in range(cfg.chains):
                        T.buffer_store(tot, tot[0] + acc[self.acc_at(src, first + c)], [0])
                o = cfg.lanes // 2 if self.gpu else 0
                while o:
                    shfl = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), tot[0], o, 32, 32)
                    T.buffer_store(tot, tot[0] + shfl, [0])
                    o //= 2
                with _when(i == 0):
                    if cfg.warps_k > 1:
                        T.buffer_store(red, tot[0], [(wk * g.rows_blk + r_blk) * g.m + t])
                        continue
                    row = self.bx * g.rows_blk + r_blk
                    with _when(row < g.n):
                        T.buffer_store(y, self.out(tot[0], t, row), [t, row])

    def store_split(self, red, y, tid):
        """K split over warps: y = the sum of the K-warps' partials."""
        g = self.g
        items, tot = g.rows_blk * g.m, T.alloc_buffer((1,), "float32", scope="local")
        for it in range(_cdiv(items, g.threads)):
            q = tid + it * g.threads
            r_blk, t = q // g.m, q % g.m
            row = self.bx * g.rows_blk + r_blk
            with _when(tirx.And(q < items, row < g.n)):
                T.buffer_store(tot, red[r_blk * g.m + t], [0])
                for w in range(1, g.cfg.warps_k):
                    T.buffer_store(tot, tot[0] + red[(w * g.rows_blk + r_blk) * g.m + t], [0])
                T.buffer_store(y, self.out(tot[0], t, row), [t, row])

    def out(self, total, t, row):
        """The stored value: the f32 sum (plus the residual's element), in the kernel's dtype."""
        if self.residual is not None:
            total = total + T.Cast("float32", self.residual[t, row])
        return T.Cast(self.g.dtype, total)

    def body(self, x, wq, y, residual=None):
        self.residual = residual
        g, cfg = self.g, self.g.cfg
        scope = "shared.dyn" if self.gpu else "global"
        xs = T.alloc_buffer((g.m * g.x_stride,), g.x_dtype, scope=scope)
        ws = T.alloc_buffer((cfg.warps_n * cfg.warps_k * g.warp_bytes,), "uint8", scope=scope)
        red = None
        if cfg.warps_k > 1:
            size = _cdiv(cfg.warps_k * g.rows_blk * g.m, 4) * 4  # 16-byte multiple: aligned
            red = T.alloc_buffer((size,), "float32", scope=scope)
        size = self.n_acc * (1 if self.gpu else g.threads)
        acc = T.alloc_buffer((size,), "float32", scope="local" if self.gpu else "global")
        if self.gpu:  # 0x4B000000 from the grid size read at run time: no compiler folds it
            mreg = T.alloc_buffer((1,), "int32", scope="local")
            grid = T.cuda.mov_sreg(32, "nctaid.x")
            T.buffer_store(mreg, tirx.const(TWO23 + g.n_blk, "int32") - grid, [0])
            self.magic = mreg[0]
        with self.lanes() as tid:
            self.stage_x(x, xs, tid)
            for a in range(self.n_acc):
                T.buffer_store(acc, T.float32(0), [self.acc_at(tid, a)])
        self.sync(warp_only=False)
        loop = T.unroll if g.steps <= 4 else T.serial
        with _frames(lambda: loop(0, g.steps)) as step:
            with self.lanes() as tid:
                self.stage_w(wq, ws, tid, step)
            self.sync(warp_only=True)
            with self.lanes() as tid:
                self.compute(ws, xs, acc, tid, step)
            self.sync(warp_only=True)
        with self.lanes() as tid:
            self.reduce_store(acc, red, y, tid)
        if cfg.warps_k > 1:
            self.sync(warp_only=False)
            with self.lanes() as tid:
                self.store_split(red, y, tid)


def kernel_name(weight_format: str, m: int, n: int, k: int) -> str:
    return f"quant_gemv_{weight_format}_n{n}_k{k}_m{m}"


def _scheduled(g: _Geometry, *, gpu: bool, name: str, residual: bool = False) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with I.prim_func():
            I.func_name(name)
            I.func_attr({"tirx.noalias": True})
            x = I.arg("x", T.buffer((g.m, g.k), g.dtype))
            wq = I.arg("wq", T.buffer((g.n, g.rb), "uint8"))
            r = I.arg("r", T.buffer((g.m, g.n), g.dtype)) if residual else None
            y = I.arg("y", T.buffer((g.m, g.n), g.dtype))
            if gpu:
                with T.launch_thread("blockIdx.x", g.n_blk) as bx:
                    with T.launch_thread("threadIdx.x", g.threads) as tx:
                        _Emitter(g, True, bx, tx).body(x, wq, y, r)
            else:
                with T.parallel(0, g.n_blk) as bx:
                    _Emitter(g, False, bx).body(x, wq, y, r)
    return ib.get()


def _cpu_kernel(fmt: WeightFormat, m: int, n: int, k: int, dtype: str, name: str):
    """Plain CPU kernel: rows in parallel, f32 sums over K for all tokens."""
    rb = fmt.row_bytes(k)

    @T.prim_func
    def kernel(
        x: T.Buffer((m, k), dtype), wq: T.Buffer((n, rb), "uint8"), y: T.Buffer((m, n), dtype)
    ):
        T.func_attr({"tirx.noalias": True})
        for row in T.parallel(n):
            acc = T.alloc_buffer((m,), "float32", scope="local")
            for t in range(m):
                acc[t] = T.float32(0)
            for c in range(k):
                w = T.meta_var(fast_value(fmt, wq, row, c))
                for t in range(m):
                    acc[t] = acc[t] + T.Cast("float32", x[t, c]) * w
            for t in range(m):
                y[t, row] = T.Cast(dtype, acc[t])

    return kernel.with_attr("global_symbol", name)


def quant_gemv(
    m: int,
    n: int,
    k: int,
    *,
    target: tvm.target.Target,
    weight_format: str,
    config: QuantGemvConfig | None = None,
    dtype: str = "float16",
    emulate: bool = False,
    residual: bool = False,
) -> tirx.PrimFunc:
    """``(x [m, k] dtype, wq [n, row_bytes(k)] uint8, y [m, n] dtype)``: ``y = x @ W^T`` with
    ``W[r, c] = FORMATS[weight_format].value(wq, r, c)``, f32 sums, all m tokens (1..8) in one
    pass over the weight. CUDA: the schedule of ``config`` (default :func:`default_config`);
    CPU: rows in parallel, or with ``emulate=True`` the CUDA schedule's index math run
    serially (tests). ``residual``: ``(x, wq, r, y)``, ``y = x @ W^T + r`` (on the CPU by the
    emulated schedule). ValueError for shapes or configs that do not fit (:func:`check`)."""
    fmt, gpu = _fmt(weight_format), is_gpu(target)
    name = kernel_name(weight_format, m, n, k) + ("_residual" if residual else "")
    if not gpu and not emulate and not residual:
        check(weight_format, m, n, k, config or QuantGemvConfig(unit=1, lanes=1), None, dtype)
        return _cpu_kernel(fmt, m, n, k, dtype, name)
    cfg = config or default_config(weight_format, n, k, target, m)
    g = check(weight_format, m, n, k, cfg, target if gpu else None, dtype)
    return _scheduled(g, gpu=gpu, name=name, residual=residual)
