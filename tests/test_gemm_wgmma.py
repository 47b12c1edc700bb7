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
    """All epilogues in one nvcc run: HGMMA and cp.async in the SASS, no spills."""
    nvcc = require_nvcc()
    funcs = {}
    for (n, k, epi, odt), name in CASES.items():
        cfg = W.WgmmaConfig(overlap=name == "residual")
        f = W.wgmma_gemm(None, n, k, target=SM90A, config=cfg, epilogue=epi, out_dtype=odt)
        funcs[f"wg_{name.replace('-', '_')}"] = f
    mod = tvm.IRModule({s: f.with_attr("global_symbol", s) for s, f in funcs.items()})
    lib = tvm.compile(mod, target=SM90A)
    cubin, res = nvcc.compile_cubin(lib.mod.imports[0].inspect_source(), "sm_90a")
    ops = nvcc.sass_opcodes(cubin)
    for sym in funcs:
        name = sym + "_kernel"
        assert res[name].spill_bytes == 0, res[name]
        assert ops[name].get("HGMMA", 0) > 0 and ops[name].get("LDGSTS", 0) > 0, ops[name]


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


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("tokens", [1, 77, 600], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("block_m", [64, 128], ids=lambda b: f"bm{b}")
def test_gpu_moe_grouped_matches_reference(tokens, block_m):
    """Grouped gate+up then down on wgmma vs float64 per row block; padding rows of the down
    output are 0, outputs NaN-poisoned first."""
    e, k_top, d, inter = 16, 4, 256, 192
    cfg = W.WgmmaConfig(block_m, 128, 64, 4, overlap=True)
    kw = dict(num_experts=e, top_k=k_top, target=SM90A, config=cfg)
    funcs = {kind: W.moe_grouped(kind, d, inter, **kw) for kind in ("gate_up", "down")}
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    lib = tvm.compile(mod, target=SM90A)
    x = torch.randn(tokens, d, device="cuda").half()
    wgu = (torch.randn(e, 2 * inter, d, device="cuda") / d**0.5).half()
    wd = (torch.randn(e, d, inter, device="cuda") / inter**0.5).half()
    ids = torch.rand(tokens, e, device="cuda").topk(k_top, dim=-1).indices.int()
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
        scale = torch.where(real, weights[src[rows] // k_top, src[rows] % k_top], 0.0)
        ref_y = (h[rows].double() @ wd[ex].double().T) * scale[:, None].double()
        torch.testing.assert_close(y[rows].double(), ref_y, rtol=2e-2, atol=2e-2)
