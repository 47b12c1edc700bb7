"""MoE kernels (schedules/moe.py) vs the float64 references.

CPU (llvm) runs at fp32; CUDA static checks compile every kernel for sm_89 and sm_90a with nvcc;
GPU tests run the whole routed-expert pipeline at f16 when a CUDA device is present.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler import reference
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import moe as M
from mla_compiler.schedules import moe_gemv as MG
from mla_compiler.schedules.target import tvm_target

CPU = tvm_target("cpu")
E, K, D, INTER = 8, 2, 64, 64  # small layer for CPU runs


def _tensor(a, dev=None):
    return tvm.runtime.tensor(np.ascontiguousarray(a), dev or tvm.cpu())


def _poison(shape, dtype, dev=None):
    fill = np.nan if np.dtype(dtype).kind == "f" else -7  # -7 is never a valid id or row
    return tvm.runtime.tensor(np.full(shape, fill, dtype=dtype), dev or tvm.cpu())


# ---------------------------------------------------------------------------------- routing

ROUTES = {
    "greedy": M.RouteSpec(num_experts=16, top_k=4),
    "greedy-norm-scaled": M.RouteSpec(
        num_experts=16, top_k=4, norm_topk_prob=True, routed_scaling_factor=2.5
    ),
    "group_limited": M.RouteSpec(
        num_experts=16,
        top_k=3,
        method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=16.0,
    ),
}


def _ref_route(spec, logits):
    return reference.moe_route_lowest_index(
        logits,
        top_k=spec.top_k,
        method=spec.method,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=spec.routed_scaling_factor,
    )


def _run_route(spec, logits):
    lib = tvm.compile(M.moe_route(spec, target=CPU), target=CPU)
    t = logits.shape[0]
    w, ids = _poison((t, spec.top_k), "float32"), _poison((t, spec.top_k), "int32")
    lib(_tensor(logits.numpy()), w, ids)
    return torch.from_numpy(w.numpy()), torch.from_numpy(ids.numpy())


def _logits(t, e, *, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=gen)
    if ties == "all_equal":
        x[:] = 0.25
    elif ties == "pairs":  # experts 2k and 2k+1 share a logit
        x = x[:, ::2].repeat_interleave(2, dim=1)
    return x


@pytest.mark.parametrize("ties", ["none", "pairs", "all_equal"])
@pytest.mark.parametrize("t", [1, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(ROUTES))
def test_route_cpu(name, t, ties):
    spec = ROUTES[name]
    logits = _logits(t, spec.num_experts, ties=ties, seed=t)
    w, ids = _run_route(spec, logits)
    w_ref, ids_ref = _ref_route(spec, logits)
    torch.testing.assert_close(ids.long(), ids_ref)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-5, atol=1e-6)


def test_route_tie_rule_is_lowest_index():
    spec = ROUTES["greedy"]
    _, ids = _run_route(spec, _logits(3, spec.num_experts, ties="all_equal", seed=0))
    assert ids.tolist() == [list(range(spec.top_k))] * 3


# --------------------------------------------------------------------------------- grouping


def _ids(t, *, load, seed):
    """Expert ids [t, K] (distinct per token) with a chosen load pattern."""
    gen = torch.Generator().manual_seed(seed)
    if load == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)])
    if load == "one_expert_all":  # expert 5 gets every token; experts 0, 1, 2 get none
        other = 3 + torch.randint(0, 2, (t,), generator=gen)
        return torch.stack([torch.full((t,), 5), other], dim=1)
    if load == "skewed":  # experts 6, 7 empty, expert 0 heavy
        first = torch.zeros(t, dtype=torch.long)
        second = 1 + torch.randint(0, 5, (t,), generator=gen)
        return torch.stack([first, second], dim=1)
    raise ValueError(load)


@pytest.fixture(scope="module")
def libs():
    bm = M.default_config(CPU).block_m
    build = lambda f: tvm.compile(f, target=CPU)  # noqa: E731
    return {
        "bm": bm,
        "align": build(M.moe_align(E, K, block_m=bm, target=CPU)),
        "gate_up": build(
            M.moe_gate_up(D, INTER, num_experts=E, top_k=K, dtype="float32", target=CPU)
        ),
        "down": build(M.moe_down(D, INTER, num_experts=E, top_k=K, dtype="float32", target=CPU)),
        "combine": build(M.moe_combine(D, top_k=K, dtype="float32", target=CPU)),
    }


def _align(libs, ids, dev=None):
    t, bm = ids.shape[0], libs["bm"]
    nb = M.num_row_blocks(t, top_k=K, num_experts=E, block_m=bm)
    out = {
        "sorted_rows": _poison((nb * bm,), "int32", dev),
        "block_expert": _poison((nb,), "int32", dev),
        "row_of": _poison((t * K,), "int32", dev),
        "expert_offsets": _poison((E + 1,), "int32", dev),
    }
    ws = _poison(((t + M.CHUNK - 1) // M.CHUNK, E), "int32", dev)
    libs["align"](_tensor(ids.int().numpy(), dev), *out.values(), ws)
    return out


LOADS = [("random", 1), ("random", 37), ("random", 100), ("one_expert_all", 37), ("skewed", 70)]


@pytest.mark.parametrize(("load", "t"), LOADS, ids=[f"{a}-T{b}" for a, b in LOADS])
def test_align_cpu(libs, load, t):
    ids = _ids(t, load=load, seed=t)
    out = {k: v.numpy() for k, v in _align(libs, ids).items()}
    bm, flat = libs["bm"], ids.reshape(-1).numpy()
    rows, blocks, offs = out["sorted_rows"], out["block_expert"], out["expert_offsets"]
    # expected: per expert, its entries in increasing flat order, padded to BM with -1
    expect_rows, expect_blocks = [], []
    for e in range(E):
        entries = np.nonzero(flat == e)[0].tolist()
        assert offs[e] == len(expect_rows)
        padded = -(-len(entries) // bm) * bm
        expect_rows += entries + [-1] * (padded - len(entries))
        expect_blocks += [e] * (padded // bm)
    assert offs[E] == len(expect_rows)
    np.testing.assert_array_equal(rows[: len(expect_rows)], expect_rows)
    assert (rows[len(expect_rows) :] == -1).all()
    np.testing.assert_array_equal(blocks[: len(expect_blocks)], expect_blocks)
    assert (blocks[len(expect_blocks) :] == -1).all()
    np.testing.assert_array_equal(rows[out["row_of"]], np.arange(t * K))


# ------------------------------------------------------------------------- routed experts


def _weights(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * INTER, D, generator=gen) / D**0.5).to(dtype)
    down = (torch.randn(E, D, INTER, generator=gen) / INTER**0.5).to(dtype)
    return gate_up, down


def _run_experts(libs, x, wts, ids, gate_up, down, *, dev=None, np_dtype="float32"):
    t, bm, d, inter = x.shape[0], libs["bm"], x.shape[1], down.shape[2]
    al = _align(libs, ids, dev)
    nb = al["block_expert"].shape[0]
    h = _poison((nb * bm, inter), np_dtype, dev)
    libs["gate_up"](
        _tensor(x.numpy(), dev),
        al["sorted_rows"],
        al["block_expert"],
        _tensor(G.transform_weight(gate_up.numpy(), epilogue="silu_mul"), dev),
        h,
    )
    y = _poison((nb * bm, d), np_dtype, dev)
    libs["down"](
        h,
        al["sorted_rows"],
        al["block_expert"],
        _tensor(down.numpy(), dev),
        _tensor(wts.float().numpy(), dev),
        y,
    )
    out = _poison((t, d), np_dtype, dev)
    libs["combine"](y, al["row_of"], out)
    return torch.from_numpy(out.numpy())


@pytest.mark.parametrize(("load", "t"), LOADS, ids=[f"{a}-T{b}" for a, b in LOADS])
def test_experts_cpu_fp32(libs, load, t):
    gen = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(t, D, generator=gen)
    ids = _ids(t, load=load, seed=t)
    wts = torch.rand(t, K, generator=gen) + 0.1
    gate_up, down = _weights(t)
    out = _run_experts(libs, x, wts, ids, gate_up, down)
    ref = reference.moe_experts(x, wts, ids, gate_up, down)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


GEMV_CASES = [  # (load, T, D, I): D = 72 leaves lanes without a full K vector step
    ("random", 1, D, INTER),
    ("random", 3, 72, 96),
    ("one_expert_all", 8, D, INTER),
    ("skewed", 5, 72, 96),
]


@pytest.mark.parametrize(
    ("load", "t", "d", "inter"),
    GEMV_CASES,
    ids=[f"{a}-T{b}-D{c}-I{e}" for a, b, c, e in GEMV_CASES],
)
def test_experts_gemv_cpu_fp32(load, t, d, inter):
    """The small-T path (decode): per-(token, slot) gate_up GEMVs, down GEMVs + combine."""
    gen = torch.Generator().manual_seed(2000 + t)
    x = torch.randn(t, d, generator=gen)
    ids = _ids(t, load=load, seed=t)
    wts = torch.rand(t, K, generator=gen) + 0.1
    gate_up = torch.randn(E, 2 * inter, d, generator=gen) / d**0.5
    down = torch.randn(E, d, inter, generator=gen) / inter**0.5
    kw = dict(num_experts=E, top_k=K, dtype="float32", target=CPU)
    f_gu = tvm.compile(MG.moe_gate_up_gemv(d, inter, **kw), target=CPU)
    f_dn = tvm.compile(MG.moe_down_gemv(d, inter, **kw), target=CPU)
    out = _run_gemv(f_gu, f_dn, x, wts, ids, gate_up, down, np_dtype="float32")
    ref = reference.moe_experts(x, wts, ids, gate_up, down)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def _run_gemv(f_gu, f_dn, x, wts, ids, gate_up, down, *, dev=None, np_dtype):
    t, inter = x.shape[0], down.shape[2]
    ids_t = _tensor(ids.int().numpy(), dev)
    h = _poison((t * K, inter), np_dtype, dev)
    w = G.transform_weight(gate_up.numpy(), epilogue="silu_mul")
    f_gu(_tensor(x.numpy(), dev), ids_t, _tensor(w, dev), h)
    out = _poison((t, x.shape[1]), np_dtype, dev)
    f_dn(h, ids_t, _tensor(down.numpy(), dev), _tensor(wts.float().numpy(), dev), out)
    return torch.from_numpy(out.numpy())


# --------------------------------------------------------------------- CUDA static checks


def _kernels(target, d=2048, inter=1408):
    """name -> (PrimFunc, SASS opcodes it must contain) at V2-Lite's MoE shapes."""
    spec = M.RouteSpec(64, 6, method="group_limited_greedy", n_group=8, topk_group=3)
    kw = dict(num_experts=64, top_k=6, target=target)
    mma = ("HMMA", "LDSM", "LDGSTS")  # tensor cores, ldmatrix, cp.async
    return {
        "route": (M.moe_route(spec, target=target), ("SHFL",)),
        "align": (
            M.moe_align(64, 6, block_m=M.default_config(target).block_m, target=target),
            (),
        ),
        "gate_up": (M.moe_gate_up(d, inter, **kw), mma),
        "down": (M.moe_down(d, inter, **kw), mma),
        "combine": (M.moe_combine(d, top_k=6, target=target), ()),
        # decode: tensor-core GEMVs (expert rows straight into mma registers)
        "gate_up_gemv": (MG.moe_gate_up_gemv(d, inter, **kw), ("HMMA", "LDG")),
        "down_gemv": (MG.moe_down_gemv(d, inter, **kw), ("HMMA", "LDG")),
        "gate_up_gemv_bf16": (
            _bf16(MG.moe_gate_up_gemv(d, inter, **kw, dtype="bfloat16")),
            ("HMMA",),
        ),
        "down_gemv_bf16": (_bf16(MG.moe_down_gemv(d, inter, **kw, dtype="bfloat16")), ("HMMA",)),
        # the FMA GEMVs, kept as a config
        "gate_up_gemv_fma": (
            _tag(MG.moe_gate_up_gemv(d, inter, **kw, config=MG.GEMV_GATE_UP), "_fma"),
            ("FFMA",),
        ),
        "down_gemv_fma": (
            _tag(MG.moe_down_gemv(d, inter, **kw, config=MG.GEMV_DOWN), "_fma"),
            ("FFMA",),
        ),
    }


