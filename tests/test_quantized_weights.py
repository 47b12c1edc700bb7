"""Weights in GGUF block formats through the compiler: ``compile --quant MIX`` stores each
weight as the mix says, the artifact decodes them (``DequantizeWeights``), and its logits are
those of our PyTorch model on the decoded weights, for a prompt longer than ``--ubatch`` and
decode steps after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mla_compiler.compiler import CompileOptions, compile_model  # noqa: E402
from mla_compiler.errors import ConfigError  # noqa: E402
from mla_compiler.model_export.config import load_config  # noqa: E402
from mla_compiler.model_export.modeling import single_sequence_inputs  # noqa: E402
from mla_compiler.model_export.weights import load_hf_model  # noqa: E402
from mla_compiler.runtime.engine import Engine  # noqa: E402

UBATCH, PROMPT, DECODE = 16, 40, 3
# the types each mix must put in the "quant" checkpoint (K = 256 and 32-multiples)
MIX_TYPES = {
    "q8_0": {"q8_0"},
    "q4_0": {"q4_0"},
    "iq4_nl": {"iq4_nl"},
    "q4_k_m": {"q4_k", "q6_k", "q5_0", "q8_0"},
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def quant_model(hf_checkpoint):
    return hf_checkpoint("quant")


def _reference(path, artifact, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Our PyTorch model on the weights the artifact stores (blocks decoded by gguf-py): the
    prompt's logits [T, V], then the greedy decode steps' [V]."""
    from safetensors.numpy import load_file

    meta = json.loads((artifact / "metadata.json").read_text())
    stored = load_file(str(artifact / "weights.safetensors"))
    model = load_hf_model(load_config(path), path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            qtype = meta["weight_formats"].get(name)
            if qtype is None:
                p.copy_(torch.from_numpy(stored[name]))
                continue
            kind = gguf.GGMLQuantizationType[qtype.upper()]
            p.copy_(torch.from_numpy(gguf.quants.dequantize(stored[name], kind)).view(p.shape))
        cache = model.new_cache(PROMPT + DECODE + 4, torch.float32)
        logits, cache = model(**single_sequence_inputs(ids, start=0, logits="all"), cache=cache)
        prompt, steps, seq = logits.numpy(), [], list(ids)
        tok = int(prompt[-1].argmax())
        for _ in range(DECODE):
            out, cache = model(**single_sequence_inputs([tok], start=len(seq)), cache=cache)
            steps.append(out[0].numpy())
            seq.append(tok)
            tok = int(out[0].argmax())
    return prompt, steps


@pytest.mark.parametrize("mix", list(MIX_TYPES))
def test_quantized_artifact_matches_the_model_on_its_decoded_weights(tmp_path, quant_model, mix):
    out = compile_model(
        output=tmp_path / mix,
        model_dir=str(quant_model),
        options=CompileOptions(quant=mix, ubatch=UBATCH, kv_dtype="float32"),
        log=lambda _msg: None,
    )
    meta = json.loads((out / "metadata.json").read_text())
    formats = meta["weight_formats"]
    assert set(formats.values()) == MIX_TYPES[mix], formats
    assert not any("norm" in n or n.endswith("mlp.gate.weight") for n in formats)  # stay f32
    from safetensors.numpy import load_file

    stored = load_file(str(out / "weights.safetensors"))
    assert all(stored[n].dtype == np.uint8 for n in formats)
    f32_bytes = sum(p.numel() * 4 for p in load_hf_model(load_config(quant_model), quant_model)
                    .parameters())  # fmt: skip
    assert sum(v.nbytes for v in stored.values()) < f32_bytes / 3

    ids = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(7)).tolist()
    want_prompt, want_steps = _reference(quant_model, out, ids)
    engine = Engine.load(out, "cpu")
    got = engine.prefill(ids, all_logits=True)  # [T, V], in ubatch chunks
    assert got.shape == want_prompt.shape
    assert _rel(got, want_prompt) < 1e-4
    tok = int(got[-1].argmax())
    for want in want_steps:
        step = engine.decode(tok)
        assert _rel(step, want) < 1e-4
        tok = int(step.argmax())


def test_quant_of_a_gguf_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="already holds quantized"):
        compile_model(
            output=tmp_path / "x",
            model_dir=str(tmp_path / "m.gguf"),
            options=CompileOptions(quant="q4_0"),
            log=lambda _msg: None,
        )


def test_unknown_quant_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--quant 'q3_k_s' is not a mix"):
        compile_model(
            output=tmp_path / "x",
            preset_name="tiny",
            options=CompileOptions(quant="q3_k_s"),
            log=lambda _msg: None,
        )


