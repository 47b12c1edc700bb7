"""Routed-expert kernels over GGUF-quantized expert weights (``weight_format=...``) vs float64.

The expert weights are drawn, quantized by ``model_export.quantize`` and the reference
(``reference.moe_experts``) runs over gguf-py's dequantization of the same blocks, so only the
kernels' f32 accumulation (and f16 storage on the GPU) differs. CPU tests run the llvm builds
of the grouped path (align, gate_up, down, combine) and the decode GEMVs; the CUDA static test
compiles the V2-Lite-sized kernels for sm_89 and sm_90a with nvcc; GPU tests run them where a
CUDA device is present. (Kept apart from test_moe_kernels.py, which is near the size limit.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler import reference
from mla_compiler.model_export import quantize as Q
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import moe as M
from mla_compiler.schedules import moe_gemv as MG
from mla_compiler.schedules.target import tvm_target

CPU = tvm_target("cpu")
E, K = 8, 2  # experts, top-k
# (gate_up format, down format): 256-value blocks need K % 256 == 0 (D = I = 256 here)
CPU_FORMATS = [
    ("q4_k", "q8_0"),
    ("q6_k", "q5_0"),
    ("q8_0", "iq4_nl"),
    ("q5_0", "q6_k"),
    ("iq4_nl", "q4_k"),
    ("q5_k", "q4_0"),
    ("iq4_xs", "q5_1"),
]


def _tensor(a, dev=None):
    return tvm.runtime.tensor(np.ascontiguousarray(a), dev or tvm.cpu())


def _poison(shape, dtype, dev=None):
    fill = np.nan if np.dtype(dtype).kind == "f" else -7  # -7 is never a valid id or row
    return tvm.runtime.tensor(np.full(shape, fill, dtype=dtype), dev or tvm.cpu())


def _case(t, d, inter, fmts, *, seed, skewed=False):
    """x, routing weights, ids, quantized (gate_up as [gate; up], down), the f64 reference."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    if skewed:  # expert 0 takes every token (several row blocks), experts 6, 7 none
        ids = np.stack([np.zeros(t, int), 1 + rng.integers(0, 5, t)], axis=1)
    else:
        ids = np.stack([rng.permutation(E)[:K] for _ in range(t)])
    wts = (rng.random((t, K)) + 0.1).astype(np.float32)
    gate_up = rng.standard_normal((E, 2 * inter, d)).astype(np.float32) / d**0.5
    down = rng.standard_normal((E, d, inter)).astype(np.float32) / inter**0.5
    gate_up[:, 0] *= 40.0  # a row of large values: wide block scales
    gq, dq = Q.quantize(gate_up, fmts[0]), Q.quantize(down, fmts[1])
    ref = reference.moe_experts(
        torch.from_numpy(x),
        torch.from_numpy(wts),
        torch.from_numpy(ids),
        torch.from_numpy(Q.dequantize(gq, fmts[0]).astype(np.float64)),
        torch.from_numpy(Q.dequantize(dq, fmts[1]).astype(np.float64)),
    ).numpy()
    # quantized gate_up stays in [gate; up] row order: the kernels read it interleaved
    return x, wts, ids, gq, dq, ref


def _grouped_libs(d, inter, fmts, target, build):
    bm = M.default_config(target).block_m
    dtype = "float32" if str(target.kind) == "llvm" else "float16"
    kw = dict(num_experts=E, top_k=K, target=target, dtype=dtype)
    return {
        "bm": bm,
        "align": build(M.moe_align(E, K, block_m=bm, target=target)),
        "gate_up": build(M.moe_gate_up(d, inter, **kw, weight_format=fmts[0])),
        "down": build(M.moe_down(d, inter, **kw, weight_format=fmts[1])),
        "combine": build(M.moe_combine(d, top_k=K, dtype=dtype, target=target)),
    }


