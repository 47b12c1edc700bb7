"""Dense GEMM kernels (schedules/gemm.py) vs the float64 reference.

CPU tests build for llvm and run; CUDA static tests compile the tensor-core / GEMV kernels for
sm_89 and sm_90a with nvcc (no GPU needed); GPU tests run on a CUDA device when one is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler import reference
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import gemv_mma as GM
from mla_compiler.schedules.target import tvm_target

EPILOGUES = [None, "residual", "silu_mul"]


def _ref(x, w, *, epilogue, residual=None):
    """Reference in the torch layout: w is [N, K] or [gate; up] rows for silu_mul."""
    y = reference.gemm(x, w)
    if epilogue == "residual":
        y = y + residual.double()
    if epilogue == "silu_mul":
        n = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
    return y


def _inputs(m, n, k, *, epilogue, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = G.weight_layout(n, k, epilogue=epilogue)[0]
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(rows, k, generator=gen) / k**0.5).to(dtype)
    r = torch.randn(m, n, generator=gen).to(dtype) if epilogue == "residual" else None
    return x, w, r


def _run(lib, dev, x, w_kernel, r, out_shape, dtype):
    args = [tvm.runtime.tensor(x.numpy(), dev), tvm.runtime.tensor(w_kernel, dev)]
    if r is not None:
        args.append(tvm.runtime.tensor(r.numpy(), dev))
    poison = np.full(out_shape, np.nan, dtype=dtype)
    y = tvm.runtime.tensor(poison, dev)
    lib(*args, y)
    return torch.from_numpy(y.numpy())


@pytest.fixture(scope="module")
def cpu_libs():
    """Build each (symbolic-M) CPU kernel once; tests vary M at run time."""
    cache = {}

    def get(n, k, epilogue):
        key = (n, k, epilogue)
        if key not in cache:
            f = G.gemm(None, n, k, dtype="float32", target=tvm_target("cpu"), epilogue=epilogue)
            cache[key] = tvm.compile(f, target=tvm_target("cpu"))
        return cache[key]

    return get


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
@pytest.mark.parametrize("m", [1, 16, 37, 128], ids=lambda m: f"M{m}")
def test_gemm_cpu_fp32(cpu_libs, m, epilogue):
    n, k = 96, 80
    lib = cpu_libs(n, k, epilogue)
    x, w, r = _inputs(m, n, k, epilogue=epilogue, dtype=torch.float32, seed=m)
    y = _run(
        lib, tvm.cpu(), x, G.transform_weight(w.numpy(), epilogue=epilogue), r, (m, n), "float32"
    )
    torch.testing.assert_close(
        y.double(), _ref(x, w, epilogue=epilogue, residual=r), rtol=1e-4, atol=1e-4
    )


@pytest.fixture(scope="module")
def cpu_head_lib():
    f = G.gemm(None, 48, 40, dtype="float32", target=tvm_target("cpu"), batch=3)
    return tvm.compile(f, target=tvm_target("cpu"))


@pytest.mark.parametrize("m", [1, 21], ids=lambda m: f"M{m}")
def test_gemm_cpu_head_batched(cpu_head_lib, m):
    """Y[m, b, :] = X[m, b, :] @ W[b]^T, read and written in the [T, H, D] layout."""
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 3, 40, generator=gen)
    w = torch.randn(3, 48, 40, generator=gen) / 40**0.5
    y = tvm.runtime.tensor(np.full((m, 3, 48), np.nan, dtype="float32"), tvm.cpu())
    cpu_head_lib(tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(w.numpy()), y)
    ref = torch.einsum("mbk,bnk->mbn", x.double(), w.double())
    torch.testing.assert_close(torch.from_numpy(y.numpy()).double(), ref, rtol=1e-4, atol=1e-4)


def test_gemm_cpu_f16_in_f32_out():
    """out_dtype=float32 (the MoE router): f16 operands, f32 accumulate and store, no f16
    rounding of the result (the f32 matmul of the f16 values up to summation order)."""
    m, n, k = 19, 64, 256
    f = G.gemm(None, n, k, dtype="float16", target=tvm_target("cpu"), out_dtype="float32")
    lib = tvm.compile(f, target=tvm_target("cpu"))
    x, w, _ = _inputs(m, n, k, epilogue=None, dtype=torch.float16, seed=5)
    y = _run(lib, tvm.cpu(), x, w.numpy(), None, (m, n), "float32")
    assert y.dtype == torch.float32
    ref = reference.gemm(x, w)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # f16 output: ~1e-3


def test_transform_weight_pairs_gate_and_up():
    n, k = 64, 8
    w = np.arange(2 * n * k, dtype=np.float32).reshape(2 * n, k)
    t = G.transform_weight(w, epilogue="silu_mul")
    g = G.SWIGLU_GROUP
    # block b of 2g rows: gate rows b*g.., then the matching up rows n + b*g..
    np.testing.assert_array_equal(t[:g], w[:g])
    np.testing.assert_array_equal(t[g : 2 * g], w[n : n + g])
    np.testing.assert_array_equal(t[2 * g : 3 * g], w[g : 2 * g])


def test_config_prune():
    big = G.GemmConfig(warps_m=2, warps_n=4, warp_m=64, warp_n=64, block_k=64, stages=3)
    assert not G.keep(big, tvm_target("sm_89"))  # 165 KB > 99 KB
    assert G.keep(big, tvm_target("sm_90a"))
    deep = G.SMALL_M_CONFIGS["sm_90a"][0]  # 128 KB pipeline: H100 only
    assert not G.keep(deep, tvm_target("sm_89")) and G.keep(deep, tvm_target("sm_90a"))
    for arch in ("sm_89", "sm_90a"):
        t = tvm_target(arch)
        assert G.keep(G.default_config(t), t)
        small = G.default_config(t, 1)
        assert G.keep(small, t) and small.block_m == 16 and small in G.SMALL_M_CONFIGS[arch]
        assert G.default_config(t, 17) == G.default_config(t)


# ------------------------------------------------------------------------- CUDA static checks


CUDA_CASES = {  # (m, epilogue, extra factory kwargs) -> the SASS opcode the kernel must use
    (None, None, ()): "HMMA",
    (None, "silu_mul", ()): "HMMA",
    (None, "residual", ()): "HMMA",
    (None, None, (("out_dtype", "float32"),)): "HMMA",  # MoE router logits
    (None, None, (("batch", 16),)): "HMMA",  # absorbed W_UK / W_UV per head
    # decode, <= 8 tokens: the tensor-core GEMV (schedules/gemv_mma.py)
    (1, None, ()): "HMMA",
    (8, None, ()): "HMMA",
    (4, "silu_mul", ()): "HMMA",
    (1, "silu_mul", ()): "HMMA",
    (1, "residual", ()): "HMMA",
    (1, None, (("out_dtype", "float32"),)): "HMMA",
    (1, None, (("batch", 16),)): "HMMA",
    # 9..16 tokens: small-M tensor-core configs (ldmatrix, cp.async)
    (16, "silu_mul", ()): "HMMA",
    (12, None, ()): "HMMA",
    # the FMA GEMV, kept as a config for comparison
    (1, None, (("config", G.FmaGemvConfig()),)): "SHFL",
    (16, "silu_mul", (("config", G.SILU_GEMV),)): "SHFL",
}


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_gemm_cuda_static(arch):
    """Every kernel variant compiles with 0 spills and uses the instructions meant
    (one nvcc run per arch for all variants)."""
    nvcc = require_nvcc()
    funcs = {}
    for (m, ep, kw), op in CUDA_CASES.items():
        kw = dict(kw)
        n, k = (512, 128) if "batch" in kw else (576, 2048)
        f = G.gemm(m, n, k, dtype="float16", target=tvm_target(arch), epilogue=ep, **kw)
        if "config" in kw:
            f = f.with_attr("global_symbol", f.attrs["global_symbol"] + "_gemv")
        funcs[f] = op
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(mod, target=tvm_target(arch))
    cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), arch)
    ops = nvcc.sass_opcodes(cubin)
    assert len(res) == len(funcs) and all(name.startswith("gemm_") for name in res), res
    for (f, opcode), (m, _ep, kw) in zip(funcs.items(), CUDA_CASES, strict=True):
        name = f.attrs["global_symbol"] + "_kernel"
        wgmma = not isinstance(m, int) and not {"batch", "config"} & dict(kw).keys()
        if arch == "sm_90a" and opcode == "HMMA" and wgmma:
            opcode = "HGMMA"  # many rows on sm_90a: the wgmma kernel (schedules/gemm_wgmma.py)
        assert res[name].spill_bytes == 0, res[name]
        assert ops[name].get(opcode, 0) > 0, (name, ops[name])
        if opcode == "HMMA" and isinstance(m, int) and m <= GM.MAX_TOKENS:
            # weight rows straight from DRAM into mma registers: no shared-memory staging
            assert ops[name].get("LDG", 0) > 0 and ops[name].get("LDSM", 0) == 0, ops[name]
        elif opcode == "HMMA":
            assert ops[name].get("LDSM", 0) > 0 and ops[name].get("LDGSTS", 0) > 0, ops[name]


# ---------------------------------------------------------------------------------- GPU runs


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
@pytest.mark.parametrize("m", [1, 3, 8, 16, 37, 128, 1000], ids=lambda m: f"M{m}")
def test_gemm_gpu_f16(m, epilogue):
    n, k = 576, 2048
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(
        m if m <= G.GEMV_MAX_M else None, n, k, dtype="float16", target=target, epilogue=epilogue
    )
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    x, w, r = _inputs(m, n, k, epilogue=epilogue, dtype=torch.float16, seed=m)
    y = _run(
        lib, tvm.cuda(0), x, G.transform_weight(w.numpy(), epilogue=epilogue), r, (m, n), "float16"
    )
    torch.testing.assert_close(
        y.double(), _ref(x, w, epilogue=epilogue, residual=r), rtol=2e-2, atol=2e-2
    )


def _kernel_body(func, target):
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        src = tvm.compile(func, target=target).mod.imports[0].inspect_source()
    return src[src.index('extern "C" __global__') :]


def test_bf16_kernel_matches_f16_kernel():
    """Our bf16 ldmatrix/mma intrinsics give the f16 kernel's code with bf16 types only (the
    mma.sync path: sm_89; sm_90a sends symbolic-M GEMMs to the wgmma kernel)."""
    target = tvm_target("sm_89")
    make = lambda dt: G.gemm(None, 576, 512, dtype=dt, target=target, epilogue="silu_mul")  # noqa: E731
    bf16 = _kernel_body(make("bfloat16"), target)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in bf16
    for a, b in (
        ("nv_bfloat16", "half"),
        ("bf16", "f16"),
        ("__float2bfloat16_rn", "__float2half_rn"),
    ):
        bf16 = bf16.replace(a, b)
    assert bf16 == _kernel_body(make("float16"), target)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
@pytest.mark.parametrize("m", [2, 300], ids=lambda m: f"M{m}")
def test_gemm_gpu_bf16(m, epilogue):
    n, k = 576, 2048
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(
        m if m <= G.GEMV_MAX_M else None, n, k, dtype="bfloat16", target=target, epilogue=epilogue
    )
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    x, w, r = _inputs(m, n, k, epilogue=epilogue, dtype=torch.bfloat16, seed=7)
    w_k = torch.from_numpy(G.transform_weight(w.float().numpy(), epilogue=epilogue))
    args = [x.cuda(), w_k.to(torch.bfloat16).cuda()] + ([r.cuda()] if r is not None else [])
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    lib(*args, y)
    ref = _ref(x, w, epilogue=epilogue, residual=r)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=3e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("m", [1, 5, 37], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k", [(512, 128), (128, 512)], ids=["w_uk", "w_uv"])
def test_gemm_gpu_head_batched(m, n, k):
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(m if m <= G.GEMV_MAX_M else None, n, k, target=target, batch=16)
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, 16, k, generator=gen).half()
    w = (torch.randn(16, n, k, generator=gen) / k**0.5).half()
    y = torch.full((m, 16, n), float("nan"), dtype=torch.float16, device="cuda")
    lib(x.cuda(), w.cuda(), y)
    ref = torch.einsum("mbk,bnk->mbn", x.double(), w.double())
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("m", [1, 300], ids=lambda m: f"M{m}")
def test_gemm_gpu_f32_out(m):
    n, k = 64, 2048
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(m if m <= G.GEMV_MAX_M else None, n, k, target=target, out_dtype="float32")
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    x, w, _ = _inputs(m, n, k, epilogue=None, dtype=torch.float16, seed=m)
    y = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")
    lib(x.cuda(), w.cuda(), y)
    torch.testing.assert_close(y.cpu().double(), reference.gemm(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e or "plain")
def test_gemm_gpu_fma_gemv_config(epilogue):
    m, n, k = 1, 576, 2048
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    func = G.gemm(m, n, k, target=target, epilogue=epilogue, config=G.gemv_config(epilogue))
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(func, target=target)
    x, w, r = _inputs(m, n, k, epilogue=epilogue, dtype=torch.float16, seed=3)
    y = _run(
        lib, tvm.cuda(0), x, G.transform_weight(w.numpy(), epilogue=epilogue), r, (m, n), "float16"
    )
    torch.testing.assert_close(
        y.double(), _ref(x, w, epilogue=epilogue, residual=r), rtol=2e-2, atol=2e-2
    )


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    "m,n,k,epilogue,cfg",
    [
        (
            3,
            100,
            200,
            None,
            GM.GemvMmaConfig(tiles=1, warps=4, unroll=2),
        ),  # ragged rows, K % 32 != 0
        (8, 100, 1000, "residual", GM.GemvMmaConfig(tiles=2, warps=3, unroll=4)),  # uneven K split
        (1, 96, 520, "silu_mul", GM.GemvMmaConfig(tiles=4, warps=2, unroll=2)),
        (5, 64, 4096, None, GM.GemvMmaConfig(tiles=1, warps=16, unroll=8)),
    ],
    ids=["ragged", "uneven-split", "silu", "deep-unroll"],
)
def test_gemv_mma_gpu_configs(m, n, k, epilogue, cfg):
    """The tensor-core GEMV's masks: rows past N, K not a multiple of 32 or of the warp split."""
    target = tvm_target("sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89")
    lib = tvm.compile(G.gemm(m, n, k, target=target, epilogue=epilogue, config=cfg), target=target)
    x, w, r = _inputs(m, n, k, epilogue=epilogue, dtype=torch.float16, seed=n + k)
    y = _run(
        lib, tvm.cuda(0), x, G.transform_weight(w.numpy(), epilogue=epilogue), r, (m, n), "float16"
    )
    ref = _ref(x, w, epilogue=epilogue, residual=r)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_gemv_mma_operands_are_element_typed():
    """Every mma operand of the tensor-core GEMV points into a half / bf16 / f32 register array:
    an operand offset into a buffer TVM stores as ``uint4`` (one only accessed by 8-wide
    vectors) counts in 16-byte units and reads past the array (the NaNs of the first H100 run)."""
    import re

    target = tvm_target("sm_90a")
    funcs = {
        f"g{i}": G.gemm(m, 576, 2048, target=target, epilogue=ep, dtype=dt).with_attr(
            "global_symbol", f"g{i}"
        )
        for i, (m, ep, dt) in enumerate(
            [(1, None, "float16"), (8, "silu_mul", "float16"), (3, "residual", "bfloat16")]
        )
    }
    src = tvm.compile(tvm.IRModule(funcs), target=target).mod.imports[0].inspect_source()
    decl = dict((name, ty) for ty, name in re.findall(r"alignas\(\d+\) (\w+) (\w+)\[", src))
    operands = re.findall(r"\(\((?:unsigned|float) \*\)\((\w+) \+ \d+\)\)", src)
    assert operands, "no mma operands found"
    assert {decl[o] for o in operands} <= {"half", "nv_bfloat16", "float"}, {
        o: decl[o] for o in operands
    }
