"""Compile-time weight quantizer: float32 weights -> GGUF block bytes (llama.cpp's layouts).

``quantize(w, qtype)`` turns a float array ``[..., K]`` into the bytes of llama.cpp's ``qtype``
blocks, ``[..., K // block * block_bytes]`` uint8; ``gguf.quants.dequantize`` (gguf-py) reads
them back, which is what "correct" means here. Types:

* ``q4_0``, ``q5_0``: gguf-py's quantizers (llama.cpp's reference ones: the same bytes
  ``llama-quantize`` writes without an importance matrix).
* ``q8_0``: here: values round against the f16 scale that is stored, per block the f16 nearest
  max|x| / 127 or the next one up, whichever fits better (gguf-py and llama.cpp round against the
  f32 scale, a hair worse, and lose the top level where f16 subnormals round the scale down).
* ``q5_1``, ``q4_k``, ``q5_k``, ``q6_k``, ``iq4_nl``, ``iq4_xs``: here (gguf-py only decodes them).
  Each block (or 16/32-value sub-block) tries a handful of scales (and offsets), refits scale and
  offset by least squares to the integer levels each one gives, and keeps the fit of least squared
  error; the K-quants and IQ4_XS then round the sub-block scales to their 6- or 8-bit codes
  against an f16 super-block scale and assign each value its nearest level once more. The search
  follows the idea of llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants`` /
  ``quantize_row_iq4_nl`` (unweighted: no importance matrix), vectorised over all blocks.
* ``f32``, ``f16``: the values as little-endian bytes (what the mixes give unquantized tensors).

``q4_k_m_type`` / ``mix_type`` pick each GGUF tensor's type the way ``llama-quantize`` does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from mla_compiler.errors import WeightError


@dataclasses.dataclass(frozen=True)
class QuantTensor:
    """A weight kept in a GGUF block format: ``data`` holds each row's blocks, exactly as in a
    GGUF file, for the logical ``shape`` [..., N, K]."""

    data: np.ndarray  # [..., N, row_bytes(K)] uint8
    qtype: str  # "q4_k", ... (LAYOUTS)
    shape: tuple[int, ...]

    def __post_init__(self):
        want = (*self.shape[:-1], row_bytes(self.shape[-1], self.qtype))
        if self.data.dtype != np.uint8 or tuple(self.data.shape) != want:
            raise WeightError(
                f"{self.qtype} blocks of shape {tuple(self.data.shape)} {self.data.dtype} do not "
                f"make a {list(self.shape)} weight (want {want} uint8)"
            )

    def dequantize(self) -> np.ndarray:
        """The values, float32 [..., N, K] (gguf-py's decoders)."""
        return dequantize(self.data, self.qtype).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class QuantizeError(WeightError, ValueError):
    """Weights that cannot be quantized to the asked type (row length, values, unknown type)."""


# name -> (values per block, bytes per block); tests check these against gguf-py's table.
LAYOUTS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
    "iq4_nl": (32, 18),
    "iq4_xs": (256, 136),
}
QTYPES = tuple(t for t in LAYOUTS if t not in ("f32", "f16"))
_GGUF_PY = ("q4_0", "q5_0")  # quantized by gguf-py
# Largest |weight| accepted: every type's f16 scales stay finite below it.
MAX_ABS = 65504.0
# Values per chunk: numpy's per-call cost stays small, and the work arrays (~MBs) in cache.
_CHUNK = 1 << 18

# IQ4_NL / IQ4_XS: the 16 non-linear levels.
IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
# Nearest IQ4 level of v: every midpoint between two levels is a multiple of 1/2, so all v with
# the same floor(2 v) share it; index floor(2 v) + 256, for v clipped to [-128, 128).
_IQ4_LUT = np.abs(
    (np.arange(-256, 256, dtype=np.float32)[:, None] + 0.5) / 2 - IQ4_VALUES[None, :]
).argmin(axis=1)
_IQ4_LUT_VALUES = IQ4_VALUES[_IQ4_LUT]


