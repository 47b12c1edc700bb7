"""GGUF block decoders in TIR (schedules/quant_formats.py) vs gguf-py's dequantize, bit-exact.

Random GGUF blocks with finite f16 scale fields (extremes first: +-65504, subnormals, +-0, +-1),
K-quant 6-bit scale/min codes covering 0..63 at all 8 sub-block positions; outputs are poisoned
with NaN before each run.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import require_nvcc
from tvm import tirx
from tvm.script import tirx as T

from mla_compiler.schedules import quant_formats as QF
from mla_compiler.schedules.target import tvm_target

gguf = pytest.importorskip("gguf")

CPU = tvm.target.Target({"kind": "llvm"})
QUANTIZED = [f for f in QF.FORMATS.values() if f.block > 1]

# f16 bit patterns the scale fields take first: +-max, +-min subnormal, max subnormal, min
# normal, +-0, +-1
EXTREME_F16 = (0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x0000, 0x8000, 0x3C00, 0xBC00)
# byte offsets of the f16 scale fields in a block (d, and dmin for Q4_K / Q5_K)
F16_FIELDS = {"q5_1": (0, 2), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def _shapes(fmt) -> list[tuple[int, int]]:
    b = max(fmt.block, 32)
    return [(1, b), (5, 3 * b), (64, 4 * b if b == 32 else 2 * b)]


def _finite(bits: np.ndarray, exp_mask: int, kill_bit: int) -> np.ndarray:
    """Random float bit patterns with Inf/NaN (exponent all ones) turned finite."""
    return np.where(bits & exp_mask == exp_mask, bits ^ kill_bit, bits).astype(bits.dtype)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """[B, 8] 6-bit scales and mins -> the [B, 12] K-quant scale bytes (ggml's packing)."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _k_codes(nb: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 8] scale and min codes: even blocks walk 0..63 at every position (odd steps mod 64
    over 64 such blocks), odd blocks are random."""
    t, s = np.arange(nb)[:, None] // 2, np.arange(8)[None, :]
    sc = np.where(np.arange(nb)[:, None] % 2, rng.integers(0, 64, (nb, 8)), (5 * t + 11 * s + 3))
    mn = np.where(np.arange(nb)[:, None] % 2, rng.integers(0, 64, (nb, 8)), (3 * t + 17 * s + 7))
    return (sc % 64).astype(np.uint8), (mn % 64).astype(np.uint8)


def make_weight(fmt, n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, row_bytes(k)] u8 GGUF bytes: random, with finite float fields."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, fmt.row_bytes(k)), dtype=np.uint8)
    if fmt.name == "f32":
        return _finite(data.view(np.uint32), 0x7F800000, 1 << 30).view(np.uint8)
    if fmt.name in ("f16", "bf16"):
        mask = 0x7C00 if fmt.name == "f16" else 0x7F80
        return _finite(data.view(np.uint16), mask, 1 << 14).view(np.uint8)
    blocks = data.reshape(-1, fmt.block_bytes)  # [n * k / block, block_bytes] u8 (a view)
    nb = len(blocks)
    for f, off in enumerate(F16_FIELDS.get(fmt.name, (0,))):
        bits = _finite(rng.integers(0, 1 << 16, nb, dtype=np.uint16), 0x7C00, 1 << 14)
        first = min(nb, len(EXTREME_F16))
        bits[:first] = np.roll(EXTREME_F16, -3 * f)[:first]  # d and dmin differ
        blocks[:, off : off + 2] = bits.view(np.uint8).reshape(nb, 2)
    if fmt.name in ("q4_k", "q5_k"):
        blocks[:, 4:16] = _pack_k_scales(*_k_codes(nb, rng))
    return data


def reference(fmt, data: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(n, k)


_LIBS: dict = {}


def run_dequantize(fmt, data: np.ndarray, n: int, k: int, out_dtype: str) -> np.ndarray:
    key = (fmt.name, n, k, out_dtype)
    if key not in _LIBS:
        _LIBS[key] = tvm.compile(QF.dequantize_func(fmt, n, k, out_dtype=out_dtype), target=CPU)
    out = tvm.runtime.tensor(np.full((n, k), np.nan, dtype=out_dtype))
    _LIBS[key](tvm.runtime.tensor(data), out)
    return out.numpy()


CASES = [
    pytest.param(fmt, n, k, id=f"{fmt.name}-{n}x{k}")
    for fmt in QF.FORMATS.values()
    for n, k in _shapes(fmt)
]


@pytest.mark.parametrize(("fmt", "n", "k"), CASES)
def test_dequantize_bit_exact(fmt, n, k):
    data = make_weight(fmt, n, k)
    ref = reference(fmt, data, n, k)
    got = run_dequantize(fmt, data, n, k, "float32")
    assert np.isfinite(ref).all() and np.isfinite(got).all()
    bad = got.view(np.uint32) != ref.view(np.uint32)  # bit patterns: -0.0 != 0.0
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} differ, first at {np.argwhere(bad)[0]}: "
        f"{got[bad][:4]} vs {ref[bad][:4]}"
    )


@pytest.mark.parametrize("fmt", QF.FORMATS.values(), ids=lambda f: f.name)
def test_dequantize_f16_output(fmt):
    n, k = _shapes(fmt)[1]
    data = make_weight(fmt, n, k, seed=1)
    with np.errstate(over="ignore"):  # 65504 * 63 * 15 overflows f16: +-inf on both sides
        want = reference(fmt, data, n, k).astype(np.float16)
    got = run_dequantize(fmt, data, n, k, "float16")
    assert not np.isnan(got).any()
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_take_rows_bit_exact(fmt, index_dtype):
    """Embedding lookups from blocks: repeated, first and last rows; out-of-range ids clamp."""
    n, k = _shapes(fmt)[2]
    data = make_weight(fmt, n, k, seed=2)
    ref = reference(fmt, data, n, k)
    lib = tvm.compile(
        QF.take_rows_func(fmt, n, k, index_dtype=index_dtype, out_dtype="float32"), target=CPU
    )
    ids = np.array([5, n - 1, 0, 5, n + 3, -2], dtype=index_dtype)
    out = tvm.runtime.tensor(np.full((len(ids), k), np.nan, np.float32))
    lib(tvm.runtime.tensor(data), tvm.runtime.tensor(ids), out)
    want = ref[np.clip(ids, 0, n - 1)]
    assert np.array_equal(out.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_dequantize_cuda_static(arch):
    """Every decoder builds for CUDA (nvcc, both output dtypes): no spills, no local memory
    (the IQ4 codebook lives in immediates, not in a table)."""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    funcs = {
        f"dq_{f.name}_{od}": QF.dequantize_func(f, 4, 2 * f.block, out_dtype=od, target=target)
        for f in QF.FORMATS.values()
        for od in ("float32", "float16")
    }
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    src = tvm.compile(mod, target=target).mod.imports[0].inspect_source()
    _, res = nvcc.compile_cubin(src, arch)
    assert len(res) == len(funcs), list(res)
    for name, r in res.items():
        assert r.spill_bytes == 0 and r.stack_bytes == 0, (name, r)


def test_k_scale_codes_cover_every_position():
    """The generator really drives every 6-bit scale/min code through all 8 sub-blocks (checked
    with gguf-py's own unpacking), so the j<4 / j>=4 paths are both exercised in full."""
    fmt = QF.FORMATS["q4_k"]
    n, k = _shapes(fmt)[-1]
    blocks = make_weight(fmt, n, k).reshape(-1, fmt.block_bytes)
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    for codes in (sc, mn):
        for s in range(8):
            assert set(codes[:, s].tolist()) == set(range(64)), s


@pytest.mark.parametrize("fmt", [QF.FORMATS["q4_k"], QF.FORMATS["iq4_xs"], QF.FORMATS["q8_0"]],
                         ids=lambda f: f.name)  # fmt: skip
def test_value_in_gemv_reduction(fmt):
    """fmt.value inlined in a reduction, with int64 index expressions: y = W x."""
    n, k = 16, 2 * fmt.block
    rb = fmt.row_bytes(k)
    n64, k64, rb64 = (tirx.IntImm("int64", v) for v in (n, k, rb))

    @T.prim_func(s_tir=True)
    def gemv(
        x: T.Buffer((k64,), "float32"),
        wq: T.Buffer((n64, rb64), "uint8"),
        y: T.Buffer((n64,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "global_symbol": "gemv"})
        for i, c in T.grid(n64, k64):
            with T.sblock("gemv"):
                vi, vc = T.axis.remap("SR", [i, c])
                with T.init():
                    y[vi] = T.float32(0)
                y[vi] = y[vi] + x[vc] * fmt.value(wq, vi, vc)

    data = make_weight(fmt, n, k, seed=2)
    w = reference(fmt, data, n, k).astype(np.float64)
    x = np.random.default_rng(3).standard_normal(k).astype(np.float32)
    y = tvm.runtime.tensor(np.full(n, np.nan, np.float32))
    tvm.compile(gemv, target=CPU)(tvm.runtime.tensor(x), tvm.runtime.tensor(data), y)
    scale = np.abs(w) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(y.numpy() - w @ x) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.name)
def test_k_not_multiple_of_block_refused(fmt):
    k = fmt.block + 16
    with pytest.raises(ValueError, match=rf"{fmt.name}.*K={k}.*multiple of {fmt.block}"):
        fmt.row_bytes(k)
    with pytest.raises(ValueError, match=f"K={k}"):
        QF.dequantize_func(fmt, 4, k)


@pytest.mark.parametrize("ggml_type", [10, 11, 16, 999], ids=["q2_k", "q3_k", "iq2_xxs", "999"])
def test_unknown_ggml_type_refused(ggml_type):
    try:
        label = gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        label = str(ggml_type)
    with pytest.raises(ValueError, match="no TIR decoder") as err:
        QF.format_of_ggml_type(ggml_type)
    assert f"type {ggml_type}" in str(err.value) and label in str(err.value)


@pytest.mark.parametrize("fmt", QF.FORMATS.values(), ids=lambda f: f.name)
def test_format_table_matches_gguf(fmt):
    qtype = gguf.GGMLQuantizationType(fmt.ggml_type)
    assert qtype.name.lower() == fmt.name
    assert gguf.GGML_QUANT_SIZES[qtype] == (fmt.block, fmt.block_bytes)
    assert QF.format_of_ggml_type(qtype) is fmt
    assert fmt.row_bytes(4 * fmt.block) == 4 * fmt.block_bytes
    assert fmt.bits_per_weight == 8 * fmt.block_bytes / fmt.block


def test_bits_per_weight_and_codebook():
    bpw = {f: QF.FORMATS[f].bits_per_weight for f in ("q4_k", "q6_k", "q8_0", "iq4_xs")}
    assert bpw == {"q4_k": 4.5, "q6_k": 6.5625, "q8_0": 8.5, "iq4_xs": 4.25}
    assert QF.IQ4_KVALUES == gguf.quants.IQ4_NL.kvalues
