"""Routed experts at decode over GGUF blocks (schedules/quant_moe_gemv.py) vs float64 over the
gguf-py-decoded weights: the CPU kernel, the CUDA schedule's index math emulated on the CPU
(slot offsets into x, the expert's blocks and y), nvcc static builds, and GPU runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler.model_export import quantize as Q
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import quant_gemv as QG
from mla_compiler.schedules import quant_moe_gemv as QM
from mla_compiler.schedules.target import PASS_CONFIG, tvm_target

E, TOP_K = 8, 3
CASES = [  # format, n, k, x per slot (the down projection)
    pytest.param("q4_k", 192, 512, False, id="q4_k-gate_up"),
    pytest.param("q6_k", 64, 256, False, id="q6_k-gate_up"),
    pytest.param("q5_0", 256, 96, True, id="q5_0-down"),
    pytest.param("q8_0", 128, 160, True, id="q8_0-down"),
    pytest.param("iq4_nl", 96, 128, False, id="iq4_nl-gate_up"),
]


def _case(fmt, n, k, per_slot, tokens, seed):
    rng = np.random.default_rng(seed)
    slots = tokens * TOP_K
    w = rng.standard_normal((E, n, k)).astype(np.float32) / k**0.5
    w[:, 0] *= 40.0  # wide block scales
    wq = Q.quantize(w, fmt)
    wd = Q.dequantize(wq, fmt).reshape(E, n, k).astype(np.float64)
    x = rng.standard_normal((slots if per_slot else tokens, k)).astype(np.float16)
    ids = np.stack([rng.permutation(E)[:TOP_K] for _ in range(tokens)]).astype(np.int32)
    rows = [x[s if per_slot else s // TOP_K].astype(np.float64) for s in range(slots)]
    ref = np.stack([r @ wd[ids[s // TOP_K, s % TOP_K]].T for s, r in enumerate(rows)])
    return x, wq, ids, ref


def _run(lib, dev, x, wq, ids, shape):
    y = tvm.runtime.tensor(np.full(shape, np.nan, np.float16), dev)  # poisoned
    lib(*(tvm.runtime.tensor(a, dev) for a in (x, wq, ids)), y)
    return y.numpy().astype(np.float64)


def _close(got, ref):
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert np.isfinite(got).all() and err < 2e-3, err


@pytest.mark.parametrize("emulate", [False, True], ids=["cpu", "emulated"])
@pytest.mark.parametrize(("fmt", "n", "k", "per_slot"), CASES)
def test_quant_moe_gemv_cpu(fmt, n, k, per_slot, emulate):
    tokens = 2
    cfg = QG.QuantGemvConfig(lanes=4, warps_n=2) if emulate else None
    func = QM.quant_moe_gemv(
        tokens, n, k, num_experts=E, top_k=TOP_K, target=tvm_target("cpu"),
        weight_format=fmt, x_per_slot=per_slot, config=cfg, emulate=emulate,
    )  # fmt: skip
    lib = tvm.compile(func, target=tvm_target("cpu"))
    x, wq, ids, ref = _case(fmt, n, k, per_slot, tokens, seed=n + k)
    _close(_run(lib, tvm.cpu(), x, wq, ids, (tokens * TOP_K, n)), ref)


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_silu_mul_epilogue_cpu(layout):
    """The SiLU·up epilogue after the GEMVs: [gate; up] columns (experts) or SWIGLU groups."""
    rng = np.random.default_rng(1)
    slots, inter = 6, 64
    g = rng.standard_normal((slots, 2 * inter)).astype(np.float16)
    h = tvm.runtime.tensor(np.full((slots, inter), np.nan, np.float16))
    func = G.silu_mul_epilogue(slots, inter, layout=layout, target=tvm_target("cpu"))
    tvm.compile(func, target="llvm")(tvm.runtime.tensor(g), h)
    if layout == "interleaved":  # back to [gate; up]: groups of SWIGLU_GROUP alternate
        g = g[:, np.argsort(G.swiglu_row_order(inter))]
    gate, up = g[:, :inter].astype(np.float64), g[:, inter:].astype(np.float64)
    np.testing.assert_allclose(h.numpy(), gate / (1 + np.exp(-gate)) * up, rtol=2e-3, atol=2e-3)


def test_weighted_sum_cpu():
    rng = np.random.default_rng(1)
    tokens, d = 2, 48
    y = rng.standard_normal((tokens * TOP_K, d)).astype(np.float16)
    w = rng.random((tokens, TOP_K)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((tokens, d), np.nan, np.float16))
    func = QM.moe_weighted_sum(tokens, d, top_k=TOP_K, target=tvm_target("cpu"))
    tvm.compile(func, target="llvm")(tvm.runtime.tensor(y), tvm.runtime.tensor(w), out)
    want = np.einsum("tj,tjd->td", w, y.reshape(tokens, TOP_K, d).astype(np.float64))
    np.testing.assert_allclose(out.numpy(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_quant_moe_gemv_cuda_static(arch):
    """V2-Lite's experts (64, top-6; gate_up 2816 x 2048, down 2048 x 1408): 0 spills, the
    weights copied with vector loads through shared memory, lane sums through shuffles."""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    funcs = {}
    shapes = [("q4_k", 2816, 2048, False), ("q6_k", 2816, 2048, False)]
    shapes += [("q5_0", 2048, 1408, True), ("q8_0", 2048, 1408, True)]
    for fmt, n, k, per_slot in shapes:
        f = QM.quant_moe_gemv(
            1, n, k, num_experts=64, top_k=6, target=target, weight_format=fmt,
            x_per_slot=per_slot,
        )  # fmt: skip
        funcs[f.attrs["global_symbol"]] = f
    with tvm.transform.PassContext(config=PASS_CONFIG):
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), arch)
    ops = nvcc.sass_opcodes(cubin)
    for name in funcs:
        kernel = name + "_kernel"
        assert res[kernel].spill_bytes == 0, res[kernel]
        for op in ("LDG", "STS", "LDS", "SHFL", "FFMA"):
            assert ops[kernel].get(op, 0) > 0, (kernel, op, ops[kernel])


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(("fmt", "n", "k", "per_slot"), CASES)
def test_quant_moe_gemv_gpu(fmt, n, k, per_slot):
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    for tokens in (1, 4):
        func = QM.quant_moe_gemv(
            tokens, n, k, num_experts=E, top_k=TOP_K, target=target, weight_format=fmt,
            x_per_slot=per_slot,
        )  # fmt: skip
        with tvm.transform.PassContext(config=PASS_CONFIG):
            lib = tvm.compile(func, target=target)
        x, wq, ids, ref = _case(fmt, n, k, per_slot, tokens, seed=tokens)
        _close(_run(lib, tvm.cuda(0), x, wq, ids, (tokens * TOP_K, n)), ref)
