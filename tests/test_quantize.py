"""Weight quantizer: GGUF block bytes that gguf-py decodes, an error no worse than plain per-block
rounding of the same width, and llama.cpp's Q4_K_M tensor types on DeepSeek-V2-Lite's tensors."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mla_compiler.model_export import quantize as qz  # noqa: E402

GQ = gguf.GGMLQuantizationType
TYPES = qz.QTYPES

# Plain baseline of the same width: (bits, symmetric). Symmetric: per 32 values d = absmax /
# (2^(bits-1) - 1), levels -2^(bits-1)..2^(bits-1)-1; asymmetric: d = (max - min) / (2^bits - 1),
# offset min, levels 0..2^bits-1. Scales and offsets rounded to f16, values rounded against those.
BASELINE = {
    "q8_0": (8, True),
    "q4_0": (4, True),
    "q5_0": (5, True),
    "q5_1": (5, False),
    "q4_k": (4, False),
    "q5_k": (5, False),
    "q6_k": (6, True),
    "iq4_nl": (4, True),
    "iq4_xs": (4, True),
}
# rel RMS error on gaussian weights: well inside what each width gives.
TYPICAL = {
    "q8_0": 0.01,
    "q6_k": 0.025,
    "q5_0": 0.05,
    "q5_1": 0.05,
    "q5_k": 0.05,
    "q4_0": 0.1,
    "q4_k": 0.1,
    "iq4_nl": 0.1,
    "iq4_xs": 0.1,
}


def baseline(w: np.ndarray, qtype: str) -> np.ndarray:
    """Reference: plain absmax (symmetric) or min/max (asymmetric) rounding per 32 values."""
    bits, symmetric = BASELINE[qtype]
    b = w.reshape(-1, 32).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            top = 2 ** (bits - 1) - 1
            d = (np.abs(b).max(1, keepdims=True) / top).astype(np.float16).astype(np.float32)
            q = np.where(d > 0, np.clip(np.rint(b / d), -top - 1, top), 0)
            out = q * d
        else:
            top = 2**bits - 1
            lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
            d = ((hi - lo) / top).astype(np.float16).astype(np.float32)
            m = lo.astype(np.float16).astype(np.float32)
            q = np.where(d > 0, np.clip(np.rint((b - m) / d), 0, top), 0)
            out = q * d + m
    return out.reshape(w.shape).astype(np.float32)


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    """gguf-py's decoder: the definition of correct bytes."""
    return gguf.quants.dequantize(data, GQ[qtype.upper()])


def rel_rms(approx: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - w) ** 2) / np.mean(w.astype(np.float64) ** 2)))