def _run_grouped(libs, x, wts, ids, gq, dq, *, dev, dtype):
    t, d, bm = x.shape[0], x.shape[1], libs["bm"]
    nb = M.num_row_blocks(t, top_k=K, num_experts=E, block_m=bm)
    rows, blocks = _poison((nb * bm,), "int32", dev), _poison((nb,), "int32", dev)
    row_of = _poison((t * K,), "int32", dev)
    ws = _poison(((t + M.CHUNK - 1) // M.CHUNK, E), "int32", dev)
    offsets = _poison((E + 1,), "int32", dev)
    libs["align"](_tensor(ids.astype(np.int32), dev), rows, blocks, row_of, offsets, ws)
    h = _poison((nb * bm, gq.shape[1] // 2), dtype, dev)
    libs["gate_up"](_tensor(x.astype(dtype), dev), rows, blocks, _tensor(gq, dev), h)
    y = _poison((nb * bm, d), dtype, dev)
    libs["down"](h, rows, blocks, _tensor(dq, dev), _tensor(wts, dev), y)
    out = _poison((t, d), dtype, dev)
    libs["combine"](y, row_of, out)
    return out.numpy().astype(np.float64)


def _run_gemv(f_gu, f_dn, x, wts, ids, gq, dq, *, dev, dtype):
    t, d = x.shape
    ids_t = _tensor(ids.astype(np.int32), dev)
    h = _poison((t * K, gq.shape[1] // 2), dtype, dev)
    f_gu(_tensor(x.astype(dtype), dev), ids_t, _tensor(gq, dev), h)
    out = _poison((t, d), dtype, dev)
    f_dn(h, ids_t, _tensor(dq, dev), _tensor(wts, dev), out)
    return out.numpy().astype(np.float64)


def _close(got, ref, tol):
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert np.isfinite(got).all() and err < tol, err


def _cpu_build(f):
    return tvm.compile(f, target=CPU)


@pytest.mark.parametrize("fmts", CPU_FORMATS, ids="-".join)
def test_moe_quant_cpu(fmts):
    """Grouped path (T = 37 over 8 experts: partial row blocks, padding rows; T = 21 with one
    expert in every token) and the decode GEMVs (T = 5), gate_up and down in different formats,
    against the same kind of reference."""
    d = inter = 256
    libs = _grouped_libs(d, inter, fmts, CPU, _cpu_build)
    for t, skewed in ((37, False), (21, True)):
        x, wts, ids, gq, dq, ref = _case(t, d, inter, fmts, seed=t, skewed=skewed)
        _close(_run_grouped(libs, x, wts, ids, gq, dq, dev=tvm.cpu(), dtype="float32"), ref, 1e-5)
    _check_gemv_cpu(1024, 1024, fmts)  # K = 1024: 32 blocks of 32 per row, whole ones staged


def _check_gemv_cpu(d, inter, fmts, t=5):
    kw = dict(num_experts=E, top_k=K, dtype="float32", target=CPU)
    f_gu = _cpu_build(MG.moe_gate_up_gemv(d, inter, **kw, weight_format=fmts[0]))
    f_dn = _cpu_build(MG.moe_down_gemv(d, inter, **kw, weight_format=fmts[1]))
    x, wts, ids, gq, dq, ref = _case(t, d, inter, fmts, seed=t)
    _close(_run_gemv(f_gu, f_dn, x, wts, ids, gq, dq, dev=tvm.cpu(), dtype="float32"), ref, 1e-5)


SUPERBLOCK_CASES = [  # (D, I, formats): K = 8192 is 32 blocks of 256 per row
    (8192, 32, ("q4_k", "q8_0")),
    (8192, 32, ("q5_k", "iq4_nl")),
    (32, 8192, ("q5_0", "q6_k")),
    (32, 8192, ("q8_0", "iq4_xs")),
]


@pytest.mark.parametrize(("d", "inter", "fmts"), SUPERBLOCK_CASES)
def test_moe_gemv_quant_cpu_whole_superblocks(d, inter, fmts):
    """Rows long enough for every lane to stage whole 256-value blocks (gate_up or down)."""
    _check_gemv_cpu(d, inter, fmts, t=3)


# --------------------------------------------------------------------- CUDA static checks

# V2-Lite: hidden 2048, expert width 1408, 64 experts, top-6. down's K = 1408 is no multiple of
# 256: Q4_K_M files store it in q5_0 / q8_0 (32-value blocks)
V2 = dict(d=2048, inter=1408, gate_up=("q4_k", "q6_k"), down=("q5_0", "q8_0"))


def _static_kernels(target):
    kw = dict(num_experts=64, top_k=6, target=target)
    d, inter = V2["d"], V2["inter"]
    mma = ("HMMA", "LDSM", "LDG")  # tensor cores, ldmatrix, the decode's global loads
    out = {}
    for fmt in V2["gate_up"]:
        out[f"gate_up/{fmt}"] = (M.moe_gate_up(d, inter, **kw, weight_format=fmt), mma)
        out[f"gate_up_gemv/{fmt}"] = (
            MG.moe_gate_up_gemv(d, inter, **kw, weight_format=fmt),
            ("FFMA", "LDG"),
        )
    for fmt in V2["down"]:
        out[f"down/{fmt}"] = (M.moe_down(d, inter, **kw, weight_format=fmt), mma)
        out[f"down_gemv/{fmt}"] = (
            MG.moe_down_gemv(d, inter, **kw, weight_format=fmt),
            ("FFMA", "LDG"),
        )
    return out


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_moe_quant_cuda_static(arch):
    """The quantized grouped GEMMs keep tensor cores (decode inlined into the shared-memory
    weight fetch, no gather left as a host loop nest), the GEMVs decode in the FMA reduction;
    0 spills with nvcc's defaults and the model build's flags."""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    kernels = _static_kernels(target)
    for name, (f, _) in kernels.items():
        script = f.script()
        assert "gather_b" not in script and "gather_a" not in script, name
        assert f.attrs["global_symbol"].endswith("_" + name.split("/")[1]), name
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f, _ in kernels.values()})
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(mod, target=target)
    src = lib.mod.imports[0].inspect_source()
    cubin, res = nvcc.compile_cubin(src, arch)
    ops = nvcc.sass_opcodes(cubin)
    _, res_model = nvcc.compile_cubin(src, arch, extra_flags=nvcc.TVM_NVCC_FLAGS)
    assert len(res) == len(kernels), list(res)
    for name, r in [*res.items(), *res_model.items()]:
        assert r.spill_bytes == 0, (arch, name, r)
    for f, opcodes in kernels.values():
        kernel = f.attrs["global_symbol"] + "_kernel"
        for op in opcodes:
            assert ops[kernel].get(op, 0) > 0, (arch, kernel, op, ops[kernel])


# ---------------------------------------------------------------------------------- GPU run


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


def _gpu_target():
    return tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")


def _gpu_build(f):
    target = _gpu_target()
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        return tvm.compile(f, target=target)


GPU_CASES = [  # (D, I, gate_up format, down format)
    (2048, 1408, "q4_k", "q5_0"),
    (2048, 1408, "q6_k", "q8_0"),
    (256, 256, "iq4_nl", "q4_k"),
    (256, 256, "q8_0", "iq4_xs"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(("d", "inter", "fmt_gu", "fmt_dn"), GPU_CASES)
def test_moe_quant_gpu(d, inter, fmt_gu, fmt_dn):
    """f16 grouped path (T = 1, 70, 300: partial and several row blocks per expert) and the
    FMA decode GEMVs (T = 1, 8) on the device against the float64 reference."""
    fmts, dev = (fmt_gu, fmt_dn), tvm.cuda(0)
    libs = _grouped_libs(d, inter, fmts, _gpu_target(), _gpu_build)
    for t in (1, 70, 300):
        x, wts, ids, gq, dq, ref = _case(t, d, inter, fmts, seed=t, skewed=t == 70)
        _close(_run_grouped(libs, x, wts, ids, gq, dq, dev=dev, dtype="float16"), ref, 2e-2)
    kw = dict(num_experts=E, top_k=K, target=_gpu_target())
    f_gu = _gpu_build(MG.moe_gate_up_gemv(d, inter, **kw, weight_format=fmt_gu))
    f_dn = _gpu_build(MG.moe_down_gemv(d, inter, **kw, weight_format=fmt_dn))
    for t in (1, 8):
        x, wts, ids, gq, dq, ref = _case(t, d, inter, fmts, seed=t)
        _close(_run_gemv(f_gu, f_dn, x, wts, ids, gq, dq, dev=dev, dtype="float16"), ref, 2e-2)