def block_size(qtype: str) -> int:
    """Values per block of ``qtype`` (1 for f32 / f16)."""
    return LAYOUTS[_type_name(qtype)][0]


def row_bytes(k: int, qtype: str) -> int:
    """Bytes of one row of ``k`` values in ``qtype`` (``k`` a multiple of the block)."""
    bs, ts = LAYOUTS[_type_name(qtype)]
    if k % bs:
        raise QuantizeError(f"a row of {k} values is not a multiple of {qtype}'s {bs}-value block")
    return k // bs * ts


def quantize(weights, qtype: str) -> np.ndarray:
    """``weights`` [N, K] (or [..., K]) float -> [N, K // block * block_bytes] uint8 GGUF blocks.

    K must be a multiple of the type's block (32; 256 for q4_k, q5_k, q6_k, iq4_xs), values finite
    and within ±65504 (f16 scales); anything else raises ``QuantizeError`` (a ``ValueError``).
    """
    name = _type_name(qtype)
    if hasattr(weights, "detach"):  # a torch tensor (bf16 included)
        weights = weights.detach().float().cpu().numpy()
    w = np.asarray(weights)
    if w.dtype.kind not in "fiu" and w.dtype.name != "bfloat16":
        raise QuantizeError(f"cannot quantize a {w.dtype} array of shape {w.shape} to {name}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    bs, ts = LAYOUTS[name]
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % bs:
        raise QuantizeError(
            f"cannot quantize weights of shape {tuple(w.shape)} to {name}: the row length "
            f"(last dimension) must be a positive multiple of its {bs}-value block"
        )
    out_shape = (*w.shape[:-1], w.shape[-1] // bs * ts)
    if w.size == 0:
        return np.zeros(out_shape, dtype=np.uint8)
    if not np.isfinite(w).all():
        raise QuantizeError(f"weights of shape {tuple(w.shape)} hold NaN or Inf: cannot quantize")
    if name != "f32" and float(np.abs(w).max()) > MAX_ABS:
        raise QuantizeError(
            f"weights of shape {tuple(w.shape)} reach |w| = {float(np.abs(w).max()):g}, beyond "
            f"the f16 range ({MAX_ABS:g}) that {name}'s scales can represent"
        )
    if name == "f32":
        return w.astype("<f4").view(np.uint8).reshape(out_shape)
    if name == "f16":
        return w.astype("<f2").view(np.uint8).reshape(out_shape)
    if name in _GGUF_PY:
        gq = _gguf_quants()
        return np.asarray(gq.quantize(w, _gguf_type(name)), dtype=np.uint8).reshape(out_shape)
    blocks = w.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), dtype=np.uint8)
    fn = _QUANTIZERS[name]
    step = max(1, _CHUNK // bs)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step])
    return out.reshape(out_shape)


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF block bytes [..., row_bytes] -> float32 [..., K], through gguf-py's decoders."""
    name = _type_name(qtype)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if name == "f32":
        return data.view("<f4").astype(np.float32)
    if name == "f16":
        return data.view("<f2").astype(np.float32)
    return np.asarray(_gguf_quants().dequantize(data, _gguf_type(name)), dtype=np.float32)


def _type_name(qtype: str) -> str:
    name = str(qtype).lower()
    if name not in LAYOUTS:
        raise QuantizeError(f"unknown quantization type {qtype!r}: use one of {', '.join(LAYOUTS)}")
    return name


def _gguf_quants():
    try:
        import gguf.quants
    except ImportError:
        raise QuantizeError("quantizing needs the gguf package: `pip install gguf`") from None
    return gguf.quants


def _gguf_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


# --- block fitting ------------------------------------------------------------------------------


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _f16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to f16 (as f16)."""
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def _f16_up(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to an f16 of at least its magnitude: a super-block scale so rounded keeps
    every sub-block's code in range (f16 subnormals, at typical weight sizes, are coarse)."""
    a = np.asarray(a, dtype=np.float32)
    h = a.astype(np.float16)
    low = np.abs(h.astype(np.float32)) < np.abs(a)
    return np.where(low, np.nextafter(h, np.copysign(np.inf, a).astype(np.float16)), h)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b == 0."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    return np.divide(a, b, out=np.zeros(a.shape, np.float32), where=b != 0)


def _fit_affine(x: np.ndarray, nmax: int, offset_le0: bool, tries: np.ndarray):
    """Per row of ``x`` [m, n]: scale >= 0 and offset with x ~ scale * L + offset, L in 0..nmax.

    Each try t maps [min, max] onto [0, nmax + t], rounds, and refits (scale, offset) by least
    squares to those levels; the fit of least squared error wins. ``offset_le0``: the offset
    must be <= 0 (the K-quants store it as a subtracted unsigned min).
    """
    n = x.shape[1]
    lo = x.min(axis=1)
    if offset_le0:
        lo = np.minimum(lo, 0)
    span = x.max(axis=1) - lo
    sx = x.sum(axis=1)
    sxx = _rowdot(x, x)
    mean = sx / n
    best_err = np.full(x.shape[0], np.inf, dtype=np.float32)
    best_s = np.zeros(x.shape[0], dtype=np.float32)
    best_b = np.zeros(x.shape[0], dtype=np.float32)
    xs = x - lo[:, None]
    lvl = np.empty_like(x)
    for t in tries:
        inv = _div(nmax + t, span)
        np.multiply(xs, inv[:, None], out=lvl)
        np.rint(lvl, out=lvl)
        np.clip(lvl, 0, nmax, out=lvl)
        sl = lvl.sum(axis=1)
        sll = _rowdot(lvl, lvl)
        sxl = _rowdot(x, lvl)
        det = n * sll - sl * sl
        s = _div(n * sxl - sx * sl, det)
        b = _div(sll * sx - sl * sxl, det)
        if offset_le0:
            pos = b > 0
            s = np.where(pos, _div(sxl, sll), s)
            b = np.where(pos, 0, b)
        # All levels equal: only a constant fits (scale * level + offset = mean).
        flat = det <= 0
        if flat.any():
            b_flat = np.minimum(mean, 0) if offset_le0 else mean
            s = np.where(flat, _div(mean - b_flat, sl / n), s)
            b = np.where(flat, b_flat, b)
        s = np.maximum(s, 0)
        err = sxx + s * s * sll + n * b * b + 2 * s * b * sl - 2 * s * sxl - 2 * b * sx
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_b = np.where(better, b, best_b)
    return best_s, best_b


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude, with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _q6_levels(v: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.rint(v, out=out)
    return np.clip(out, -32, 31, out=out)


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """Index of the IQ4 level nearest to each of ``v`` (in level units)."""
    k = np.floor(v * 2)
    np.clip(k, -256, 255, out=k)
    return _IQ4_LUT[(k + 256).astype(np.intp)]


def _iq4_levels(v: np.ndarray, out: np.ndarray) -> np.ndarray:
    k = np.floor(np.multiply(v, 2, out=out), out=out)
    np.clip(k, -256, 255, out=k)
    k += 256
    return np.take(_IQ4_LUT_VALUES, k.astype(np.intp), out=out)


def _fit_scale(
    x: np.ndarray,
    edge: float,
    tries: np.ndarray,
    levels: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Per row of ``x`` [m, n]: the signed scale d with x ~ d * q, q on a symmetric-ish grid.

    Try t maps the value of largest magnitude onto level ``edge + t`` (``edge`` the grid's end of
    larger magnitude), takes each value's nearest level q and the least-squares d for those q;
    the try of least squared error (largest (x.q)^2 / q.q) wins.
    """
    xmax = _absmax_signed(x)
    best_score = np.full(x.shape[0], -1.0, dtype=np.float32)
    best_d = np.zeros(x.shape[0], dtype=np.float32)
    v = np.empty_like(x)
    q = np.empty_like(x)
    for t in tries:
        inv = _div(edge + t, xmax)
        np.multiply(x, inv[:, None], out=v)
        levels(v, q)
        sxq = _rowdot(x, q)
        sqq = _rowdot(q, q)
        score = _div(sxq * sxq, sqq)
        better = score > best_score
        best_score = np.where(better, score, best_score)
        best_d = np.where(better, _div(sxq, sqq), best_d)
    return best_d


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 15) | ((hi & 15) << 4)


def _sumsq(a: np.ndarray) -> np.ndarray:
    """Sum of squares over the last axis, keeping it (length 1)."""
    return np.einsum("...i,...i->...", a, a)[..., None]


def _floor_ceil(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.floor(a), np.ceil(a)


def _best(codes: list, err: Callable) -> tuple:
    """Per sub-block, the code (tuple of arrays, or array) of ``codes`` of least ``err``."""
    best, best_err = codes[0], err(codes[0])
    for code in codes[1:]:
        e = err(code)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        if isinstance(code, tuple):
            best = tuple(np.where(better, c, b) for c, b in zip(code, best, strict=True))
        else:
            best = np.where(better, code, best)
    return best


# --- the types ----------------------------------------------------------------------------------

_TRIES_AFFINE = np.linspace(-1.0, 1.0, 11, dtype=np.float32)  # levels, on the 0..nmax grid
_TRIES_Q6 = np.linspace(-0.9, 0.9, 7, dtype=np.float32)  # levels, on the -32..31 grid
_TRIES_IQ4 = np.arange(-21, 8, 2, dtype=np.float32)  # units of the -127..113 table


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1, keepdims=True) / 127

    def levels(d):
        return np.clip(np.rint(_div(x, d.astype(np.float32))), -127, 127)

    def err(d):
        return _sumsq(levels(d) * d.astype(np.float32) - x)

    # The f16 scale: nearest to max|x| / 127, or the next one up if that one would clip.
    d = _best([_f16(amax), _f16_up(amax)], err)
    q = levels(d).astype(np.int8)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    s, b = _fit_affine(x, 31, False, _TRIES_AFFINE)
    d, m = _f16(s), _f16(b)
    lv = _div(x - m.astype(np.float32)[:, None], d.astype(np.float32)[:, None])
    q = np.clip(np.rint(lv), 0, 31).astype(np.uint8)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")  # bit i of the u32: value i's 5th bit
    qs = _nibbles(q[:, :16], q[:, 16:])
    head = np.stack([d, m], axis=1).view(np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def _k_affine(x: np.ndarray, nmax: int):
    """Q4_K / Q5_K: 8 sub-blocks of 32 -> (d, dmin) f16, 6-bit scales/mins, levels [nb, 8, 32]."""
    nb = x.shape[0]
    s, b = _fit_affine(x.reshape(nb * 8, 32), nmax, True, _TRIES_AFFINE)
    s = s.reshape(nb, 8, 1)
    mn = np.maximum(-b, 0).reshape(nb, 8, 1)
    d = _f16_up(s.max(axis=1) / 63)
    dmin = _f16_up(mn.max(axis=1) / 63)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    xb = x.reshape(nb, 8, 32)

    def levels(ls, lm):
        scale, offset = df * ls, dminf * lm
        return scale, offset, np.clip(np.rint(_div(xb + offset, scale)), 0, nmax)

    # Each sub-block's 6-bit scale and min: rounded down or up, whichever pair fits it best.
    codes = [
        (np.clip(ls, 0, 63), np.clip(lm, 0, 63))
        for ls in _floor_ceil(_div(s, df))
        for lm in _floor_ceil(_div(mn, dminf))
    ]

    def err(code):
        scale, offset, q = levels(*code)
        return _sumsq(q * scale - offset - xb)

    ls, lm = _best(codes, err)
    q = levels(ls, lm)[2].astype(np.uint8)
    ls, lm = ls[..., 0].astype(np.uint8), lm[..., 0].astype(np.uint8)
    scales = np.concatenate(
        [
            (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6),
            (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6),
            _nibbles(ls[:, 4:], lm[:, 4:]),
        ],
        axis=1,
    )
    head = np.concatenate([d, dmin], axis=1).view(np.uint8)
    # 4 runs of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones.
    pairs = q.reshape(nb, 4, 2, 32)
    qs = _nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(nb, 128)
    return head, scales, q, qs


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, scales, _, qs = _k_affine(x, 15)
    return np.concatenate([head, scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, scales, q, qs = _k_affine(x, 31)
    # qh[i] bit j: 5th bit of value i of sub-block j.
    qh = np.packbits((q >> 4).transpose(0, 2, 1), axis=2, bitorder="little")[..., 0]
    return np.concatenate([head, scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    s = _fit_scale(x.reshape(nb * 16, 16), -32.0, _TRIES_Q6, _q6_levels).reshape(nb, 16, 1)
    d = _f16_up(-_absmax_signed(s[..., 0]) / 128)
    df = d.astype(np.float32)[:, None, None]
    xb = x.reshape(nb, 16, 16)

    def levels(ls):
        return np.clip(np.rint(_div(xb, df * ls)), -32, 31)

    def err(ls):
        return _sumsq(levels(ls) * (df * ls) - xb)

    # Each sub-block's 8-bit scale: rounded down or up, whichever fits it best.
    ls = _best([np.clip(c, -128, 127) for c in _floor_ceil(_div(s, df))], err)
    q = (levels(ls) + 32).astype(np.uint8).reshape(nb, 256)
    # ql: 2 halves of 128 values; byte r of half c: value r (low nibble), value 64 + r (high).
    lo = q.reshape(nb, 2, 2, 64)
    ql = _nibbles(lo[:, :, 0], lo[:, :, 1]).reshape(nb, 128)
    # qh: byte i of half c holds the top 2 bits of values i, 32 + i, 64 + i, 96 + i.
    hi = (q >> 4).reshape(nb, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    sc = ls[..., 0].astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh.reshape(nb, 64), sc, d.view(np.uint8).reshape(nb, 2)], axis=1)


def _iq4_pack(idx: np.ndarray) -> np.ndarray:
    """[..., 32] level indices -> [..., 16] bytes: value i low nibble, value 16 + i high."""
    return _nibbles(idx[..., :16].astype(np.uint8), idx[..., 16:].astype(np.uint8))


def _iq4_nl(x: np.ndarray) -> np.ndarray:
    s = _fit_scale(x, -127.0, _TRIES_IQ4, _iq4_levels)
    d = _f16(s)
    idx = _iq4_index(_div(x, d.astype(np.float32)[:, None]))
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), _iq4_pack(idx)], axis=1)


def _iq4_xs(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    s = _fit_scale(x.reshape(nb * 8, 32), -127.0, _TRIES_IQ4, _iq4_levels).reshape(nb, 8, 1)
    d = _f16_up(-_absmax_signed(s[..., 0]) / 32)
    df = d.astype(np.float32)[:, None, None]
    xb = x.reshape(nb, 8, 32)

    def err(ls):
        scale = df * ls
        return _sumsq(IQ4_VALUES[_iq4_index(_div(xb, scale))] * scale - xb)

    # Each sub-block's 6-bit scale: rounded down or up, whichever fits it best.
    ls = _best([np.clip(c, -32, 31) for c in _floor_ceil(_div(s, df))], err)
    idx = _iq4_index(_div(xb, df * ls))
    u = (ls[..., 0] + 32).astype(np.uint16)
    scales_h = ((u >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    scales_l = _nibbles(u[:, 0::2].astype(np.uint8), u[:, 1::2].astype(np.uint8))
    head = np.stack([d.view(np.uint16), scales_h], axis=1).view(np.uint8)
    return np.concatenate([head, scales_l, _iq4_pack(idx).reshape(nb, 128)], axis=1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "q8_0": _q8_0,
    "q5_1": _q5_1,
    "q4_k": _q4_k,
    "q5_k": _q5_k,
    "q6_k": _q6_k,
    "iq4_nl": _iq4_nl,
    "iq4_xs": _iq4_xs,
}


# --- tensor-type mixes --------------------------------------------------------------------------

MIXES = ("q4_k_m", "q4_0", "iq4_nl", "q8_0")
# llama.cpp's fallback when a row is not a multiple of the chosen type's block.
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that Q4_K_M gives more bits: first, last eighth, every third between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _kept(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama-quantize leaves as they are (f32 in deepseek2 GGUFs): 1-D, norms, router."""
    return (
        len(shape) < 2
        or not name.endswith("weight")
        or "_norm.weight" in name
        or "ffn_gate_inp.weight" in name
    )


def _layer(name: str, n_layers: int) -> int:
    m = _LAYER.match(name)
    if not m:
        raise QuantizeError(f"cannot tell the layer of tensor {name!r} (expected blk.N.…)")
    i = int(m.group(1))
    if not 0 <= i < n_layers:
        raise QuantizeError(f"tensor {name!r}: layer {i} is outside 0..{n_layers - 1}")
    return i


def _fit_row(qtype: str, k: int) -> str:
    """``qtype`` if rows of ``k`` values fit its block, else llama.cpp's fallback, else f16."""
    if k % LAYOUTS[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, "q8_0")
    return qtype if k % LAYOUTS[qtype][0] == 0 else "f16"


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int) -> str:
    """llama.cpp's Q4_K_M type for deepseek2 GGUF tensor ``name`` (``shape``: numpy order, K last).

    Followed: llama.cpp src/llama-quant.cpp, llama_tensor_get_type_impl + tensor_type_fallback.
    Without imatrix, untied output, not 8 experts, that is: base q4_k; output.weight q6_k (q8_0
    if K % 256); token_embd q4_k; attn_kv_b / attn_v q6_k on the use_more_bits layers (llama.cpp
    counts them, one per layer: the counter is the layer); attn_qkv q5_k; every ffn_down* (dense,
    _exps, _shexp) q6_k on the use_more_bits layers (layer from the name, as for MoE); 1-D
    tensors, *_norm and ffn_gate_inp (router) f32 (not quantized); split attn_k_b / attn_v_b
    match no rule (q4_k). K not a multiple of 256: q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, and
    f16 where that does not fit either (attn_k_b's K = 128, ffn_down_exps' 1408, dense 10944).
    """
    shape = tuple(int(s) for s in shape)
    if _kept(name, shape):
        return "f32"
    k = shape[-1]
    if name == "output.weight":
        return _fit_row("q6_k" if k % 256 == 0 else "q8_0", k)
    qtype = "q4_k"
    if name == "token_embd.weight":
        pass
    elif "attn_qkv.weight" in name:
        qtype = "q5_k"
    elif "attn_kv_b.weight" in name or "attn_v.weight" in name:
        if use_more_bits(_layer(name, n_layers), n_layers):
            qtype = "q6_k"
    elif "ffn_down" in name:
        if use_more_bits(_layer(name, n_layers), n_layers):
            qtype = "q6_k"
    return _fit_row(qtype, k)


def mix_type(mix: str, name: str, shape: tuple[int, ...], n_layers: int) -> str:
    """Type of GGUF tensor ``name`` [..., K] under ``mix``: ``q4_k_m`` (llama.cpp's mix, see
    ``q4_k_m_type``) or a uniform ``q4_0`` / ``iq4_nl`` / ``q8_0`` (llama-quantize ``--pure``):
    that type for every weight of 2+ dimensions whose K fits its block, q8_0 where it does not
    (f16 if K is not a multiple of 32 either), f32 for 1-D tensors, norms and the router."""
    key = str(mix).lower()
    if key not in MIXES:
        raise QuantizeError(f"unknown quantization mix {mix!r}: use one of {', '.join(MIXES)}")
    if key == "q4_k_m":
        return q4_k_m_type(name, shape, n_layers)
    shape = tuple(int(s) for s in shape)
    if _kept(name, shape):
        return "f32"
    return _fit_row(key, shape[-1])