def _tag(f, suffix):
    return f.with_attr("global_symbol", f.attrs["global_symbol"] + suffix)


def _bf16(f):
    return _tag(f, "_bf16")


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_moe_cuda_static(arch):
    """Every MoE kernel builds with cp.async on (as the model build does): 0 spills; the
    grouped GEMMs use HMMA + LDSM + LDGSTS (the row gather and the expert select inside the
    cp.async address do not block TVM's async-copy injection); routing uses warp shuffles."""
    nvcc = require_nvcc()
    target = tvm_target(arch)
    kernels = _kernels(target)
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f, _ in kernels.values()})
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        lib = tvm.compile(mod, target=target)
    src = lib.mod.imports[0].inspect_source()
    cubin, res = nvcc.compile_cubin(src, arch)
    ops = nvcc.sass_opcodes(cubin)
    assert all(name.startswith("moe_") for name in res), list(res)
    # 0 spills also with the model build's nvcc flags (register-usage-level 10)
    _, res_model = nvcc.compile_cubin(src, arch, extra_flags=nvcc.TVM_NVCC_FLAGS)
    for name, r in [*res.items(), *res_model.items()]:
        assert r.spill_bytes == 0, (arch, name, r)
    for f, opcodes in kernels.values():
        sym = f.attrs["global_symbol"]
        names = [n for n in res if n.removesuffix("_kernel") == sym or n.startswith(sym + "_")]
        assert names, (sym, list(res))
        for opcode in opcodes:
            assert sum(ops[n].get(opcode, 0) for n in names) > 0, (arch, sym, opcode)
    # moe_align: 3 kernels (counts + padding init, offsets, scatter), no single-thread pass
    assert len([n for n in res if n.startswith("moe_align")]) == 3, list(res)


