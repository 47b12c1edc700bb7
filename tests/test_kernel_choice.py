"""Kernel choice is explicit: the Python API and the CLI hand the lowering passes the same
``KernelChoice`` (ubatch, max context, tuning database), and its ubatch picks the kernels."""

from __future__ import annotations

import pytest

from mla_compiler import cli, compiler, kernel_configs, kernels
from mla_compiler.compiler import CompileOptions, compile_model
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import preset
from mla_compiler.schedules import attention_prefill as ap
from mla_compiler.schedules.families import FAMILIES, KernelFamily
from mla_compiler.schedules.target import tvm_target

V2 = preset("deepseek-v2-lite")


class _Stop(Exception):
    """Raised where the pipeline would start: the choice is all these tests need."""


@pytest.fixture
def captured(monkeypatch):
    seen = []

    def compile_ir(model, **kw):
        seen.append(kw["choice"])
        raise _Stop

    monkeypatch.setattr(compiler, "compile_ir", compile_ir)
    return seen


@pytest.mark.parametrize("with_db", [False, True], ids=["defaults", "tuning-db"])
def test_python_api_and_cli_make_the_same_choice(tmp_path, captured, with_db):
    db = None
    if with_db:
        db = tmp_path / "db"
        db.mkdir()
        (db / "records.jsonl").write_text("")
    options = CompileOptions(
        target="sm_90a", dtype="float16", ubatch=8192, max_context=20000, tuning_db=db and str(db)
    )
    with pytest.raises(_Stop):
        compile_model(output=tmp_path / "api", preset_name="tiny", options=options)
    argv = ["compile", "--preset", "tiny", "--target", "sm_90a", "-o", str(tmp_path / "cli")]
    argv += ["--ubatch", "8192", "--max-context", "20000"]
    with pytest.raises(_Stop):
        cli.main(argv + (["--tuning-db", str(db)] if with_db else []))
    api, from_cli = captured
    assert api == from_cli == KernelChoice(db and str(db), ubatch=8192, max_context=20000)


def test_the_choice_ubatch_picks_the_prefill_kernels(monkeypatch):
    """The extend kernel (chunks after the first) is the one ``extend_config`` picks for the
    choice's ubatch; the two chunk sizes below pick different ones on sm_90a."""
    target = tvm_target("sm_90a")
    picks = {
        u: ap.extend_config(target, kind="decompressed", dims=V2.dims, tokens=u)
        for u in (512, 8192)
    }
    assert picks[512] != picks[8192]
    built = []
    monkeypatch.setattr(ap, "decompressed_prefill", lambda *a, **kw: built.append(kw) or "f")
    for ubatch, want in picks.items():
        choice = KernelChoice(ubatch=ubatch)
        kernels.prefill_kernel(
            "attn_decompressed",
            V2.dims,
            target=target,
            dtype="float16",
            sm_scale=V2.softmax_scale,
            choice=choice,
        )
        assert built[-1]["extend_config"] == want
        assert built[-1]["config"] == kernel_configs.prefill_config(
            choice, "attn_decompressed", target, V2.dims, sm_scale=V2.softmax_scale
        )


# --- one protocol for every tuned family -----------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_90a", "sm_89"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_keeps_the_protocol(name, arch):
    """For each of V2-Lite's shapes: the candidates are distinct and kept, the default is kept
    (or None where the family does not apply), configs survive the database's dict form, shape
    keys are distinct, and a candidate builds PrimFuncs under the symbols its runner calls."""
    import dataclasses

    import tvm

    family, target = FAMILIES[name], tvm_target(arch)
    assert isinstance(family, KernelFamily) and family.group in ("attn", "gemm", "moe")
    shapes = family.model_shapes(V2)
    assert shapes and len({family.shape_key(s) for s in shapes}) == len(shapes)
    for shape in shapes:
        default = family.default(shape, target)
        found = family.candidates(shape, target)
        assert len(set(found)) == len(found)
        assert all(family.keep(c, shape, target) for c in found)
        assert all(isinstance(c, family.config_type) for c in found)
        if default is None:
            assert name in ("gemm_prefill", "moe_grouped") and not found and arch == "sm_89"
            continue
        assert family.keep(default, shape, target), (shape, default)
        for config in found[:3]:
            assert family.config_from_dict(dataclasses.asdict(config)) == config
    config = family.default(shapes[0], target)
    if config is not None:
        funcs = family.build(config, shapes[0], target)
        assert funcs and all(isinstance(f, tvm.tirx.PrimFunc) for f in funcs.values())
        params = family.run_params(config, shapes[0], target)
        assert json_safe(params)


def json_safe(value) -> bool:
    import json

    return json.loads(json.dumps(value)) == value


def test_a_legacy_prefill_record_reads_as_the_same_config():
    """Records of the version with a boolean per step read back (chains: mma form, P operand,
    KV loads)."""
    legacy = dict(tile_q=192, tile_kv=96, warps=12, stages=2, split_s=True, wgmma=True,
                  swizzle=True, p_regs=True, pipelined=False, s_first=False, tma=True,
                  producer=True, setmaxnreg=True)  # fmt: skip
    config = kernel_configs.config_from_dict("attn_prefill_decompressed", legacy)
    assert config == ap.default_config("sm_90a", kind="decompressed", dims=V2.dims)
    assert (config.mma, config.p_operand, config.kv_loads) == (
        "wgmma_swizzled",
        "regs",
        "tma_producer_warpgroup",
    )
    plain = kernel_configs.config_from_dict(
        "attn_prefill_absorbed", dict(tile_q=32, tile_kv=16, warps=8, stages=3, split_s=False)
    )
    assert (plain.mma, plain.p_operand, plain.kv_loads) == ("mma_sync", "smem", "cp_async")
    with pytest.raises(ValueError, match="kv_loads"):
        ap.PrefillConfig(64, 64, 4, 2, kv_loads="tma_always")
