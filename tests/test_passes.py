"""The MLA passes: structure before/after each, and numerics of each mode against PyTorch."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from mla_compiler.compiler import CompileOptions, compile_model
from mla_compiler.errors import ConfigError, InputError
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import preset
from mla_compiler.model_export.export import export_relax
from mla_compiler.model_export.modeling import single_sequence_inputs
from mla_compiler.model_export.weights import random_model
from mla_compiler.passes import pseudo
from mla_compiler.passes.lower_mla_kernels import LowerMLAKernels
from mla_compiler.passes.lower_moe import LowerMoE
from mla_compiler.passes.rewrite_mla_attention import RewriteMLAAttention
from mla_compiler.pipeline import lower_to_kernels, split_phases
from mla_compiler.runtime.engine import Engine
from mla_compiler.schedules.target import tvm_target

CPU = tvm_target("cpu")


def _pseudo_names(func) -> list[str]:
    names: list[str] = []

    @relax.expr_functor.visitor
    class _V(relax.PyExprVisitor):
        def visit_call_(self, op):
            if (n := pseudo.name_of(op)) is not None:
                names.append(n)
            for a in op.args:
                self.visit_expr(a)

    _V().visit_expr(func)
    return names


@pytest.fixture(scope="module")
def tiny():
    model = random_model(preset("tiny"), seed=3)
    return model, split_phases(export_relax(model).mod)


def test_export_marks_attention_cache_and_moe(tiny):
    model, mod = tiny
    names = _pseudo_names(mod["prefill"])
    layers = model.cfg.num_hidden_layers
    assert names.count("attention") == layers and names.count("cache_write") == layers
    moe_layers = sum(model.cfg.is_moe_layer(i) for i in range(layers))
    assert names.count("moe") == moe_layers


def test_decode_phase_is_one_token(tiny):
    _, mod = tiny
    ids = mod["decode"].params[0]
    assert int(ids.ty.shape[0]) == 1
    assert not isinstance(mod["prefill"].params[0].ty.shape[0], tvm.tirx.IntImm)


@pytest.mark.parametrize(
    "form,expect",
    [
        ("absorbed", {"attn_absorbed", "cache_write", "moe"}),
        ("decompress", {"attn_decompressed", "cache_gather", "cache_write", "moe"}),
        ("decompressed_cache", {"attn_decompressed", "cache_gather", "cache_write", "moe"}),
    ],
)
def test_rewrite_mla_attention_forms(tiny, form, expect):
    model, mod = tiny
    out = RewriteMLAAttention(dims=model.cfg.dims, forms={"prefill": form})(mod)
    assert set(_pseudo_names(out["prefill"])) == expect
    assert "attention" in _pseudo_names(out["decode"])  # untouched
    cache = [p for p in out["prefill"].params if p.name == "cache"][0]
    d = model.cfg.dims
    width = (
        d.heads * (d.qk_head_dim + d.v_head_dim) if form == "decompressed_cache" else d.latent_dim
    )
    assert int(cache.ty.shape[2]) == width
    assert cache.ty.dtype.dtype == "float16"


def test_lower_moe_and_kernels_leave_no_pseudo_ops(tiny):
    model, mod = tiny
    mod = RewriteMLAAttention(
        dims=model.cfg.dims, forms={"prefill": "absorbed", "decode": "absorbed"}
    )(mod)
    mod = LowerMoE(target=CPU, choice=KernelChoice())(mod)
    assert "moe" not in _pseudo_names(mod["prefill"])
    mod = LowerMLAKernels(dims=model.cfg.dims, target=CPU, choice=KernelChoice())(mod)
    pseudo.check_lowered(mod)
    text = mod.script(show_meta=False)
    assert "call_tir_inplace" in text  # the cache is written in place
    assert "attn_absorbed_simple" in text and "kv_cache_write" in text


def test_absorbed_weights_are_lifted_to_transform_params(tiny):
    model, mod = tiny
    exported = export_relax(model).mod
    mod = lower_to_kernels(exported, model.cfg, mla=2, target=CPU, choice=KernelChoice())
    names = [gv.name_hint for gv, _ in mod.functions_items()]
    assert "transform_params" in names
    # W_UK / W_UV come out of transform_params: prefill takes more inputs than the checkpoint has
    assert len(mod["prefill"].params) > 8 + len(list(model.parameters()))


def test_phase_only_weight_transforms_are_lifted(tiny):
    """mla=3: decode's W_UK / W_UV (which prefill does not use) run in transform_params too; no
    phase keeps a binding computed from weights only, and both take one parameter list."""
    from mla_compiler.passes.lift_phase_weight_transforms import _weight_only

    model, _ = tiny
    stages = {}
    mod = lower_to_kernels(
        export_relax(model).mod,
        model.cfg,
        mla=3,
        target=CPU,
        choice=KernelChoice(),
        dump=lambda name, m: stages.__setitem__(name, m),
    )
    n_tp = len(mod["transform_params"].ty.ret.fields)
    assert len(mod["decode"].params) == len(mod["prefill"].params) == 8 + n_tp
    for phase in ("prefill", "decode"):
        assert _weight_only(mod[phase], 8)[0] == [], phase
    # LiftTransformParams alone leaves decode's slices of kv_b in decode
    shared_only = relax.transform.LiftTransformParams(shared_transform=True)(stages["gemm"])
    assert _weight_only(shared_only["decode"], 8)[0] != []


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--mla"):
        compile_model(output=tmp_path / "x", options=CompileOptions(mla=1))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = {}
    for mla in (0, 2, 3):
        path = tmp_path_factory.mktemp("mla") / f"m{mla}"
        compile_model(
            output=path,
            preset_name="tiny",
            options=CompileOptions(mla=mla, seed=3, max_context=96),
            log=lambda _m: None,
        )
        out[mla] = Engine.load(path)
    return out


@pytest.mark.parametrize("mla", [0, 2, 3], ids=["mla0", "mla2", "mla3"])
def test_full_sequence_logits(engines, mla):
    model = random_model(preset("tiny"), seed=3)
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(mla)).tolist()
    with torch.no_grad():
        ref, _ = model(
            **single_sequence_inputs(ids, start=0, logits="all"), cache=model.new_cache(64)
        )
    eng = engines[mla]
    eng.reset()
    got = eng.prefill(ids, all_logits=True)
    rel = np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy())
    assert rel < 2e-3, rel  # the f16 cache rounds K/V


@pytest.mark.parametrize("mla", [0, 2, 3], ids=["mla0", "mla2", "mla3"])
def test_chunked_prefill_then_decode_equals_one_shot(engines, mla):
    eng = engines[mla]
    ids = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(10 + mla)).tolist()
    eng.reset()
    one_shot = eng.prefill(ids, all_logits=True)  # 50 tokens in one call
    eng.reset()
    eng.ubatch = 7
    chunked = [eng.prefill(ids[:30], all_logits=True)]  # 5 chunks of <= 7
    chunked += [eng.decode(t)[None] for t in ids[30:]]  # 20 decode steps
    eng.ubatch = 2048
    chunked = np.concatenate(chunked)
    assert chunked.shape == one_shot.shape
    np.testing.assert_allclose(chunked, one_shot, rtol=0, atol=2e-5 * np.abs(one_shot).max() + 1e-6)


def test_deep_prompt_chunks_attend_over_the_latent_rows(engines):
    """mla 3: chunks whose KV length passes ``deep_prefill_from`` run ``prefill_deep`` (the
    absorbed form over the latent rows), the others decompress; the logits stay the model's."""
    eng = engines[3]
    assert "prefill_deep" in eng.meta["functions"] and eng.meta["deep_prefill_from"] == 8192
    assert "prefill_deep" not in engines[2].meta["functions"]
    model = random_model(preset("tiny"), seed=3)
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref, _ = model(
            **single_sequence_inputs(ids, start=0, logits="all"), cache=model.new_cache(64)
        )
    eng.reset()
    eng.ubatch, eng.deep_from, eng.step_times = 16, 32, []
    try:
        got = eng.prefill(ids, all_logits=True)  # KV lengths 16, 32, 48, 60
        calls = [s["function"] for s in eng.step_times]
    finally:
        eng.ubatch, eng.deep_from, eng.step_times = 2048, 8192, None
    assert calls == ["prefill", "prefill", "prefill_deep", "prefill_deep"]
    rel = np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy())
    assert rel < 2e-3, rel