def test_memory_plan_counts_the_stored_blocks_and_what_the_kernels_read(tmp_path):
    from mla_compiler.errors import InputError
    from mla_compiler.runtime import memory_plan

    out = compile_model(
        output=tmp_path / "q8",
        preset_name="tiny",
        options=CompileOptions(quant="q8_0"),
        log=lambda _msg: None,
    )
    meta = json.loads((out / "metadata.json").read_text())
    stored = meta["weight_bytes"]["stored"]
    q8 = sum(np.prod(s) for s in _shapes(meta, "q8_0"))
    assert stored["q8_0"] == q8 // 32 * 34  # 34 B a block of 32
    # on the CPU the products' weights are decoded at load (float32; kv_b also in the
    # absorbed forms decode and prefill take: W_UK / W_UV per head, nothing else twice); the
    # embedding stays blocks (its lookups decode the rows they read)
    n = sum(np.prod(s) for s in _shapes(meta, None))
    kv_b = sum(np.prod(s) for s in _shapes(meta, None, "kv_b_proj"))
    embed = np.prod(_shapes(meta, "q8_0", "embed_tokens")[0])
    device = meta["weight_bytes"]["device"]
    decoded = 4 * (n - embed) + embed // 32 * 34
    assert decoded <= device <= decoded + 4 * 2 * kv_b
    plan = memory_plan.plan(meta, max_context=1024)
    # norms, the router and the embedding's blocks pass through transform_params: loading
    # allocates the rest
    new = meta["weight_bytes"]["device_new"]
    assert embed // 32 * 34 < device - new <= 4 * (n - q8) + embed // 32 * 34
    assert plan["load_peak"] == sum(stored.values()) + new
    cache = 3 * 1024 * meta["kv_cache_width"] * 2
    assert dict(plan["parts"])["KV cache (1024 x 1)"] == cache
    assert "device memory plan" in memory_plan.format_plan(plan)
    from mla_compiler import inspect_artifact

    report = inspect_artifact.inspect(out)  # at the artifact's own max context
    assert report["memory"]["parts"][0] == ("weights stored float32", stored["float32"])
    assert "weights stored q8_0" in inspect_artifact.format_table(report)
    need = max(plan["load_peak"], plan["run"])
    memory_plan.check_fits(plan, need, max_context=1024)
    with pytest.raises(InputError, match=r"GiB short; lower --max-context"):
        memory_plan.check_fits(plan, need - 1, max_context=1024)


def _shapes(meta: dict, qtype: str | None, part: str = "") -> list[tuple[int, ...]]:
    """Shapes of the tiny preset's weights stored as ``qtype`` (None: all) named ``*part*``."""
    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.weights import expected_shapes

    shapes = expected_shapes(ModelConfig.from_dict(meta["model"]))
    fmt = meta["weight_formats"]
    return [s for n, s in shapes.items() if (qtype is None or fmt.get(n) == qtype) and part in n]


def test_a_quantized_preset_too_large_to_store_is_drawn_and_quantized_at_load(
    tmp_path, monkeypatch
):
    """``--preset X --quant MIX`` for a preset whose weights are not stored: the artifact has
    no weights file, the runtime draws each tensor alone and quantizes it (in processes or
    not, the same blocks), and the logits are our model's on those blocks decoded."""
    from mla_compiler import compiler
    from mla_compiler.model_export.config import preset
    from mla_compiler.model_export.modeling import DeepseekV2
    from mla_compiler.runtime import engine as E

    monkeypatch.setattr(compiler, "MAX_STORED_RANDOM_BYTES", 0)
    out = compile_model(
        output=tmp_path / "q4",
        preset_name="tiny",
        options=CompileOptions(quant="q4_0", kv_dtype="float32"),
        log=lambda _msg: None,
    )
    assert not (out / "weights.safetensors").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["weights"] == {"source": "random", "seed": 0, "stored": False, "quant": "q4_0"}
    assert set(meta["weight_formats"].values()) == {"q4_0"}
    blocks = E.seeded_blocks(meta, workers=1)
    assert all(
        np.array_equal(a, b) for a, b in zip(blocks, E.seeded_blocks(meta, workers=2), strict=True)
    )
    model = DeepseekV2(preset("tiny")).eval()
    with torch.no_grad():
        for (name, p), data in zip(model.named_parameters(), blocks, strict=True):
            qtype = meta["weight_formats"].get(name)
            values = (
                data
                if qtype is None
                else gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype.upper()])
            )
            p.copy_(torch.from_numpy(np.asarray(values, np.float32)).view(p.shape))
        ids = list(range(3, 3 + PROMPT))
        cache = model.new_cache(PROMPT + 4, torch.float32)
        want, _ = model(**single_sequence_inputs(ids, start=0, logits="all"), cache=cache)
    got = Engine.load(out, "cpu").prefill(ids, all_logits=True)
    assert _rel(got, want.numpy()) < 1e-4


