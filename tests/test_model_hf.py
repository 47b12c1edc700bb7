"""Our PyTorch model and HF loader against transformers' DeepseekV2ForCausalLM (the reference)."""

from __future__ import annotations

import pytest
import torch

from mla_compiler.errors import WeightError
from mla_compiler.model_export.config import load_config
from mla_compiler.model_export.modeling import single_sequence_inputs
from mla_compiler.model_export.weights import load_hf_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ours_logits(model, ids: list[int], *, chunks: list[int]) -> torch.Tensor:
    """Full-sequence logits computed chunk by chunk through the cache."""
    cache = model.new_cache(len(ids) + 4, torch.float32)
    outs, start = [], 0
    for size in chunks:
        inp = single_sequence_inputs(ids[start : start + size], start=start, logits="all")
        with torch.no_grad():
            logits, cache = model(**inp, cache=cache)
        outs.append(logits)
        start += size
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["small-yarn", "qlora-grouped", "lite2"])
def test_logits_match_transformers(hf_checkpoint, name):
    path = hf_checkpoint(name)
    hf_model = hf_checkpoint.models[(name, 1, 1.0, 0)][1]
    model = load_hf_model(load_config(path), path)
    ids = torch.randint(0, model.cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0]
    one_shot = _ours_logits(model, ids.tolist(), chunks=[13])
    chunked = _ours_logits(model, ids.tolist(), chunks=[5, 1, 4, 1, 1, 1])
    assert _rel(one_shot, ref) <= 1e-4
    assert _rel(chunked, ref) <= 1e-4


def test_greedy_tokens_match_transformers(hf_checkpoint):
    path = hf_checkpoint("small-yarn", scale=8.0)
    hf_model = hf_checkpoint.models[("small-yarn", 1, 8.0, 0)][1]
    model = load_hf_model(load_config(path), path)
    prompt = [5, 17, 99, 3, 42]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    ref = ref[0, len(prompt) :].tolist()
    seq, cache, out = list(prompt), model.new_cache(64, torch.float32), []
    with torch.no_grad():
        logits, cache = model(**single_sequence_inputs(seq, start=0), cache=cache)
        for _ in range(12):
            tok = int(logits[0].argmax())
            out.append(tok)
            logits, cache = model(**single_sequence_inputs([tok], start=len(seq)), cache=cache)
            seq.append(tok)
    assert out == ref


def test_sharded_checkpoint_loads(hf_checkpoint):
    one = load_hf_model(load_config(hf_checkpoint("small-yarn")), hf_checkpoint("small-yarn"))
    path = hf_checkpoint("small-yarn", shards=3)
    assert (path / "model.safetensors.index.json").exists()
    sharded = load_hf_model(load_config(path), path)
    for (n, a), (_, b) in zip(one.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    import shutil

    src = hf_checkpoint("small-yarn", shards=3)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(WeightError, match=f"shard {victim.name}.*missing"):
        load_hf_model(load_config(dst), dst)


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    import json
    import shutil

    src = hf_checkpoint("small-yarn")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["v_head_dim"] = 8  # weights were written with 16
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightError, match="kv_b_proj.weight has shape"):
        load_hf_model(load_config(dst), dst)


def test_truncated_safetensors(hf_checkpoint, tmp_path):
    import shutil

    src = hf_checkpoint("small-yarn")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightError, match="truncated or corrupt|not a readable"):
        load_hf_model(load_config(dst), dst)


def _reshaped_checkpoint(hf_checkpoint, tmp_path, name: str, reshape):
    """small-yarn with tensor ``name`` replaced by ``reshape(tensor)``."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint("small-yarn"), dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = reshape(tensors[name]).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
RESHAPED = [  # (tensor, how it is mis-shaped, expected shape)
    (KV_A, lambda t: t[:40], "(40, 64)", "(48, 64)"),
    (KV_A, lambda t: t.T, "(64, 48)", "(48, 64)"),
    ("model.layers.0.self_attn.q_proj.weight", lambda t: t[:, :32], "(128, 32)", "(128, 64)"),
    ("model.layers.2.mlp.experts.3.up_proj.weight", lambda t: t.T, "(64, 32)", "(32, 64)"),
    ("model.layers.0.input_layernorm.weight", lambda t: t[None], "(1, 64)", "(64,)"),
]


@pytest.mark.parametrize(
    "name,reshape,got,want",
    RESHAPED,
    ids=["kv_a-rows", "kv_a-transposed", "q_proj-cols", "expert-up-transposed", "norm-2d"],
)
def test_misshaped_tensor_is_named_before_any_transformation(
    hf_checkpoint, tmp_path, name, reshape, got, want
):
    """Each checkpoint tensor's shape is checked before rope permutation or expert stacking:
    a WeightError naming the tensor, its shape and the shape config.json implies."""
    dst = _reshaped_checkpoint(hf_checkpoint, tmp_path, name, reshape)
    with pytest.raises(WeightError) as err:
        load_hf_model(load_config(dst), dst)
    assert f"{name} has shape {got} in ckpt, config.json implies {want}" in str(err.value)


def test_cli_misshaped_kv_a_proj_is_one_line(hf_checkpoint, tmp_path):
    from conftest import run_cli

    dst = _reshaped_checkpoint(hf_checkpoint, tmp_path, KV_A, lambda t: t[:40])
    out = tmp_path / "o"
    proc = run_cli("compile", "--model", str(dst), "--output", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"mla-compiler compile: error: {KV_A} has shape (40, 64) in ckpt, config.json implies "
        "(48, 64): the weights and config.json disagree; re-download the checkpoint or fix "
        "config.json"
    ], proc.stderr
    assert not out.exists()
