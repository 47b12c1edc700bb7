"""Decoding GGUF values in registers for the quantized GEMVs (``quant_gemv``,
``quant_moe_gemv``): ``fmt.value`` on a proxy of a lane's register bytes, each int -> float32 of
a small integer (quants, 6-bit scales) as ``bits(0x4B000000 | q) - 2^23``: a LOP3 and an FADD,
not a quarter-rate I2F, and exact (values stay bit-identical to gguf-py's)."""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.ir.expr import TensorLoad
from tvm.ir.prim import expr as E
from tvm.sym import Analyzer

from .quant_formats import WeightFormat

TWO23 = 0x4B000000  # float32 bits of 2^23: bits(2^23 + q) = 0x4B000000 | q for 0 <= q < 2^23


def _dt(e) -> str:
    return str(e.ty)


def _bound(e) -> tuple[int, int] | None:
    """Integer range of an int expression of bytes, masks, shifts, +, -, *; None: unknown."""
    if isinstance(e, E.IntImm):
        return int(e.value), int(e.value)
    if isinstance(e, E.Cast | TensorLoad):
        src = _dt(e.value if isinstance(e, E.Cast) else e)
        if src in ("uint8", "uint16"):
            return 0, (1 << tvm.DataType(src).bits) - 1
        return _bound(e.value) if isinstance(e, E.Cast) and "int" in src else None
    if isinstance(e, E.Select):
        a, b = _bound(e.true_value), _bound(e.false_value)
        return None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
    if not isinstance(e, E.BinaryOpExpr):
        return None
    a, b = _bound(e.a), _bound(e.b)
    if isinstance(e, E.BitwiseAnd):  # x & mask with mask >= 0: 0..mask
        return next(((0, x[1]) for x in (a, b) if x is not None and x[0] >= 0), None)
    if a is None or b is None:
        return None
    if isinstance(e, E.Add | E.Sub | E.Mul):
        if isinstance(e, E.Mul):
            p = [x * y for x in a for y in b]
            return min(p), max(p)
        return (a[0] + b[0], a[1] + b[1]) if isinstance(e, E.Add) else (a[0] - b[1], a[1] - b[0])
    if min(a[0], b[0]) < 0:
        return None
    if isinstance(e, E.BitwiseOr | E.BitwiseXor):
        return 0, (1 << max(a[1], b[1]).bit_length()) - 1
    if isinstance(e, E.RShift):
        return a[0] >> b[1], a[1] >> b[0]
    return (a[0] << b[0], a[1] << b[1]) if isinstance(e, E.LShift) else None


def _small(b) -> bool:  # a range the exponent trick covers
    return b is not None and 0 <= b[0] and b[1] < 1 << 23


def _int_to_f32(v, magic):
    """float32(v) of an int32 v: ``bits(magic | a) - (2^23 - c)`` for v = a + c with a in
    [0, 2^23) (exact), else a plain cast."""
    c = 0
    if isinstance(v, E.Add | E.Sub) and isinstance(v.b, E.IntImm) and _small(_bound(v.a)):
        v, c = v.a, int(v.b.value) * (1 if isinstance(v, E.Add) else -1)
    if not _small(_bound(v)):
        return tirx.Cast("float32", v if c == 0 else v + c)
    return tirx.reinterpret("float32", v | magic) - tirx.const(float(2**23 - c), "float32")


def _fast(e, magic=None):
    """``e`` with every float32(int32) of small range by the exponent trick; ``magic``: the
    0x4B000000 to OR in (an expression: on CUDA a register)."""
    magic = tirx.const(TWO23, "int32") if magic is None else magic
    if isinstance(e, E.Cast):
        if _dt(e) == "float32" and _dt(e.value) == "int32":
            return _int_to_f32(_fast(e.value, magic), magic)
        return tirx.Cast(_dt(e), _fast(e.value, magic))
    if isinstance(e, E.BinaryOpExpr):
        a, b = _fast(e.a, magic), _fast(e.b, magic)
        return e if a.same_as(e.a) and b.same_as(e.b) else type(e)(a, b)
    if isinstance(e, E.Select):
        parts = (e.condition, e.true_value, e.false_value)
        return tirx.Select(*(_fast(p, magic) for p in parts))
    return e


def fast_value(fmt: WeightFormat, buf, n, k, dtype: str = "float32"):
    """``fmt.value(buf, n, k)`` (any index expressions) with the exponent-trick conversions."""
    v = _fast(fmt.value(buf, n, k, "float32"))
    return v if dtype == "float32" else v.astype(dtype)


class Bytes:
    """``buf[n, offset]`` as ``fmt.value`` reads it, on a lane's register copy: block byte
    ``offset`` (a constant) is ``local[base + offset]``; ``read``: the local offsets read."""

    def __init__(self, local, base: int, limit: int):
        self.local, self.base, self.limit, self.read = local, base, limit, set()

    def __getitem__(self, idx):
        off = Analyzer().simplify(idx[1])
        if not isinstance(off, E.IntImm) or not 0 <= int(off.value) < self.limit:
            raise ValueError(f"quant_gemv: decoder byte offset {off} is not a block constant")
        self.read.add(self.base + int(off.value))
        return self.local[self.base + int(off.value)]


def decode(fmt: WeightFormat, byte_buf, j: int, magic=None):
    """Float32 value of element ``j`` (0 <= j < block) of the block ``byte_buf[0, o]`` reads,
    int -> float conversions by the exponent trick."""
    return _fast(Analyzer().simplify(fmt.value(byte_buf, 0, j, "float32")), magic)