@pytest.mark.parametrize("mix", ["q4_k_m", "iq4_nl"])
def test_lowered_products_read_the_blocks(tmp_path, quant_model, monkeypatch, mix):
    """The GPU lowering on llvm (LowerDenseGemm's GPU gate bypassed; its kernels have CPU
    paths): dense products of quantized weights call kernels that read the blocks (prompt
    chunks the quantized ``gemm``, decode ``quant_gemv``, SiLU·up after it), the device keeps the
    blocks (``transform_params`` returns them as uint8), and the f16 logits follow the model
    on the decoded weights for a prompt longer than ``--ubatch`` and decode steps."""
    import mla_compiler.passes.lower_dense_gemm as L
    import mla_compiler.passes.lower_moe as LM

    monkeypatch.setattr(L, "is_gpu", lambda _t: True)
    monkeypatch.setattr(LM, "is_gpu", lambda _t: True)
    out = compile_model(
        output=tmp_path / mix,
        model_dir=str(quant_model),
        options=CompileOptions(quant=mix, ubatch=UBATCH, dtype="float16"),
        log=lambda _msg: None,
    )
    lib = (out / "model.so").read_bytes()
    meta = json.loads((out / "metadata.json").read_text())
    fmts = set(meta["weight_formats"].values())
    for fmt in fmts:
        assert f"quant_gemv_{fmt}_".encode() in lib, fmt
    assert b"silu_mul_epilogue" in lib
    assert b"_m1_residual" in lib  # o_proj / down at decode: added in quant_gemv's store
    # routed experts: grouped GEMMs on the blocks for prompts, quant_moe_gemv at decode
    assert b"quant_moe_gemv_gate_up" in lib and b"moe_weighted_sum" in lib
    # the products' weights stay blocks (q_proj, kv_a, o_proj, MLPs, routed experts, head:
    # 2 bytes a value less ~4.5 bits; the embedding is blocks in both builds, kv_b is decoded
    # for the absorbed forms): the device holds less than with them decoded
    dense = [n for n in meta["weight_formats"] if "kv_b" not in n and "embed" not in n]
    shapes = _named_shapes(meta)
    saved = sum(np.prod(shapes[n]) * 2 - np.prod(shapes[n][:-1]) * _row_bytes(meta, n, shapes)
                for n in dense)  # fmt: skip
    monkeypatch.setattr(L, "is_gpu", lambda _t: False)
    monkeypatch.setattr(LM, "is_gpu", lambda _t: False)
    plain = compile_model(
        output=tmp_path / "decoded",
        model_dir=str(quant_model),
        options=CompileOptions(quant=mix, ubatch=UBATCH, dtype="float16"),
        log=lambda _msg: None,
    )
    everything = json.loads((plain / "metadata.json").read_text())["weight_bytes"]["device"]
    assert meta["weight_bytes"]["device"] <= everything - saved

    ids = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    want_prompt, want_steps = _reference(quant_model, out, ids)
    engine = Engine.load(out, "cpu")
    got = engine.prefill(ids, all_logits=True)
    assert _rel(got, want_prompt) < 3e-3
    tok = int(got[-1].argmax())
    for want in want_steps:
        step = engine.decode(tok)
        assert _rel(step, want) < 3e-3
        tok = int(step.argmax())


def _named_shapes(meta: dict) -> dict:
    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.weights import expected_shapes

    return expected_shapes(ModelConfig.from_dict(meta["model"]))


def _row_bytes(meta: dict, name: str, shapes: dict) -> int:
    from mla_compiler.model_export.quantize import row_bytes

    return row_bytes(shapes[name][-1], meta["weight_formats"][name])


def test_quant_logits_script_compares_with_the_decoded_model(tmp_path, monkeypatch):
    """benchmarks/quant_logits (the GPU check of issue #28) on a CPU artifact of a seeded
    quantized preset drawn at load: same blocks on both sides, f16 error, same argmax."""
    import sys

    from mla_compiler import compiler

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import quant_logits

    monkeypatch.setattr(compiler, "MAX_STORED_RANDOM_BYTES", 0)  # drawn at load, as V2-Lite
    out = compile_model(
        output=tmp_path / "q",
        preset_name="tiny",
        options=CompileOptions(quant="q4_k_m", dtype="float16"),
        log=lambda _msg: None,
    )
    assert "benchmarks" in sys.modules
    res = quant_logits.compare(out, prompt=40, steps=3)
    assert res["rows"] == 43 and res["finite"]
    assert res["rel_err"] < 1e-2 and res["argmax_agreement"] == 1.0, res