def weights(kind: str, shape=(64, 1024), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if kind == "outliers":  # ~1 in 256 values 8-20x larger
        hit = rng.random(shape) < 1 / 256
        w[hit] *= rng.uniform(8, 20, hit.sum())
    elif kind == "heavy-tailed":
        w = rng.standard_t(3, shape)
    elif kind == "row-scales":  # rows 1e-2 .. 1e2 times as large
        w *= np.logspace(-2, 2, shape[0])[:, None]
    return (0.02 * w).astype(np.float32)


# --- bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES)
def test_layout_is_gguf_pys(qtype):
    assert qz.LAYOUTS[qtype] == gguf.GGML_QUANT_SIZES[GQ[qtype.upper()]]


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_decode_with_gguf_py(qtype):
    w = weights("gaussian", (8, 512))
    data = qz.quantize(w, qtype)
    bs, ts = qz.LAYOUTS[qtype]
    assert data.dtype == np.uint8 and data.shape == (8, 512 // bs * ts)
    assert data.shape[1] == qz.row_bytes(512, qtype)
    out = decode(data, qtype)
    assert out.shape == w.shape and np.isfinite(out).all()
    assert rel_rms(out, w) < TYPICAL[qtype]
    np.testing.assert_array_equal(qz.dequantize(data, qtype), out)


@pytest.mark.parametrize("qtype", TYPES)
def test_batched_and_chunked_bytes_equal(qtype, monkeypatch):
    """Experts [E, N, K] quantize as their rows; chunking the work does not change a byte."""
    w = weights("outliers", (3, 4, 512), seed=1)
    whole = qz.quantize(w, qtype)
    assert whole.shape == (3, 4, qz.row_bytes(512, qtype))
    np.testing.assert_array_equal(whole.reshape(12, -1), qz.quantize(w.reshape(12, 512), qtype))
    monkeypatch.setattr(qz, "_CHUNK", 256)
    np.testing.assert_array_equal(whole, qz.quantize(w, qtype))


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0"])
def test_gguf_py_quantizes_the_legacy_types(qtype):
    w = weights("gaussian", (4, 256))
    np.testing.assert_array_equal(qz.quantize(w, qtype), gguf.quants.quantize(w, GQ[qtype.upper()]))


def test_gguf_file_round_trip(tmp_path):
    """Bytes written as GGUF tensors read back with gguf-py's reader and decode the same."""
    w = weights("gaussian", (4, 512))
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    for qtype in TYPES:
        writer.add_tensor(qtype, qz.quantize(w, qtype), raw_dtype=GQ[qtype.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(str(path)).tensors:
        assert t.tensor_type == GQ[t.name.upper()] and list(t.shape) == [512, 4]
        out = decode(np.asarray(t.data), t.name)
        np.testing.assert_array_equal(out, qz.dequantize(qz.quantize(w, t.name), t.name))


# --- quality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "heavy-tailed", "row-scales"])
@pytest.mark.parametrize("qtype", TYPES)
def test_error_no_worse_than_plain_rounding(qtype, kind):
    w = weights(kind)
    ours = rel_rms(decode(qz.quantize(w, qtype), qtype), w)
    base = rel_rms(baseline(w, qtype), w)
    assert ours <= base * (1 + 1e-6), f"{qtype} {kind}: rel RMS {ours:.5f} > baseline {base:.5f}"
    if kind == "gaussian":
        assert ours < TYPICAL[qtype]


# Rows of one block of 256, and the rel RMS error each may have (default 1%).
ROWS = {
    "zeros": 0.0,
    "constant 0.37": 0.37,
    "constant -2.5": -2.5,
    "+-1 alternating": np.resize(np.float32([1, -1]), 256),
    "constant 1e-3": 1e-3,
    "one 5.0 among zeros": np.eye(1, 256, 17, dtype=np.float32)[0] * 5,
    "ramp +-1e-4": np.linspace(-1e-4, 1e-4, 256),
}
ROW_LIMITS = {
    # llama.cpp's (gguf-py's) q4_0 / q5_0 map the first value of largest |x| to level -8 / -16:
    # with +m and -m in one block, the other side clips to 7/8 m (15/16 m).
    ("q4_0", "+-1 alternating"): 0.1,
    ("q5_0", "+-1 alternating"): 0.05,
    # The IQ4 table has no zero and no level pair +-a: zeros beside a lone value decode to +-d.
    ("iq4_nl", "+-1 alternating"): 0.07,
    ("iq4_xs", "+-1 alternating"): 0.07,
    ("iq4_nl", "one 5.0 among zeros"): 0.05,
    ("iq4_xs", "one 5.0 among zeros"): 0.05,
    # 1e-3 / 127 / 32: iq4_xs's super-block scale is an f16 subnormal (steps of 6e-8).
    ("iq4_xs", "constant 1e-3"): 0.02,
}


@pytest.mark.parametrize("qtype", TYPES)
def test_constant_zero_and_tiny_rows(qtype):
    rows = np.stack([np.broadcast_to(np.float32(v), (256,)) for v in ROWS.values()])
    out = decode(qz.quantize(rows, qtype), qtype)
    assert np.isfinite(out).all()
    assert (out[0] == 0).all()
    err = np.sqrt(((out - rows) ** 2).mean(1) / (rows**2).mean(1).clip(1e-30))
    for name, e in list(zip(ROWS, err, strict=True))[1:]:
        limit = TYPICAL[qtype] if name.startswith("ramp") else 0.01
        assert e < ROW_LIMITS.get((qtype, name), limit), f"{qtype} {name}: rel RMS {e:.4f}"


@pytest.mark.parametrize("qtype", TYPES)
def test_bad_input_refused(qtype):
    bs = qz.LAYOUTS[qtype][0]
    for shape in [(4, bs + 16), (4, 0), (bs + 16,)]:
        with pytest.raises(ValueError, match=rf"shape \({shape[0]}.*{qtype}"):
            qz.quantize(np.ones(shape, np.float32), qtype)
    bad = np.ones((2, bs), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        qz.quantize(bad, qtype)
    with pytest.raises(ValueError, match="f16 range"):
        qz.quantize(np.full((1, bs), 1e6, np.float32), qtype)


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_unquantized_types_are_plain_bytes(qtype):
    w = weights("gaussian", (3, 40))
    data = qz.quantize(w, qtype)
    assert data.shape == (3, 40 * qz.LAYOUTS[qtype][1])
    dtype = {"f32": "<f4", "f16": "<f2"}[qtype]
    np.testing.assert_array_equal(data.view(dtype), w.astype(dtype))
    np.testing.assert_array_equal(qz.dequantize(data, qtype), w.astype(dtype).astype(np.float32))


def test_unknown_type_refused():
    with pytest.raises(ValueError, match="unknown quantization type 'q3_k'"):
        qz.quantize(np.ones((1, 256), np.float32), "q3_k")


def test_torch_bf16_input():
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 256, dtype=torch.bfloat16)
    out = decode(qz.quantize(w, "q8_0"), "q8_0")
    assert rel_rms(out, w.float().numpy()) < 0.01


# --- tensor-type mixes on DeepSeek-V2-Lite ------------------------------------------------------

N_LAYERS = 27
# use_more_bits(i, 27): first 3, last 4 (i >= 23), and i - 3 = 2 mod 3 between.
MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26}


def v2_lite_tensors(split_kv_b: bool) -> dict[str, tuple[int, ...]]:
    """GGUF names and numpy shapes (K last) of V2-Lite as llama.cpp's converter writes them."""
    hidden, heads, nope, rope, v, kv_lora = 2048, 16, 128, 64, 128, 512
    t = {
        "token_embd.weight": (102400, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (102400, hidden),
    }
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (hidden,)
        t[p + "attn_q.weight"] = (heads * (nope + rope), hidden)
        t[p + "attn_kv_a_mqa.weight"] = (kv_lora + rope, hidden)
        t[p + "attn_kv_a_norm.weight"] = (kv_lora,)
        if split_kv_b:
            t[p + "attn_k_b.weight"] = (heads, kv_lora, nope)
            t[p + "attn_v_b.weight"] = (heads, v, kv_lora)
        else:
            t[p + "attn_kv_b.weight"] = (heads * (nope + v), kv_lora)
        t[p + "attn_output.weight"] = (hidden, heads * v)
        t[p + "ffn_norm.weight"] = (hidden,)
        if i == 0:
            t[p + "ffn_gate.weight"] = (10944, hidden)
            t[p + "ffn_up.weight"] = (10944, hidden)
            t[p + "ffn_down.weight"] = (hidden, 10944)
        else:
            t[p + "ffn_gate_inp.weight"] = (64, hidden)
            t[p + "ffn_gate_exps.weight"] = (64, 1408, hidden)
            t[p + "ffn_up_exps.weight"] = (64, 1408, hidden)
            t[p + "ffn_down_exps.weight"] = (64, hidden, 1408)
            t[p + "ffn_gate_shexp.weight"] = (2 * 1408, hidden)
            t[p + "ffn_up_shexp.weight"] = (2 * 1408, hidden)
            t[p + "ffn_down_shexp.weight"] = (hidden, 2 * 1408)
    return t


def test_use_more_bits_layers():
    assert {i for i in range(N_LAYERS) if qz.use_more_bits(i, N_LAYERS)} == MORE_BITS


@pytest.mark.parametrize("split_kv_b", [False, True], ids=["kv_b", "split-k_b-v_b"])
def test_q4_k_m_on_v2_lite(split_kv_b):
    tensors = v2_lite_tensors(split_kv_b)
    got = {n: qz.q4_k_m_type(n, s, N_LAYERS) for n, s in tensors.items()}
    for name, shape in tensors.items():
        block = 1 if got[name] == "f32" else qz.LAYOUTS[got[name]][0]
        assert shape[-1] % block == 0, (name, shape, got[name])
    assert got["output.weight"] == "q6_k"
    assert got["token_embd.weight"] == "q4_k"
    assert {got[n] for n in got if n.endswith("_norm.weight")} == {"f32"}
    assert {got[n] for n in got if "ffn_gate_inp" in n} == {"f32"}
    for i in range(N_LAYERS):
        p, more = f"blk.{i}.", i in MORE_BITS
        for name in ("attn_q", "attn_kv_a_mqa", "attn_output"):
            assert got[p + name + ".weight"] == "q4_k"
        if split_kv_b:
            assert got[p + "attn_k_b.weight"] == "q5_0"  # K = 128: q4_k's fallback
            assert got[p + "attn_v_b.weight"] == "q4_k"
        else:
            assert got[p + "attn_kv_b.weight"] == ("q6_k" if more else "q4_k")
        if i == 0:
            assert got[p + "ffn_gate.weight"] == got[p + "ffn_up.weight"] == "q4_k"
            assert got[p + "ffn_down.weight"] == "q8_0"  # q6_k, but K = 10944
            continue
        assert got[p + "ffn_gate_exps.weight"] == got[p + "ffn_up_exps.weight"] == "q4_k"
        assert got[p + "ffn_gate_shexp.weight"] == got[p + "ffn_up_shexp.weight"] == "q4_k"
        # K = 1408 is no multiple of 256: never a K-quant.
        assert got[p + "ffn_down_exps.weight"] == ("q8_0" if more else "q5_0")
        assert got[p + "ffn_down_shexp.weight"] == ("q6_k" if more else "q4_k")  # K = 2816


@pytest.mark.parametrize("mix", ["q4_0", "iq4_nl", "q8_0"])
def test_uniform_mixes_on_v2_lite(mix):
    for name, shape in v2_lite_tensors(split_kv_b=True).items():
        want = "f32" if len(shape) == 1 or "ffn_gate_inp" in name else mix
        assert qz.mix_type(mix, name, shape, N_LAYERS) == want, name
    assert qz.mix_type(mix, "blk.0.attn_kv_b.weight", (4096, 512), N_LAYERS) == mix


def test_mix_fallbacks_and_errors():
    assert qz.mix_type("Q4_K_M", "blk.3.ffn_up.weight", (64, 2048), 8) == "q4_k"
    assert qz.mix_type("q4_k_m", "blk.3.ffn_up.weight", (64, 96), 8) == "q5_0"
    assert qz.mix_type("q4_k_m", "blk.0.ffn_down.weight", (64, 96), 8) == "q8_0"
    assert qz.mix_type("q4_k_m", "blk.3.ffn_up.weight", (64, 100), 8) == "f16"
    assert qz.mix_type("q4_k_m", "output.weight", (64, 96), 8) == "q8_0"
    assert qz.mix_type("q4_k_m", "blk.0.attn_qkv.weight", (64, 96), 8) == "q5_1"
    assert qz.mix_type("q4_0", "blk.3.ffn_up.weight", (64, 100), 8) == "f16"
    assert qz.mix_type("iq4_nl", "blk.3.ffn_up.weight", (4, 64, 96), 8) == "iq4_nl"
    with pytest.raises(ValueError, match="unknown quantization mix 'q2_k'"):
        qz.mix_type("q2_k", "output.weight", (64, 256), 8)
    with pytest.raises(ValueError, match="layer 9"):
        qz.q4_k_m_type("blk.9.ffn_down.weight", (64, 256), 8)
    with pytest.raises(ValueError, match="cannot tell the layer"):
        qz.q4_k_m_type("ffn_down.weight", (64, 256), 8)


def test_q4_k_m_tensor_quantizes():
    """What the mix picks, quantize() takes: one expert slab per fallback type."""
    tensors = v2_lite_tensors(split_kv_b=True)
    for name in (
        "blk.1.ffn_down_exps.weight",
        "blk.3.ffn_down_exps.weight",
        "blk.0.attn_k_b.weight",
    ):
        shape = (2, 32, tensors[name][-1])
        qtype = qz.q4_k_m_type(name, tensors[name], N_LAYERS)
        w = weights("gaussian", shape)
        assert rel_rms(decode(qz.quantize(w, qtype), qtype), w) < TYPICAL[qtype]
