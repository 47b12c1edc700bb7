"""Decode GEMV on GGUF-quantized weights (schedules/quant_gemv.py) vs float64 references.

CPU (llvm): the plain kernel for every format, token counts 1 and 3, two shapes; the CUDA
schedule's own index math (staging, unit windows, padded x, lane sums) emulated on the CPU for
every format and a spread of configs; the exponent-trick decode bit-exact against gguf-py.
Weights are random floats quantized by ``model_export.quantize``; the reference is
``x @ dequantize(bytes).T`` in float64; outputs are poisoned with NaN before each run.
CUDA static checks build the V2-Lite decode shapes for sm_89 and sm_90a through nvcc (spills,
stack, vector loads); a GPU test runs the CUDA kernels where a device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import gpu_available, require_nvcc
from test_quant_formats import make_weight
from tvm.script import tirx as T

from mla_compiler.model_export.quantize import dequantize, quantize
from mla_compiler.schedules import quant_formats as QF
from mla_compiler.schedules import quant_gemv as QG
from mla_compiler.schedules.target import PASS_CONFIG, tvm_target

gguf = pytest.importorskip("gguf")

CPU = tvm_target("cpu")
FORMATS = ["q4_0", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]
C = QG.QuantGemvConfig


def _shapes(fmt: str) -> list[tuple[int, int]]:
    """Two (n, k) per format: K of 2 and 4 blocks of 256, or 16 and 44 blocks of 32 (44: rows
    whose byte count is not a multiple of 16 for Q5_0 / Q4_0)."""
    if QF.FORMATS[fmt].block == 256:
        return [(64, 512), (96, 1024)]
    return [(64, 512), (96, 1408)]


def _case(fmt: str, m: int, n: int, k: int, seed: int = 0):
    """(x [m, k] f16, GGUF bytes [n, row_bytes], float64 reference [m, n])."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq = quantize(w, fmt)
    wd = dequantize(wq, fmt).reshape(n, k).astype(np.float64)
    x = rng.standard_normal((m, k)).astype(np.float16)
    return x, wq, x.astype(np.float64) @ wd.T


def _run(lib, x, wq, n, dev=None):
    dev = dev or tvm.cpu()
    y = tvm.runtime.tensor(np.full((x.shape[0], n), np.nan, np.float16), dev)
    lib(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(wq, dev), y)
    return y.numpy().astype(np.float32)


def _close(out, ref):
    """f16 output: relative 2e-3 of the largest |y| (compared in f32), no NaN left."""
    assert np.isfinite(out).all(), "NaN left in the output (an element not written)"
    tol = 2e-3 * float(np.abs(ref).max())
    err = np.abs(out - ref.astype(np.float32))
    assert err.max() <= tol, (float(err.max()), tol, np.unravel_index(err.argmax(), err.shape))


CPU_CASES = [
    pytest.param(fmt, m, n, k, id=f"{fmt}-m{m}-n{n}-k{k}")
    for fmt in FORMATS
    for m in (1, 3)
    for n, k in _shapes(fmt)
]


@pytest.mark.parametrize(("fmt", "m", "n", "k"), CPU_CASES)
def test_cpu_numerics(fmt, m, n, k):
    x, wq, ref = _case(fmt, m, n, k, seed=m + k)
    lib = tvm.compile(QG.quant_gemv(m, n, k, target=CPU, weight_format=fmt), target=CPU)
    _close(_run(lib, x, wq, n), ref)


# The CUDA schedule emulated on the CPU: sm_90a's default config of each format at a small
# shape, and configs that take the other paths (K split over warps, two rows per lane, x in
# f16, a partial last chunk, 8-byte rows, LDS.64 / LDS.32 units, many tokens).
SM90 = tvm_target("sm_90a")
EMULATED = [(fmt, 2, 64, 2048 if QF.FORMATS[fmt].block == 256 else 1408, None) for fmt in FORMATS]
EMULATED += [
    ("q4_k", 3, 40, 1024, C(lanes=2, row_iters=2, warps_n=2, warps_k=2, group=16, x_f32=False)),
    ("q6_k", 1, 33, 1536, C(unit=2, lanes=2, warps_n=1, warps_k=3, group=16, chains=3)),
    ("q6_k", 1, 20, 1024, C(unit=4, lanes=1, warps_n=1, group=16, chains=1, x_f32=False)),
    ("q5_0", 2, 20, 1408, C(unit=4, lanes=4, warps_n=1, warps_k=2, group=8, chains=1)),
    ("q8_0", 1, 24, 768, C(unit=8, lanes=2, warps_n=2, group=32)),
    ("iq4_xs", 1, 24, 1024, C(unit=2, lanes=2, warps_n=2, group=32)),
    ("q4_0", 5, 24, 768, C(unit=8, lanes=1, warps_n=1, warps_k=3, group=8, chains=1)),
]


