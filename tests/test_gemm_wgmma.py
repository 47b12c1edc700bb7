"""The sm_90a wgmma GEMM: config rules, bad shapes, static CUDA facts (HGMMA, cp.async, no
spills), and (on an sm_90 GPU) numerics against a float32 reference with poisoned outputs."""

from __future__ import annotations

import pytest
import torch
import tvm
from conftest import require_nvcc

from mla_compiler import reference
from mla_compiler.schedules import gemm_wgmma as W
from mla_compiler.schedules.target import tvm_target

SM90A = tvm_target("sm_90a")
CASES = {  # (n, k, epilogue, out_dtype) -> id
    (576, 2048, None, None): "plain-n576",
    (2048, 512, "residual", None): "residual",
    (1408, 2048, "silu_mul", None): "silu_mul",
    (64, 2048, None, "float32"): "f32-out-n64",
}


def test_keep_rules():
    assert W.keep(W.WgmmaConfig(), SM90A, k=2048)
    assert not W.keep(W.WgmmaConfig(), tvm_target("sm_89"))  # no wgmma before sm_90a
    assert not W.keep(W.WgmmaConfig(), SM90A, k=2000)  # k not a multiple of block_k
    assert not W.keep(W.WgmmaConfig(block_n=512), SM90A)  # m64n512 does not exist
    assert not W.keep(W.WgmmaConfig(stages=8), SM90A)  # 8 x 48 KB of shared memory
    assert not W.keep(W.WgmmaConfig(stages=2, overlap=True), SM90A)  # no slot to refill
    assert W.applies(3072, 2048, target=SM90A) and not W.applies(3072, 2000, target=SM90A)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n=576, k=2000), "k % 64"),
        (dict(n=570, k=2048), "n % 8"),
        (dict(n=576, k=2048, epilogue="gelu"), "unknown epilogue"),
        (dict(n=48, k=2048, epilogue="silu_mul"), "silu_mul needs"),
    ],
    ids=["k", "n", "epilogue", "silu-n"],
)
def test_bad_shapes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        W.wgmma_gemm(None, kw.pop("n"), kw.pop("k"), **kw)


def test_cuda_static_sm90a():
    """All epilogues and the grouped MoE kernels (V2-Lite experts; 2 and 4 warpgroups, padding
    skipped) in one nvcc run: HGMMA and cp.async in the SASS, no spills."""
    nvcc = require_nvcc()
    funcs = {}
    for (n, k, epi, odt), name in CASES.items():
        cfg = W.WgmmaConfig(overlap=name == "residual")
        f = W.wgmma_gemm(None, n, k, target=SM90A, config=cfg, epilogue=epi, out_dtype=odt)
        funcs[f"wg_{name.replace('-', '_')}"] = f
    for cfg in (W.MOE_CONFIG, W.WgmmaConfig(256, 128, 64, 4, overlap=True)):
        for kind in ("gate_up", "down"):
            f = W.moe_grouped(kind, 2048, 1408, num_experts=64, top_k=6, target=SM90A, config=cfg)
            funcs[f"wg_moe_{kind}_m{cfg.block_m}"] = f
    mod = tvm.IRModule({s: f.with_attr("global_symbol", s) for s, f in funcs.items()})
    lib = tvm.compile(mod, target=SM90A)
    cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), "sm_90a")
    ops = nvcc.sass_opcodes(cubin)
    for sym in funcs:
        name = sym + "_kernel"
        assert res[name].spill_bytes == 0, res[name]
        assert ops[name].get("HGMMA", 0) > 0 and ops[name].get("LDGSTS", 0) > 0, ops[name]


def _kernel_lines(src: str, sym: str) -> list[tuple[str, tuple[str, ...]]]:
    """Each line of kernel ``sym``'s definition with the heads of its enclosing ``{`` blocks."""
    start = src.index("{", src.index(f" {sym}_kernel(", src.index(f"{sym}_kernel(") + 1))
    out, stack = [], []
    for line in src[start + 1 :].splitlines():
        code = line.strip()
        if code.startswith("}"):
            if not stack:
                break  # the kernel's closing brace
            stack.pop()
        out.append((code, tuple(stack)))
        if code.endswith("{"):
            stack.append(code)
    return out


def test_moe_grouped_skips_padding_warpgroups():
    """Grouped kernels predicate each warpgroup's wgmma fence / issue / commit / wait on its
    first row being routed; barriers and cp.async waits / commits stay unconditional. The dense
    GEMM and ``skip_padding=False`` have no such predicate."""
    kw = dict(num_experts=8, top_k=2, target=SM90A, config=W.MOE_CONFIG)
    funcs = {f"moe_{kind}": W.moe_grouped(kind, 512, 256, **kw) for kind in ("gate_up", "down")}
    funcs["moe_down_noskip"] = W.moe_grouped("down", 512, 256, skip_padding=False, **kw)
    funcs["dense"] = W.wgmma_gemm(None, 512, 256, target=SM90A, config=W.MOE_CONFIG)
    mod = tvm.IRModule({s: f.with_attr("global_symbol", s) for s, f in funcs.items()})
    src = tvm.compile(mod, target=SM90A).mod.imports[0].inspect_source()
    wgmma = ("wgmma_fence", "mma_async", "wgmma_commit_group", "wait_group_sync_aligned_1")
    sync = ("__syncthreads", "cp_async_wait_group", "cp_async_commit_group", "fence_proxy")
    for sym in funcs:
        lines = _kernel_lines(src, sym)
        loop = [(code, heads) for code, heads in lines if any(h.startswith("for (") for h in heads)]
        issued = [heads for code, heads in loop if any(w in code for w in wgmma)]
        assert len(issued) == 3 + W.MOE_CONFIG.block_k // 16, (sym, len(issued))
        guarded = [any("live" in h for h in heads) for heads in issued]
        assert all(guarded) if sym.startswith("moe_") and "noskip" not in sym else not any(guarded)
        barriers = [heads for code, heads in lines if any(b in code for b in sync)]
        assert barriers and not any("live" in h for heads in barriers for h in heads), sym


