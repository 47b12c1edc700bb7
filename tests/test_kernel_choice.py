"""Kernel choice is explicit: the Python API and the CLI hand the lowering passes the same
``KernelChoice`` (ubatch, max context, tuning database), and its ubatch picks the kernels."""

from __future__ import annotations

import pytest

from mla_compiler import cli, compiler, kernel_configs, kernels
from mla_compiler.compiler import CompileOptions, compile_model
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import preset
from mla_compiler.schedules import attention_prefill as ap
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
            choice, "attn_decompressed", target, V2.dims
        )