def test_deep_prefill_bounds_the_prompt_workspace():
    from mla_compiler.compiler import attention_workspace_bytes

    cfg = preset("deepseek-v2-lite")
    ws = lambda ctx, deep: attention_workspace_bytes(  # noqa: E731
        cfg, mla=3, context=ctx, ubatch=2048, deep_from=deep
    )["prefill"]
    assert ws(131072, 8192) == ws(32768, 8192) == ws(8192, 8192) < ws(32768, 0) < ws(131072, 0)
    assert ws(4096, 8192) == ws(4096, 0)  # shallow contexts: unchanged


@pytest.mark.parametrize("mla", [2, 3])
def test_cache_is_latent_f16_row(engines, mla):
    eng = engines[mla]
    d = preset("tiny").dims
    assert tuple(eng.cache.shape) == (3, 96, d.latent_dim)
    assert eng.cache.dtype == "float16"
    assert eng.meta["kv_cache_bytes_per_token"] == 3 * d.latent_dim * 2


def test_v2_lite_cache_row_is_576_f16():
    """The deepseek-v2-lite pipeline (on 'meta', no weights) keeps a [27, C, 576] f16 cache."""
    from mla_compiler.compiler import resolve_model
    from mla_compiler.pipeline import compile_ir

    cfg, model, _, _ = resolve_model(
        model_dir=None, preset_name="deepseek-v2-lite", dtype="float16", seed=0
    )
    ir = compile_ir(model, mla=3, target=tvm_target("sm_90a"), choice=KernelChoice())
    for phase in ("prefill", "decode"):
        cache = [p for p in ir.mod[phase].params if p.name == "cache"][0]
        assert int(cache.ty.shape[0]) == 27 and int(cache.ty.shape[2]) == 576
        assert cache.ty.dtype.dtype == "float16"
    assert "mla_decode_split" in [gv.name_hint for gv, _ in ir.mod.functions_items()]


