"""MoE kernels (schedules/moe.py) vs the float64 references.

CPU (llvm) runs at fp32; CUDA static checks compile every kernel for sm_89 and sm_90a with nvcc;
GPU tests run the whole routed-expert pipeline at f16 when a CUDA device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from mla_compiler import reference
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import moe as M
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
    t, bm = x.shape[0], libs["bm"]
    al = _align(libs, ids, dev)
    nb = al["block_expert"].shape[0]
    h = _poison((nb * bm, INTER), np_dtype, dev)
    libs["gate_up"](
        _tensor(x.numpy(), dev),
        al["sorted_rows"],
        al["block_expert"],
        _tensor(G.transform_weight(gate_up.numpy(), epilogue="silu_mul"), dev),
        h,
    )
    y = _poison((nb * bm, D), np_dtype, dev)
    libs["down"](
        h,
        al["sorted_rows"],
        al["block_expert"],
        _tensor(down.numpy(), dev),
        _tensor(wts.float().numpy(), dev),
        y,
    )
    out = _poison((t, D), np_dtype, dev)
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


# --------------------------------------------------------------------- CUDA static checks


def _kernels(target):
    spec = M.RouteSpec(64, 6, method="group_limited_greedy", n_group=8, topk_group=3)
    return {
        "route": (M.moe_route(spec, target=target), None),
        "align": (
            M.moe_align(64, 6, block_m=M.default_config(target).block_m, target=target),
            None,
        ),
        "gate_up": (M.moe_gate_up(2048, 1408, num_experts=64, top_k=6, target=target), "HMMA"),
        "down": (M.moe_down(2048, 1408, num_experts=64, top_k=6, target=target), "HMMA"),
        "combine": (M.moe_combine(2048, top_k=6, target=target), None),
    }


def test_moe_cuda_static():
    nvcc = pytest.importorskip("mla_compiler.nvcc")
    try:
        nvcc.find_tool("nvcc")
        nvcc.find_tool("cuobjdump")
    except Exception as err:  # noqa: BLE001
        pytest.skip(str(err))
    for arch in ("sm_89", "sm_90a"):
        target = tvm_target(arch)
        kernels = _kernels(target)
        mod = tvm.IRModule({f.attrs["global_symbol"]: f for f, _ in kernels.values()})
        with tvm.transform.PassContext(config=G.PASS_CONFIG):
            lib = tvm.compile(mod, target=target)
        cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), arch)
        ops = nvcc.sass_opcodes(cubin)
        assert all(name.startswith("moe_") for name in res), list(res)
        for name, r in res.items():
            assert r.spill_bytes == 0, (arch, name, r)
        for f, opcode in kernels.values():
            if opcode:
                (name,) = [n for n in res if n.startswith(f.attrs["global_symbol"])]
                assert ops[name].get(opcode, 0) > 0, (arch, name, ops[name])
                assert ops[name].get("LDSM", 0) > 0, (arch, name, ops[name])


# ---------------------------------------------------------------------------------- GPU run


def _has_gpu():
    return torch.cuda.is_available() and tvm.cuda(0).exist


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    ("load", "t"),
    LOADS + [("random", 2048)],
    ids=[f"{a}-T{b}" for a, b in LOADS + [("random", 2048)]],
)
def test_experts_gpu_f16(load, t):
    arch = "sm_90a" if torch.cuda.get_device_capability() >= (9, 0) else "sm_89"
    target, dev = tvm_target(arch), tvm.cuda(0)
    bm = M.default_config(target).block_m

    def build(f):
        with tvm.transform.PassContext(config=G.PASS_CONFIG):
            return tvm.compile(f, target=target)

    libs = {
        "bm": bm,
        "align": build(M.moe_align(E, K, block_m=bm, target=target)),
        "gate_up": build(M.moe_gate_up(D, INTER, num_experts=E, top_k=K, target=target)),
        "down": build(M.moe_down(D, INTER, num_experts=E, top_k=K, target=target)),
        "combine": build(M.moe_combine(D, top_k=K, target=target)),
    }
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, D, generator=gen).half()
    ids = _ids(t, load=load, seed=t)
    wts = torch.rand(t, K, generator=gen) + 0.1
    gate_up, down = _weights(t, torch.float16)
    out = _run_experts(libs, x, wts, ids, gate_up, down, dev=dev, np_dtype="float16")
    ref = reference.moe_experts(x, wts, ids, gate_up, down)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