def _emu_id(case) -> str:
    fmt, m, n, k, cfg = case
    tag = "default" if cfg is None else f"u{cfg.unit}l{cfg.lanes}r{cfg.row_iters}k{cfg.warps_k}"
    return f"{fmt}-m{m}-n{n}-k{k}-{tag}"


@pytest.mark.parametrize(("fmt", "m", "n", "k", "cfg"), EMULATED, ids=map(_emu_id, EMULATED))
def test_cuda_schedule_emulated(fmt, m, n, k, cfg):
    cfg = cfg or QG.default_config(fmt, n, k, SM90, m)
    func = QG.quant_gemv(m, n, k, target=CPU, weight_format=fmt, config=cfg, emulate=True)
    x, wq, ref = _case(fmt, m, n, k, seed=n)
    _close(_run(tvm.compile(func, target=CPU), x, wq, n), ref)


@pytest.mark.parametrize("emulate", [False, True], ids=["cpu", "emulated"])
@pytest.mark.parametrize("fmt", ["q4_k", "q5_0", "q6_k"])
def test_residual_epilogue(fmt, emulate):
    """``residual=True``: (x, wq, r, y), y = x W^T + r added to the f32 sum before the store
    (the CPU build is the emulated schedule either way)."""
    m, n, k = 2, 48, 512 if QF.FORMATS[fmt].block == 256 else 320
    cfg = QG.default_config(fmt, n, k, SM90, m) if emulate else None
    func = QG.quant_gemv(
        m, n, k, target=CPU, weight_format=fmt, config=cfg, emulate=emulate, residual=True
    )
    x, wq, ref = _case(fmt, m, n, k, seed=7)
    r = np.random.default_rng(8).standard_normal((m, n)).astype(np.float16)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float16))
    lib = tvm.compile(func, target=CPU)
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(wq), tvm.runtime.tensor(r), y)
    _close(y.numpy().astype(np.float32), ref + r.astype(np.float64))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_decode_bit_exact(fmt):
    """The exponent-trick conversions keep every decoded value bit-identical to gguf-py's
    (random blocks with extreme f16 scales, test_quant_formats.make_weight)."""
    f = QF.FORMATS[fmt]
    n, k = 5, 3 * f.block if f.block == 256 else 8 * f.block
    rb = f.row_bytes(k)

    @T.prim_func
    def dequant(wq: T.Buffer((n, rb), "uint8"), w: T.Buffer((n, k))):
        for r, c in T.grid(n, k):
            w[r, c] = QG.fast_value(f, wq, r, c)

    data = make_weight(f, n, k, seed=4)
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(f.ggml_type)).reshape(n, k)
    got = tvm.runtime.tensor(np.full((n, k), np.nan, np.float32))
    tvm.compile(dequant, target=CPU)(tvm.runtime.tensor(data), got)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    assert "reinterpret" in dequant.script()  # the trick is in use


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k"])
def test_invalid_shapes_raise(fmt):
    block = QF.FORMATS[fmt].block
    for target in (CPU, SM90):
        with pytest.raises(ValueError, match=f"K={block + 16}"):
            QG.quant_gemv(1, 64, block + 16, target=target, weight_format=fmt)
        with pytest.raises(ValueError, match="1..8 tokens"):
            QG.quant_gemv(9, 64, 2 * block, target=target, weight_format=fmt)
    with pytest.raises(ValueError, match="not a multiple of unit=3"):
        QG.quant_gemv(1, 64, 4 * block, target=SM90, weight_format=fmt, config=C(unit=3))
    with pytest.raises(ValueError, match="lanes"):
        QG.quant_gemv(1, 64, 4 * block, target=SM90, weight_format=fmt, config=C(lanes=3))
    with pytest.raises(ValueError, match="shared memory"):
        QG.check(fmt, 8, 64, 64 * 256, C(x_f32=True, warps_n=8), tvm_target("sm_89"))
    with pytest.raises(ValueError, match="unknown quantized weight format"):
        QG.quant_gemv(1, 64, 256, target=SM90, weight_format="f16")