def test_context_overflow(engines):
    eng = engines[3]
    eng.reset()
    eng.prefill(list(range(90)))
    with pytest.raises(InputError, match="exceeds --max-context 96"):
        eng.prefill(list(range(7)))


def _workload_only(m, n, k, *, target, config=None, **kw):
    """gemm.gemm without its schedule: the pass's structure does not depend on it (the kernels'
    schedules are checked in test_gemm.py) and scheduling ~24 kernels per mode takes minutes."""
    from mla_compiler.schedules import gemm as G

    func = G.gemm_workload(m, n, k, **kw)
    return func.with_attr(
        "global_symbol",
        G.kernel_name(m, n, k, **{a: kw.get(a) for a in ("epilogue", "out_dtype", "batch")}),
    )


@pytest.fixture(scope="module")
def lite_attn_gpu():
    """tiny-lite-attn (V2-Lite attention, fused MoE on GPU) split into phases, through
    LowerMoE for sm_90a and RewriteMLAAttention per MLA mode."""
    from mla_compiler.model_export.config import mla_mode

    model = random_model(preset("tiny-lite-attn"), seed=3, dtype="float16")
    # LowerMoE first, once (it does not touch attention; its GPU kernels take a while)
    mod = LowerMoE(target=tvm_target("sm_90a"), choice=KernelChoice())(
        split_phases(export_relax(model).mod)
    )
    out = {}
    for mla in (0, 2, 3):
        mode = mla_mode(mla)
        forms = {"prefill": mode.prefill_form, "decode": mode.decode_form}
        out[mla] = RewriteMLAAttention(dims=model.cfg.dims, forms=forms)(mod)
    return model, out


