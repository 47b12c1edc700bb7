"""Prompt GEMMs over GGUF-quantized weights (``gemm(..., weight_format=...)``) vs float64.

The weight is drawn, quantized by ``model_export.quantize`` and the reference multiplies by
gguf-py's dequantization of the same blocks, so only the kernel's f32 accumulation and f16
output differ. CPU tests run the llvm schedule; CUDA static tests compile the tensor-core
schedule (decode fused into the shared-memory weight loads) for sm_89 and sm_90a; GPU tests run
it where a CUDA device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler.model_export import quantize as Q
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules.target import tvm_target

FORMATS = ["q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q8_0", "iq4_nl", "iq4_xs"]
EPILOGUES = [None, "residual", "silu_mul"]


def _case(m, n, k, *, fmt, epilogue, seed, heads=None):
    """x, wq (kernel layout), r and the float64 reference output."""
    rng = np.random.default_rng(seed)
    rows = G.weight_layout(n, k, epilogue=epilogue)[0]
    lead = () if heads is None else (heads,)
    w = rng.standard_normal((*lead, rows, k)).astype(np.float32) / k**0.5
    w[..., 0, :] *= 40.0  # one row of large values: wide block scales
    wq = Q.quantize(w, fmt)
    wd = Q.dequantize(wq, fmt).astype(np.float64)
    x = rng.standard_normal((m, *lead, k)).astype(np.float16)
    r = rng.standard_normal((m, n)).astype(np.float16) if epilogue == "residual" else None
    if heads is None:
        acc = x.astype(np.float64) @ wd.T
    else:
        acc = np.einsum("thk,hnk->thn", x.astype(np.float64), wd)
    if epilogue == "residual":
        acc = acc + r
    if epilogue == "silu_mul":  # rows are [gate; up] interleaved in SWIGLU_GROUP groups
        g, j = G.SWIGLU_GROUP, np.arange(n)
        gate, up = acc[:, j // g * 2 * g + j % g], acc[:, j // g * 2 * g + j % g + g]
        acc = gate / (1 + np.exp(-gate)) * up
    return x, wq, r, acc


def _run(lib, dev, x, wq, r, out_shape):
    args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(wq, dev)]
    if r is not None:
        args.append(tvm.runtime.tensor(r, dev))
    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float16), dev)  # poisoned
    lib(*args, y)
    return y.numpy().astype(np.float64)


def _close(got, ref):
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert np.isfinite(got).all() and err < 2e-3, err


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_gemm_cpu(fmt, epilogue):
    n, k, m = 128, 512, 19
    func = G.gemm(None, n, k, target=tvm_target("cpu"), epilogue=epilogue, weight_format=fmt)
    lib = tvm.compile(func, target=tvm_target("cpu"))
    x, wq, r, ref = _case(m, n, k, fmt=fmt, epilogue=epilogue, seed=len(fmt))
    _close(_run(lib, tvm.cpu(), x, wq, r, (m, n)), ref)


def test_quant_gemm_cpu_head_batched():
    """Per-head products [T, H, K] x [H, N, K] with each head's blocks."""
    h, n, k, m = 4, 64, 256, 9
    func = G.gemm(None, n, k, target=tvm_target("cpu"), batch=h, weight_format="q8_0")
    lib = tvm.compile(func, target=tvm_target("cpu"))
    x, wq, _, ref = _case(m, n, k, fmt="q8_0", epilogue=None, seed=5, heads=h)
    _close(_run(lib, tvm.cpu(), x, wq, None, (m, h, n)), ref)


def test_quant_gemm_refuses_a_gemv_config():
    with pytest.raises(ValueError, match="no quantized-weight form"):
        G.gemm(
            None, 128, 512, target=tvm_target("sm_89"), config=G.FmaGemvConfig(),
            weight_format="q4_k",
        )  # fmt: skip


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_quant_gemm_cuda_static(arch):
    """Every format x epilogue compiles with 0 spills into mma.sync fed from shared memory
    (ldmatrix), activations through cp.async, weights decoded from global loads."""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    funcs = {}
    for i, fmt in enumerate(FORMATS):
        epilogue = EPILOGUES[i % len(EPILOGUES)]
        f = G.gemm(None, 1408, 2048, target=target, epilogue=epilogue, weight_format=fmt)
        funcs[f.attrs["global_symbol"]] = f
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), arch)
    ops = nvcc.sass_opcodes(cubin)
    assert len(res) == len(funcs), res
    for name in funcs:
        kernel = name + "_kernel"
        assert res[kernel].spill_bytes == 0, res[kernel]
        for op in ("HMMA", "LDSM", "LDGSTS", "LDG"):
            assert ops[kernel].get(op, 0) > 0, (kernel, op, ops[kernel])
        assert ops[kernel].get("HGMMA", 0) == 0  # the wgmma kernel has no decode yet


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_gemm_gpu(fmt, epilogue):
    """Row counts below, at and past the 128-row tile (predicated loads and stores)."""
    n, k = 576, 2048
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(None, n, k, target=target, epilogue=epilogue, weight_format=fmt)
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    for m in (1, 16, 300):
        x, wq, r, ref = _case(m, n, k, fmt=fmt, epilogue=epilogue, seed=m)
        _close(_run(lib, tvm.cuda(0), x, wq, r, (m, n)), ref)