@pytest.mark.parametrize(
    ("d", "inter", "fmt"), [(64, 64, None), (72, 96, None), (64, 64, "q8_0"), (96, 160, "q8_0")]
)
def test_grouped_gemm_partial_tiles_stay_on_device(d, inter, fmt):
    """Partial tiles (N < block_n, K % block_k): the row/expert gathers (and a quantized
    weight's decode) must be folded into the shared-memory loads. Left as a root loop nest
    they ran on the host against device pointers (an extra global buffer passed to the
    kernel) - the H100 segfault of test_experts_gpu_f16[random-T1] at D = I = 64."""
    target = tvm_target("sm_90a")
    kw = dict(num_experts=E, top_k=K, target=target, weight_format=fmt)
    funcs = [M.moe_gate_up(d, inter, **kw), M.moe_down(d, inter, **kw)]
    for f in funcs:
        assert "gather_a" not in f.script() and "gather_b" not in f.script()
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    with tvm.transform.PassContext(config=G.PASS_CONFIG):
        src = tvm.compile(mod, target=target).mod.imports[0].inspect_source()
    for f in funcs:
        sym = f.attrs["global_symbol"]
        (sig,) = set(
            re.findall(rf"__global__ void __launch_bounds__\(\d+\) {sym}_kernel\(([^)]*)\)", src)
        )
        assert sig.count("_ptr") == len(f.params), (sym, sig)