def test_bench_cpu_smoke(tmp_path):
    """``benchmarks/bench_quant_gemv.py --cpu-smoke`` on one shape, a 32- and a 256-block
    format: every case built, checked and timed (it once failed every case: it asked
    ``default_config``, sized for a GPU, for a config on the CPU target)."""
    import json

    from conftest import load_benchmark

    bench = load_benchmark("bench_quant_gemv")
    out = tmp_path / "smoke.json"
    argv = ["--out", str(out), "--cpu-smoke", "--formats", "q4_0,q4_k", "--shapes", "kv_a"]
    argv += ["--reps", "2"]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["format"], r["ok"]) for r in results] == [("q4_0", True), ("q4_k", True)]
    assert all(r["quant_us"] > 0 and r["config"] is None for r in results)


# --------------------------------------------------------------------- CUDA static checks

# V2-Lite decode products: (format, n, k) and the global / shared load widths expected
V2LITE = [
    ("q4_k", 3072, 2048),  # q_proj
    ("q5_0", 2048, 1408),  # routed expert down (Q4_K_M's fallback for K = 1408)
    ("q6_k", 2048, 2048),  # o_proj
    ("q8_0", 576, 2048),  # kv_a
    ("q6_k", 102400, 2048),  # lm_head
]


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_cuda_static(arch):
    """V2-Lite decode shapes (1 token; Q4_K also at 8; the other formats at 2048 x 2048) build
    through nvcc with the model build's flags: 0 spills, no stack frame; the weight arrives by
    the widest vector loads its rows allow (16 bytes, 8 for Q5_0's 968-byte rows), no byte
    loads from global memory; lanes read their units back with the unit's shared-load width;
    int -> float conversions take the exponent trick (no I2F); lanes meet through shuffles.
    (Each 8-token kernel takes nvcc 5-50 s: one is built here.)"""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    funcs, geo = {}, {}
    others = [(fmt, 2048, 2048, 1) for fmt in ("q4_0", "q5_k", "iq4_nl", "iq4_xs")]
    for fmt, n, k, m in [(*s, 1) for s in V2LITE] + others + [("q4_k", 3072, 2048, 8)]:
        f = QG.quant_gemv(m, n, k, target=target, weight_format=fmt)
        name = f.attrs["global_symbol"]
        funcs[name] = f
        geo[name] = QG.check(fmt, m, n, k, QG.default_config(fmt, n, k, target, m), target)
    with tvm.transform.PassContext(config=PASS_CONFIG):
        src = tvm.compile(tvm.IRModule(funcs), target=target).mod.imports[0].inspect_source()
    cubin, res = nvcc.compile_cubin(src, arch, extra_flags=nvcc.TVM_NVCC_FLAGS)
    for r in res.values():
        assert r.spill_bytes == 0 and r.stack_bytes == 0, (arch, r)
    loads = {
        k: [i.split()[1] for i in ins if i.split()[1].startswith(("LDG", "LDS"))]
        for k, ins in nvcc.sass_instructions(cubin).items()
    }
    ops = nvcc.sass_opcodes(cubin)
    for name, g in geo.items():
        kernel = f"{name}_kernel"
        assert kernel in res, (kernel, list(res))
        ldg = [op for op in loads[kernel] if op.startswith("LDG")]
        assert f"LDG.E.{8 * g.vec_copy}.CONSTANT" in ldg, (kernel, sorted(set(ldg)))
        assert all(".U8" not in op and ".U16" not in op for op in ldg), (kernel, ldg)
        lds = {8: "LDS.64", 16: "LDS.128"}.get(g.vec_read, "LDS")
        assert lds in loads[kernel], (kernel, g.vec_read, sorted(set(loads[kernel])))
        assert ops[kernel].get("I2F", 0) == 0, (kernel, "int -> float by I2F, not the trick")
        if g.cfg.lanes > 1:
            assert ops[kernel].get("SHFL", 0) > 0, kernel


# ---------------------------------------------------------------------------------- GPU run

GPU_CASES = [(fmt, m, n, k) for fmt, n, k in V2LITE[:4] for m in (1, 8)] + [
    (fmt, 3, 256, 1024 if QF.FORMATS[fmt].block == 256 else 1408) for fmt in FORMATS
]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    ("fmt", "m", "n", "k"), GPU_CASES, ids=[f"{f}-m{m}-n{n}-k{k}" for f, m, n, k in GPU_CASES]
)
def test_gpu_numerics(fmt, m, n, k):
    import torch

    arch = "sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89"
    target = tvm_target(arch)
    with tvm.transform.PassContext(config=PASS_CONFIG):
        lib = tvm.compile(QG.quant_gemv(m, n, k, target=target, weight_format=fmt), target=target)
    x, wq, ref = _case(fmt, m, n, k, seed=7)
    _close(_run(lib, x, wq, n, dev=tvm.cuda(0)), ref)