@pytest.mark.parametrize("mla", [0, 2, 3], ids=["mla0", "mla2", "mla3"])
def test_lower_dense_gemm_leaves_no_matmul_on_gpu(lite_attn_gpu, mla, monkeypatch):
    from mla_compiler.passes.lower_dense_gemm import LowerDenseGemm
    from mla_compiler.schedules import gemm as G

    monkeypatch.setattr(G, "gemm", _workload_only)
    model, mods = lite_attn_gpu
    before = mods[mla]
    assert "R.matmul" in before["prefill"].script(show_meta=False)
    out = LowerDenseGemm(target=tvm_target("sm_90a"), choice=KernelChoice())(before)
    layers = model.cfg.num_hidden_layers
    for phase in ("prefill", "decode"):
        text = out[phase].script(show_meta=False)
        assert "R.matmul" not in text, phase
        calls = re.findall(r"R\.call_tir\((?:cls\.)?(gemm\w*)", text)
        assert calls, phase
        suffix = "_m1" if phase == "decode" else ""
        assert all(c.endswith(suffix) for c in calls), calls
        # per layer: q_proj, kv_a, o_proj + residual; the dense layer's gate/up fused with SiLU
        assert sum("_residual" in c for c in calls) == 2 * layers  # o_proj; down or shared down
        assert sum("_silu_mul" in c for c in calls) == layers  # dense MLP + shared experts
        assert sum("_float32" in c for c in calls) == layers - 1  # MoE router logits
        assert calls.count(f"gemm_n{model.cfg.vocab_size}_k{model.cfg.hidden_size}{suffix}") == 1
        absorbed = mla == 2 or (mla == 3 and phase == "decode")
        assert sum(c.startswith("gemm_h16_") for c in calls) == (2 * layers if absorbed else 0)
        kv_b = sum(c.startswith("gemm_n4096_k512") for c in calls)
        assert kv_b == (0 if absorbed else layers)  # mla=0 decompresses rows into the cache
    # the SwiGLU interleave and the W_UK / W_UV transposes are weight transforms
    lifted = relax.transform.LiftTransformParams(shared_transform=True)(out)
    text = lifted["transform_params"].script(show_meta=False)
    assert "R.concat" in text and "R.permute_dims" in text


def test_lower_dense_gemm_is_a_noop_on_cpu(tiny):
    from mla_compiler.passes.lower_dense_gemm import LowerDenseGemm

    _, mod = tiny
    assert LowerDenseGemm(target=CPU, choice=KernelChoice())(mod).same_as(mod)


@pytest.mark.parametrize("mla", [0, 2, 3], ids=["mla0", "mla2", "mla3"])
def test_lower_dense_gemm_numerics_on_cpu(mla, tmp_path, monkeypatch):
    """The lowered graph on llvm (the pass's GPU gate bypassed; the gemm factory has a CPU path):
    f16 logits of a prefill chunk then decode steps against the float32 PyTorch model. Fused
    epilogues and f32 accumulation bring them closer than R.matmul's f16 CPU path (~5e-3)."""
    import mla_compiler.passes.lower_dense_gemm as L

    monkeypatch.setattr(L, "is_gpu", lambda _t: True)
    compile_model(
        output=tmp_path / "m",
        preset_name="tiny",
        options=CompileOptions(mla=mla, seed=3, dtype="float16", max_context=96),
        log=lambda _m: None,
    )
    assert b"gemm_n" in (tmp_path / "m" / "model.so").read_bytes()  # the pass ran
    eng = Engine.load(tmp_path / "m")
    ids = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(mla)).tolist()
    eng.reset()
    got = np.concatenate(
        [eng.prefill(ids[:15], all_logits=True), np.stack([eng.decode(t) for t in ids[15:]])]
    )
    model = random_model(preset("tiny"), seed=3, dtype="float16").float()
    with torch.no_grad():
        ref, _ = model(
            **single_sequence_inputs(ids, start=0, logits="all"), cache=model.new_cache(64)
        )
    rel = np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy())
    assert rel < 2e-3, rel
