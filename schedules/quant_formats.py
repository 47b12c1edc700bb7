"""GGUF weight formats as TIR expressions: block decoders any kernel can inline.

A weight of logical shape [N, K] in format ``fmt`` is stored as its raw GGUF bytes, a uint8
buffer [N, fmt.row_bytes(K)] (each row K / fmt.block consecutive blocks). ``fmt.value(buf, n,
k)`` is a PrimExpr for element (n, k), usable in any compute block::

    W[n, k] = fmt.value(Wq, n, k)              # dequantize
    acc[n] += x[k] * fmt.value(Wq, n, k)       # or straight in a GEMV's reduction

Values are bit-identical to gguf-py's ``gguf.quants.dequantize``: the float32 ops follow its
order (e.g. Q4_K is ``(d * sc) * q - dmin * m``), and every product is exact in float32 anyway
(an f16 scale has 11 significant bits, its integer factors at most 13 more), so the only rounded
op is Q4_K / Q5_K's final subtraction. Hence FMA contraction (nvcc's default) and any product
association give the same bits; no quantized value is an f32 subnormal (all are multiples of
2^-24), so flush-to-zero cannot change them either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from .elementwise import thread_per_element

ByteFn = Callable[[object], tirx.Expr]  # offset in the block -> that byte as int32
Decoder = Callable[[ByteFn, tirx.Expr], tirx.Expr]  # (bytes, j in block) -> float32

# IQ4_NL / IQ4_XS non-linear 4-bit codebook (ggml's kvalues_iq4nl)
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _word(vals: tuple[int, ...]) -> int:
    """Four int8 values packed little-endian into one signed int32."""
    w = sum((v & 0xFF) << (8 * i) for i, v in enumerate(vals))
    return w - (1 << 32) if w >= 1 << 31 else w


_KV_WORDS = tuple(_word(IQ4_KVALUES[4 * i : 4 * i + 4]) for i in range(4))


def _i32(v) -> tirx.Expr:
    return tirx.const(v, "int32")


def _s8(b: tirx.Expr) -> tirx.Expr:
    """Sign-extend a byte value 0..255 (int32) to -128..127."""
    return (b ^ 0x80) - 0x80


def _f32(x: tirx.Expr) -> tirx.Expr:
    return x.astype("float32")


def _f16(b: ByteFn, off: int) -> tirx.Expr:
    """Little-endian f16 at block offset ``off``, widened to float32 (exact)."""
    bits = b(off) | (b(off + 1) << 8)
    return _f32(tirx.reinterpret("float16", bits.astype("uint16")))


def _iq4(q: tirx.Expr) -> tirx.Expr:
    """IQ4_KVALUES[q] for q in 0..15: a byte of one of four packed int32 words (no memory
    table, so it stays in registers on any target)."""
    w = _KV_WORDS
    word = tirx.Select(
        q < 8,
        tirx.Select(q < 4, _i32(w[0]), _i32(w[1])),
        tirx.Select(q < 12, _i32(w[2]), _i32(w[3])),
    )
    return _s8((word >> ((q & 3) * 8)) & 0xFF)


def _nibble32(b: ByteFn, off: int, j) -> tirx.Expr:
    """4-bit q of element j in a 32-value run of 16 bytes: j < 16 low nibbles, then high."""
    return (b(off + j % 16) >> (j // 16 * 4)) & 15


def _k_scale_min(b: ByteFn, s) -> tuple[tirx.Expr, tirx.Expr]:
    """6-bit (scale, min) of sub-block s (0..7) from the 12 K-quant scale bytes at offset 4.
    Bytes 0-3: s<4 scales / s>=4 scale top bits; 4-7: s<4 mins / s>=4 min top bits; 8-11:
    s>=4 low nibbles (scale) and high nibbles (min). All reads stay in the block."""
    t = s & 3
    lo, mid, hi = b(4 + t), b(8 + t), b(12 + t)
    first = s < 4
    sc = tirx.Select(first, lo & 63, (hi & 15) | ((lo >> 6) << 4))
    mn = tirx.Select(first, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
    return sc, mn


# Decoders: b(off) reads byte off of the element's block, j is the element's index in it.


def _q8_0(b, j):  # [2 d f16 | 32 q i8]
    return _f32(_s8(b(2 + j))) * _f16(b, 0)


def _q4_0(b, j):  # [2 d | 16 qs: j<16 low nibble, else high]
    return _f16(b, 0) * _f32(_nibble32(b, 2, j) - 8)


def _q5_0(b, j):  # [2 d | 4 qh: bit j = 5th bit | 16 qs as Q4_0]
    qh = (b(2 + j // 8) >> (j % 8)) & 1
    return _f16(b, 0) * _f32((_nibble32(b, 6, j) | (qh << 4)) - 16)


def _q5_1(b, j):  # [2 d | 2 m | 4 qh: bit j = 5th bit | 16 qs as Q4_0]: d * q + m
    qh = (b(4 + j // 8) >> (j % 8)) & 1
    return _f16(b, 0) * _f32(_nibble32(b, 8, j) | (qh << 4)) + _f16(b, 2)


def _q45_k(b, j, q):
    """Q4_K / Q5_K: (d * sc) * q - dmin * m, gguf-py's order; only the subtraction rounds."""
    sc, mn = _k_scale_min(b, j // 32)
    return (_f16(b, 0) * _f32(sc)) * _f32(q) - _f16(b, 2) * _f32(mn)


def _q4_k(b, j):  # [2 d | 2 dmin | 12 scales | 128 qs: 32-byte runs, sub-block 2r low, 2r+1 high]
    s, i = j // 32, j % 32
    return _q45_k(b, j, (b(16 + s // 2 * 32 + i) >> (s % 2 * 4)) & 15)


def _q5_k(b, j):  # [2 d | 2 dmin | 12 scales | 32 qh: bit s of byte i | 128 qs as Q4_K]
    s, i = j // 32, j % 32
    ql = (b(48 + s // 2 * 32 + i) >> (s % 2 * 4)) & 15
    qh = (b(16 + i) >> s) & 1
    return _q45_k(b, j, ql | (qh << 4))


def _q6_k(b, j):  # [128 ql | 64 qh | 16 scales i8 | 2 d]; two 128-value halves
    h, r = j // 128, j % 128
    ql = (b(h * 64 + r % 64) >> (r // 64 * 4)) & 15
    qh = (b(128 + h * 32 + r % 32) >> (r // 32 * 2)) & 3
    d_sc = _f16(b, 208) * _f32(_s8(b(192 + j // 16)))  # gguf-py's order (exact: 18 bits)
    return d_sc * _f32((ql | (qh << 4)) - 32)


def _iq4_nl(b, j):  # [2 d | 16 qs as Q4_0, codebook values]
    return _f16(b, 0) * _f32(_iq4(_nibble32(b, 2, j)))


def _iq4_xs(b, j):  # [2 d | 2 scales_h u16: 2 bits per s | 4 scales_l: nibble per s | 128 qs]
    s, i = j // 32, j % 32
    sl = (b(4 + s // 2) >> (s % 2 * 4)) & 15
    sh = (b(2 + s // 4) >> (s % 4 * 2)) & 3
    dl = _f16(b, 0) * _f32((sl | (sh << 4)) - 32)  # gguf-py's order (exact: 16 bits)
    return dl * _f32(_iq4((b(8 + s * 16 + i % 16) >> (i // 16 * 4)) & 15))


def _f16_elem(b, j):
    return _f16(b, 0)


def _bf16_elem(b, j):  # bf16 = the top half of an f32
    bits = (b(0).astype("uint32") << 16) | (b(1).astype("uint32") << 24)
    return tirx.reinterpret("float32", bits)


def _f32_elem(b, j):
    bits = b(0).astype("uint32")
    for i in (1, 2, 3):
        bits = bits | (b(i).astype("uint32") << (8 * i))
    return tirx.reinterpret("float32", bits)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One GGUF tensor type: ``block`` values stored in ``block_bytes`` bytes."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block: int
    block_bytes: int
    _decode: Decoder = dataclasses.field(repr=False, compare=False)

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of ``k`` values."""
        if k <= 0 or k % self.block:
            raise ValueError(
                f"{self.name} stores rows in blocks of {self.block} values: "
                f"K={k} is not a positive multiple of {self.block}"
            )
        return k // self.block * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def value(self, buf, n, k, dtype: str = "float32") -> tirx.Expr:
        """Element (n, k) of the weight whose GGUF bytes are ``buf`` [N, row_bytes(K)] u8;
        ``n``, ``k`` are any index expressions; ``n`` may be a tuple of leading indices (a
        stacked weight ``[E, N, row_bytes(K)]``). Computed in float32, then cast to ``dtype``."""
        lead = tuple(n) if isinstance(n, (tuple, list)) else (n,)
        blk, j = k // self.block, k % self.block
        base = blk * self.block_bytes
        j = j.astype("int32") if isinstance(j, tirx.Expr) else _i32(j)  # < 256: int32 math

        def byte(off):
            return buf[(*lead, base + off)].astype("int32")

        v = self._decode(byte, j)
        return v if dtype == "float32" else v.astype(dtype)


def _fmt(name, ggml_type, block, block_bytes, decode) -> tuple[str, WeightFormat]:
    return name, WeightFormat(name, ggml_type, block, block_bytes, decode)


FORMATS: dict[str, WeightFormat] = dict(
    [
        _fmt("f32", 0, 1, 4, _f32_elem),
        _fmt("f16", 1, 1, 2, _f16_elem),
        _fmt("bf16", 30, 1, 2, _bf16_elem),
        _fmt("q4_0", 2, 32, 18, _q4_0),
        _fmt("q5_0", 6, 32, 22, _q5_0),
        _fmt("q5_1", 7, 32, 24, _q5_1),
        _fmt("q8_0", 8, 32, 34, _q8_0),
        _fmt("q4_k", 12, 256, 144, _q4_k),
        _fmt("q5_k", 13, 256, 176, _q5_k),
        _fmt("q6_k", 14, 256, 210, _q6_k),
        _fmt("iq4_nl", 20, 32, 18, _iq4_nl),
        _fmt("iq4_xs", 23, 256, 136, _iq4_xs),
    ]
)
_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def format_of_ggml_type(ggml_type: int) -> WeightFormat:
    """The format of a GGUF tensor type id; ValueError naming the type when there is none."""
    fmt = _BY_GGML_TYPE.get(int(ggml_type))
    if fmt is None:
        try:  # gguf is optional: its name for the type when installed
            import gguf

            label = f"{int(ggml_type)} ({gguf.GGMLQuantizationType(int(ggml_type)).name})"
        except (ImportError, ValueError):
            label = str(int(ggml_type))
        raise ValueError(
            f"GGML tensor type {label} has no TIR decoder; supported: "
            + ", ".join(f"{f.name} ({f.ggml_type})" for f in FORMATS.values())
        )
    return fmt


def dequantize_func(
    fmt: WeightFormat,
    n: int,
    k: int,
    *,
    out_dtype: str = "float32",
    target: tvm.target.Target | None = None,
) -> tirx.PrimFunc:
    """(wq [n, row_bytes(k)] u8, w [n, k] out_dtype): ``w = dequantize(wq)``. CPU: rows in
    parallel; GPU: one thread per element (kernels are meant to inline ``fmt.value`` instead)."""
    rb = fmt.row_bytes(k)
    # int64 extents, as Relax's shapes: FuseTIR matches buffers to vars structurally
    n, k, rb = (tirx.IntImm("int64", v) for v in (n, k, rb))

    @T.prim_func(s_tir=True)
    def dequantize(wq: T.Buffer((n, rb), "uint8"), w: T.Buffer((n, k), out_dtype)):
        T.func_attr({"tirx.noalias": True, "global_symbol": f"dequantize_{fmt.name}"})
        for i, c in T.grid(n, k):
            with T.sblock("dequantize"):
                vi, vc = T.axis.remap("SS", [i, c])
                w[vi, vc] = fmt.value(wq, vi, vc, out_dtype)

    sch = s_tir.Schedule(dequantize)
    thread_per_element(sch, sch.get_sblock("dequantize"), target)
    return sch.mod["main"]


def take_rows_func(
    fmt: WeightFormat,
    n: int,
    k: int,
    *,
    index_dtype: str = "int32",
    out_dtype: str = "float16",
    target: tvm.target.Target | None = None,
) -> tirx.PrimFunc:
    """(wq [n, row_bytes(k)] u8, ids [t] index_dtype, y [t, k] out_dtype): ``y[i] = row
    ids[i]`` of the decoded weight (an embedding lookup straight from its blocks; ids are
    clamped into [0, n), as ``take``'s fast mode assumes them in range)."""
    rb = fmt.row_bytes(k)
    n, k, rb = (tirx.IntImm("int64", v) for v in (n, k, rb))
    t = tirx.Var("t", "int64")

    @T.prim_func(s_tir=True)
    def take_rows(
        wq: T.Buffer((n, rb), "uint8"),
        ids: T.Buffer((t,), index_dtype),
        y: T.Buffer((t, k), out_dtype),
    ):
        T.func_attr({"tirx.noalias": True, "global_symbol": f"take_rows_{fmt.name}"})
        for i, c in T.grid(t, k):
            with T.sblock("take_rows"):
                vi, vc = T.axis.remap("SS", [i, c])
                y[vi, vc] = fmt.value(
                    wq, T.max(T.min(T.Cast("int64", ids[vi]), n - 1), 0), vc, out_dtype
                )

    sch = s_tir.Schedule(take_rows)
    thread_per_element(sch, sch.get_sblock("take_rows"), target)
    return sch.mod["main"]