def _has_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [1, 77, 128, 1000], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES.values()))
def test_gpu_matches_reference(case, m):
    n, k, epi, odt = case
    f = W.wgmma_gemm(None, n, k, target=SM90A, epilogue=epi, out_dtype=odt)
    lib = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}), target=SM90A)
    nw = 2 * n if epi == "silu_mul" else n
    x = torch.randn(m, k, device="cuda").half()
    w = (torch.randn(nw, k, device="cuda") / k**0.5).half()
    r = torch.randn(m, n, device="cuda").half()
    y = torch.full((m, n), float("nan"), device="cuda", dtype=getattr(torch, odt or "float16"))
    h = x.double() @ w.double().T
    if epi == "silu_mul":
        h = reference.silu_mul_interleaved(h)
    ref = h + r.double() if epi == "residual" else h
    t = tvm.runtime.from_dlpack
    lib["f"](*([t(x), t(w)] + ([t(r)] if epi == "residual" else []) + [t(y)]))
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    tol = (1e-3 if odt == "float32" else 1e-2) * float(ref.abs().max()) + 1e-3
    assert float((y.double() - ref).abs().max()) <= tol


# experts' row counts around the 64-row warpgroup edges: a last block with a partially and a
# fully padded second (third, fourth) warpgroup for block_m 128 (256), a full block, no rows
EDGE_COUNTS = (1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 0, 0, 40, 8)


def _edge_ids(k_top: int) -> torch.Tensor:
    """ids [T, k_top] giving expert e ``EDGE_COUNTS[e]`` rows: the expert-sorted list of all
    T*k entries dealt out token-major (entry p -> token p % T, slot p // T), so an expert's run
    of <= T entries lands on distinct tokens."""
    flat = [e for e, c in enumerate(EDGE_COUNTS) for _ in range(c)]
    tokens = len(flat) // k_top
    assert len(flat) == tokens * k_top and max(EDGE_COUNTS) <= tokens
    return torch.tensor(flat, dtype=torch.int32).reshape(k_top, tokens).T.contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "noskip"])
@pytest.mark.parametrize("load", ["T1", "T600", "edges"])
@pytest.mark.parametrize("block_m", [64, 128, 256], ids=lambda b: f"bm{b}")
def test_gpu_moe_grouped_matches_reference(block_m, load, skip):
    """Grouped gate+up then down on wgmma vs float64 per row block, outputs NaN-poisoned first.
    "edges": experts whose last block ends inside / at a warpgroup's 64 rows (EDGE_COUNTS).
    With ``skip`` padding rows of h and y stay NaN (not written; down reads the NaN h rows of
    skipped warpgroups into shared memory, which must not reach a routed row); without it y
    is 0 there."""
    e, k_top, d, inter = 16, 4, 256, 192
    cfg = W.WgmmaConfig(block_m, 128, 64, 4, overlap=True)
    kw = dict(num_experts=e, top_k=k_top, target=SM90A, config=cfg, skip_padding=skip)
    funcs = {kind: W.moe_grouped(kind, d, inter, **kw) for kind in ("gate_up", "down")}
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    lib = tvm.compile(mod, target=SM90A)
    if load == "edges":
        ids = _edge_ids(k_top).cuda()
    else:
        tokens = int(load[1:])
        ids = torch.rand(tokens, e, device="cuda").topk(k_top, dim=-1).indices.int()
    tokens = ids.shape[0]
    x = torch.randn(tokens, d, device="cuda").half()
    wgu = (torch.randn(e, 2 * inter, d, device="cuda") / d**0.5).half()
    wd = (torch.randn(e, d, inter, device="cuda") / inter**0.5).half()
    weights = torch.rand(tokens, k_top, device="cuda")
    sr, be, used = reference.moe_grouping(ids, e, block_m)
    h = torch.full((sr.numel(), inter), float("nan"), device="cuda").half()
    y = torch.full((sr.numel(), d), float("nan"), device="cuda").half()
    t = tvm.runtime.from_dlpack
    lib["gate_up"](t(x), t(sr), t(be), t(wgu), t(h))
    lib["down"](t(h), t(sr), t(be), t(wd), t(weights), t(y))
    torch.cuda.synchronize()
    src = sr.clamp(min=0).long()
    for b in range(used):
        rows, ex = slice(b * block_m, (b + 1) * block_m), int(be[b])
        real = sr[rows] >= 0
        ref_h = reference.silu_mul_interleaved(x[src[rows] // k_top].double() @ wgu[ex].double().T)
        torch.testing.assert_close(h[rows][real].double(), ref_h[real], rtol=2e-2, atol=2e-2)
        scale = weights[src[rows] // k_top, src[rows] % k_top][real].double()
        ref_y = (h[rows][real].double() @ wd[ex].double().T) * scale[:, None]
        torch.testing.assert_close(y[rows][real].double(), ref_y, rtol=2e-2, atol=2e-2)
        pad = y[rows][~real]
        assert pad.isnan().all() if skip else (pad == 0).all(), (b, int(real.sum()))
        if skip:
            assert h[rows][~real].isnan().all(), (b, int(real.sum()))