# ---------------------------------------------------------------------------------- GPU run


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


_GPU_LIBS: dict = {}


def _gpu_build(key, make):
    """Build once per process (a GPU run compiles each kernel set a single time)."""
    if key not in _GPU_LIBS:
        arch = "sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89"
        target = tvm_target(arch)
        with tvm.transform.PassContext(config=G.PASS_CONFIG):
            _GPU_LIBS[key] = tvm.compile(make(target), target=target)
    return _GPU_LIBS[key]


def _gpu_grouped_libs(d, inter):
    bm = M.default_config(tvm_target("sm_90a")).block_m  # the same on sm_89
    kw = dict(num_experts=E, top_k=K)
    return {
        "bm": bm,
        "align": _gpu_build(("align", bm), lambda tg: M.moe_align(E, K, block_m=bm, target=tg)),
        "gate_up": _gpu_build(
            ("gu", d, inter), lambda tg: M.moe_gate_up(d, inter, **kw, target=tg)
        ),
        "down": _gpu_build(("dn", d, inter), lambda tg: M.moe_down(d, inter, **kw, target=tg)),
        "combine": _gpu_build(("cb", d), lambda tg: M.moe_combine(d, top_k=K, target=tg)),
    }


def _gpu_case(t, d, inter, load, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen).half()
    ids = _ids(t, load=load, seed=t)
    wts = torch.rand(t, K, generator=gen) + 0.1
    gate_up = (torch.randn(E, 2 * inter, d, generator=gen) / d**0.5).half()
    down = (torch.randn(E, d, inter, generator=gen) / inter**0.5).half()
    return x, wts, ids, gate_up, down


GPU_CASES = (
    [(load, t, D, INTER) for load, t in LOADS + [("random", 2048)]]
    + [("random", 1, 72, 96), ("skewed", 70, 72, 96), ("random", 300, 200, 160)]
    + [("random", 64, 2048, 1408)]
)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    ("load", "t", "d", "inter"), GPU_CASES, ids=[f"{a}-T{b}-D{c}-I{e}" for a, b, c, e in GPU_CASES]
)
def test_experts_gpu_f16(load, t, d, inter):
    """Grouped path (align, grouped GEMMs, combine); D = 64 / 72 / 200 are partial tiles."""
    x, wts, ids, gate_up, down = _gpu_case(t, d, inter, load, seed=t + d)
    libs = _gpu_grouped_libs(d, inter)
    out = _run_experts(libs, x, wts, ids, gate_up, down, dev=tvm.cuda(0), np_dtype="float16")
    ref = reference.moe_experts(x, wts, ids, gate_up, down)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


GPU_GEMV_CASES = GEMV_CASES + [("random", 1, 2048, 1408), ("random", 8, 2048, 1408)]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    ("load", "t", "d", "inter"),
    GPU_GEMV_CASES,
    ids=[f"{a}-T{b}-D{c}-I{e}" for a, b, c, e in GPU_GEMV_CASES],
)
@pytest.mark.parametrize("kind", ["mma", "fma"])
def test_experts_gemv_gpu_f16(load, t, d, inter, kind):
    """Small-T path (decode): expert GEMVs with the combine folded into the down GEMVs, on
    tensor cores (the default) and with the FMA configs."""
    x, wts, ids, gate_up, down = _gpu_case(t, d, inter, load, seed=t + d)
    fma = kind == "fma"
    kw = dict(num_experts=E, top_k=K)
    f_gu = _gpu_build(
        ("gu_gemv", kind, d, inter),
        lambda tg: MG.moe_gate_up_gemv(
            d, inter, **kw, target=tg, config=MG.GEMV_GATE_UP if fma else None
        ),
    )
    f_dn = _gpu_build(
        ("dn_gemv", kind, d, inter),
        lambda tg: MG.moe_down_gemv(
            d, inter, **kw, target=tg, config=MG.GEMV_DOWN if fma else None
        ),
    )
    out = _run_gemv(f_gu, f_dn, x, wts, ids, gate_up, down, dev=tvm.cuda(0), np_dtype="float16")
    ref = reference.moe_experts(x, wts, ids, gate_up, down)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


ROUTE_GPU = ROUTES | {"v2lite": M.RouteSpec(num_experts=64, top_k=6), "e40": M.RouteSpec(40, 3)}


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("ties", ["none", "pairs", "all_equal"])
@pytest.mark.parametrize("t", [1, 37, 2048], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(ROUTE_GPU))
def test_route_gpu(name, t, ties):
    """Warp-per-token routing vs the float64 reference. Exact ids where scores tie exactly
    (the lowest-index rule); with random logits a near-tie (< 1e-6) may order either way."""
    spec = ROUTE_GPU[name]
    logits = _logits(t, spec.num_experts, ties=ties, seed=t)
    lib = _gpu_build(("route", name), lambda tg: M.moe_route(spec, target=tg))
    dev = tvm.cuda(0)
    w = _poison((t, spec.top_k), "float32", dev)
    ids = _poison((t, spec.top_k), "int32", dev)
    lib(_tensor(logits.numpy(), dev), w, ids)
    w, ids = torch.from_numpy(w.numpy()).double(), torch.from_numpy(ids.numpy()).long()
    w_ref, ids_ref = _ref_route(spec, logits)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    if ties != "none":
        torch.testing.assert_close(ids, ids_ref)
    else:  # the weights above already pin each pick up to a near-tie
        assert (ids == ids_ref).float().mean().item() > 0.999


def test_lower_moe_paths_by_phase():
    """LowerMoE on a GPU target: decode (static T = 1) takes route + expert GEMVs, prefill
    (symbolic T) the grouped path; tiny's I = 64 (< one 128-wide tile) is no longer refused."""
    from mla_compiler.model_export.config import preset
    from mla_compiler.model_export.export import export_relax
    from mla_compiler.model_export.weights import random_model
    from mla_compiler.passes.lower_moe import LowerMoE
    from mla_compiler.pipeline import split_phases

    model = random_model(preset("tiny"), seed=3, dtype="float16")
    mod = LowerMoE(target=tvm_target("sm_90a"), choice=KernelChoice())(
        split_phases(export_relax(model).mod)
    )
    calls = {
        phase: set(re.findall(r"R\.call_tir\((\w+),", mod[phase].script(show_meta=False)))
        for phase in ("prefill", "decode")
    }
    assert {"moe_route", "moe_gate_up_gemv", "moe_down_gemv"} <= calls["decode"]
    assert not {"moe_align", "moe_gate_up", "moe_down", "moe_combine"} & calls["decode"]
    assert {"moe_route", "moe_align", "moe_gate_up", "moe_down", "moe_combine"} <= calls["prefill"]
