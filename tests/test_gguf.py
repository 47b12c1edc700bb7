"""GGUF import: files written the way llama.cpp's convert_hf_to_gguf.py writes DeepSeek-V2 land in
the same config and state dict as the HF checkpoint, and generate the same greedy tokens."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

gguf = pytest.importorskip("gguf")

from test_tokenizer import BOS, CORPUS, DEEPSEEK_TEMPLATE, EOS  # noqa: E402

from mla_compiler.errors import ConfigError, WeightError  # noqa: E402
from mla_compiler.model_export import gguf as gguf_import  # noqa: E402
from mla_compiler.model_export.config import load_config  # noqa: E402
from mla_compiler.model_export.weights import load_hf_state  # noqa: E402

Q = gguf.GGMLQuantizationType


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _pick_type(name: str, t: np.ndarray, qtype: str):
    """llama.cpp's choice: 1-D tensors stay f32; q8_0 needs rows that are multiples of 32."""
    if qtype == "f32" or t.ndim == 1:
        return Q.F32
    if qtype in ("q8_0", "q4_0") and t.shape[-1] % 32 == 0:
        return Q[qtype.upper()]
    return Q.BF16 if qtype == "bf16" else Q.F16


def write_gguf(
    hf_dir: Path,
    out: Path,
    *,
    kv_b: str = "split",
    qtype: str = "f32",
    legacy_mla_keys: bool = False,
    tokenizer=None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Convert a HF checkpoint as llama.cpp's DeepseekV2Model does (names from gguf-py's own
    tensor map): experts stacked, kv_b split into k_b (transposed) / v_b or kept ("fused"),
    rope rows untouched. ``legacy_mla_keys`` writes the pre-MLA-split header (key_length =
    per-head Q/K width, no key_length_mla) of older files."""
    hf = json.loads((hf_dir / "config.json").read_text())
    layers = hf["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), "deepseek2")
    w.add_block_count(layers)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    rope = hf.get("rope_parameters") or dict(
        hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0)
    )
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    w.add_expert_count(hf["n_routed_experts"])
    w.add_expert_used_count(hf["num_experts_per_tok"])
    if hf.get("n_group") is not None:
        w.add_expert_group_count(hf["n_group"])
        w.add_expert_group_used_count(hf["topk_group"])
    w.add_leading_dense_block_count(hf["first_k_dense_replace"])
    w.add_vocab_size(hf["vocab_size"])
    if hf.get("q_lora_rank"):
        w.add_q_lora_rank(hf["q_lora_rank"])
    w.add_kv_lora_rank(hf["kv_lora_rank"])
    rope_dim, nope, v = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"], hf["v_head_dim"]
    if legacy_mla_keys:
        w.add_head_count_kv(hf["num_attention_heads"])
        w.add_key_length(nope + rope_dim)
        w.add_value_length(v)
    else:
        w.add_head_count_kv(1)
        w.add_key_length(hf["kv_lora_rank"] + rope_dim)
        w.add_value_length(hf["kv_lora_rank"])
        w.add_key_length_mla(nope + rope_dim)
        w.add_value_length_mla(v)
    w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    w.add_expert_shared_count(hf["n_shared_experts"])
    w.add_expert_weights_scale(hf["routed_scaling_factor"])
    if hf.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(rope_dim)
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"])
    if tokenizer is not None:
        add_vocab(w, tokenizer, hf["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, layers)
    tensors = _hf_tensors(hf_dir)
    out_tensors: list[tuple[str, torch.Tensor]] = []
    for layer in range(layers):
        if f"model.layers.{layer}.mlp.experts.0.up_proj.weight" in tensors:
            for part in ("down_proj", "gate_proj", "up_proj"):
                ids = range(hf["n_routed_experts"])
                stacked = torch.stack(
                    [
                        tensors.pop(f"model.layers.{layer}.mlp.experts.{e}.{part}.weight")
                        for e in ids
                    ]
                )
                out_tensors.append((f"model.layers.{layer}.mlp.experts.{part}.weight", stacked))
    for name, t in tensors.items():
        if name.endswith("kv_b_proj.weight") and kv_b == "split":
            heads = hf["num_attention_heads"]
            kv = t.view(heads, nope + v, t.shape[-1])
            k_b, v_b = torch.split(kv, [nope, v], dim=1)
            out_tensors.append((name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)))
            out_tensors.append((name.replace("kv_b_proj", "v_b_proj"), v_b))
        else:
            out_tensors.append((name, t))
    for name, t in out_tensors:
        new = names.get_name(name, try_suffixes=(".weight",))
        assert new is not None, name
        if new.removesuffix(".weight") in drop:
            continue
        data = t.float().contiguous().numpy()
        kind = _pick_type(new, data, qtype)
        if kind == Q.F32:
            w.add_tensor(new, data)
        elif kind == Q.F16:
            w.add_tensor(new, data.astype(np.float16))
        else:
            w.add_tensor(new, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (as DeepSeek's) trained on a few sentences; ids 0/1/2 =
    unk/bos/eos as in the test checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", BOS, EOS])
    tok.train_from_iterator(CORPUS + ["café crème brûlée"], trainer)
    return tok


def add_vocab(w, tok, vocab_size: int) -> None:
    """The tokenizer.ggml.* keys as llama.cpp's _set_vocab_gpt2 writes them: the vocabulary
    padded to vocab_size with [PAD{i}] (UNUSED), specials CONTROL, merges as "a b" strings."""
    model = json.loads(tok.to_str())["model"]
    by_id = {i: t for t, i in tok.get_vocab().items()}
    specials = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(
            gguf.TokenType.UNUSED
            if t is None
            else gguf.TokenType.CONTROL
            if t in specials
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_chat_template(DEEPSEEK_TEMPLATE)


TEXTS = ["hello world, the latent cache", "café crème", f"{BOS}User: hi\n\nAssistant:", "  a  b"]


def test_tokenizer_from_gguf_vocab(tmp_path, hf_checkpoint):
    tok = byte_level_tokenizer()
    path = write_gguf(hf_checkpoint("qlora-grouped"), tmp_path / "t.gguf", tokenizer=tok)
    meta = gguf_import.read_metadata(gguf_import._open(path), arrays=True)
    got = gguf_import.tokenizer_from_gguf(meta)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert got.encode(text).ids == ids, text
        assert got.decode(ids, skip_special_tokens=False) == tok.decode(
            ids, skip_special_tokens=False
        )
    out = tmp_path / "art"
    out.mkdir()
    assert gguf_import.write_tokenizer_files(path, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg == {"bos_token": BOS, "eos_token": EOS, "chat_template": DEEPSEEK_TEMPLATE}


def _expected_config(hf_dir: Path):
    """The HF config as GGUF can carry it: YaRN mscale == mscale_all_dim (no key for mscale)."""
    cfg = load_config(hf_dir)
    if cfg.rope.kind != "yarn":
        return cfg
    return dataclasses.replace(
        cfg, rope=dataclasses.replace(cfg.rope, mscale=cfg.rope.mscale_all_dim)
    )


CASES = [  # (fixture, kv_b layout, type, legacy header)
    ("small-yarn", "split", "f32", False),
    ("small-yarn", "fused", "f16", True),
    ("qlora-grouped", "split", "f16", False),
    ("qlora-grouped", "fused", "f32", False),
    ("qlora-grouped", "split", "bf16", False),
    ("small-yarn", "split", "q8_0", False),
]


@pytest.mark.parametrize(
    "fixture,kv_b,qtype,legacy",
    CASES,
    ids=[f"{f}-{k}-{q}{'-legacy' * lg}" for f, k, q, lg in CASES],
)
def test_state_dict_matches_hf(tmp_path, hf_checkpoint, fixture, kv_b, qtype, legacy):
    hf_dir = hf_checkpoint(fixture)
    path = write_gguf(hf_dir, tmp_path / "m.gguf", kv_b=kv_b, qtype=qtype, legacy_mla_keys=legacy)
    reader = gguf_import._open(path)
    cfg = gguf_import.config_from_gguf(
        gguf_import.read_metadata(reader), gguf_import.tensor_shapes(reader), name=hf_dir.name
    )
    assert cfg == _expected_config(hf_dir)
    ref = load_hf_state(load_config(hf_dir), hf_dir)
    got = gguf_import.load_gguf_state(cfg, reader)
    assert sorted(got) == sorted(ref)
    quantized = 0
    for name, want in ref.items():
        have = got[name]
        assert have.shape == want.shape, name
        if qtype == "f32" or want.ndim == 1:
            assert torch.equal(have.float(), want), name
        elif qtype in ("f16", "bf16") or want.shape[-1] % 32:
            half = torch.float16 if qtype != "bf16" else torch.bfloat16
            assert have.dtype == half and torch.equal(have, want.to(half)), name
        else:  # Q8_0: 8-bit per 32-value block, scale = max|w| / 127
            err = (have.float() - want).abs().max().item()
            assert (
                0 < err <= want.abs().max().item() / 127 * 0.51 + 1e-3 * want.abs().max().item()
            ), name
            quantized += 1
    assert qtype != "q8_0" or quantized >= 6


def test_unsupported_quant_type_is_named(tmp_path, hf_checkpoint):
    path = write_gguf(hf_checkpoint("small-yarn"), tmp_path / "q4.gguf", qtype="q4_0")
    with pytest.raises(WeightError, match="not supported yet: Q4_0"):
        gguf_import.load_gguf_model(path)
    proc = run_cli(
        "compile",
        "--model",
        str(path),
        "--target",
        "cpu",
        "--output",
        str(tmp_path / "out"),
        check=False,
    )
    assert proc.returncode == 2 and "not supported yet: Q4_0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # a type id gguf-py does not know (ik_llama.cpp's own quants): same kind of error
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[0].field.parts[4][0] = 200
    reader.data.flush()
    del reader
    with pytest.raises(WeightError, match="not supported yet: tensor type id 200"):
        gguf_import.load_gguf_model(path)


@pytest.mark.parametrize(
    "drop,message",
    [
        ("blk.1.attn_v_b", "only one of attn_k_b / attn_v_b"),
        ("blk.1.ffn_up_exps", "lacks one of ffn_gate/up/down_exps"),
        ("blk.0.attn_q_a_norm", "lacks layers.0.self_attn.q_a_layernorm.weight"),
    ],
    ids=["v_b", "up_exps", "q_a_norm"],
)
def test_incomplete_files_name_the_tensor(tmp_path, hf_checkpoint, drop, message):
    path = write_gguf(hf_checkpoint("qlora-grouped"), tmp_path / "m.gguf", drop=(drop,))
    with pytest.raises(WeightError, match=message):
        gguf_import.load_gguf_model(path)


def test_other_arch_and_bad_files_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="'llama' is not supported"):
        gguf_import.load_gguf_model(tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(WeightError, match="not a readable GGUF"):
        gguf_import.load_gguf_model(tmp_path / "junk.gguf")
    with pytest.raises(WeightError, match="does not exist"):
        gguf_import.load_gguf_model(tmp_path / "missing.gguf")


PROMPT_LEN, NEW = 40, 12


@pytest.fixture(scope="module")
def sharp_checkpoint(hf_checkpoint, tmp_path_factory):
    """small-yarn with sharp logits, its mscale set to mscale_all_dim (what GGUF can carry)."""
    src = hf_checkpoint("small-yarn", scale=8.0)
    dst = tmp_path_factory.mktemp("hf-sharp")
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    hf[key]["mscale"] = hf[key]["mscale_all_dim"]
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def _greedy(tmp_path: Path, model: Path, name: str, prompt: list[int]) -> list[int]:
    out = tmp_path / name
    run_cli(
        "compile",
        "--model",
        str(model),
        "--target",
        "cpu",
        "--output",
        str(out),
        "--max-context",
        "128",
    )
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["weights"]["source"] == "gguf"
    proc = run_cli(
        "run",
        str(out),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        str(NEW),
        "--json",
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]


def test_cli_gguf_generates_hf_greedy_tokens(tmp_path, sharp_checkpoint):
    """compile --model X.gguf + run --json give transformers' greedy tokens of the checkpoint
    the GGUF was converted from (split kv_b f32, and fused kv_b Q8_0)."""
    prompt = torch.randint(3, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3))
    from transformers import DeepseekV2ForCausalLM

    hf = DeepseekV2ForCausalLM.from_pretrained(sharp_checkpoint).eval()
    with torch.no_grad():
        expected = hf.generate(prompt[None], max_new_tokens=NEW, do_sample=False)[0, PROMPT_LEN:]
    prompt, expected = prompt.tolist(), expected.tolist()
    tok = byte_level_tokenizer()
    split = write_gguf(
        sharp_checkpoint, tmp_path / "split.gguf", kv_b="split", qtype="f32", tokenizer=tok
    )
    assert _greedy(tmp_path, split, "gguf-split", prompt) == expected
    # the artifact carries the GGUF's vocabulary: text in, text out
    proc = run_cli(
        "run", str(tmp_path / "gguf-split"), "--prompt", TEXTS[0], "--max-new-tokens", "6", "--json"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["prompt_tokens"] == len(tok.encode(TEXTS[0]).ids) + 1  # + BOS
    assert result["text"] == tok.decode(result["tokens"])
    q8 = write_gguf(sharp_checkpoint, tmp_path / "q8.gguf", kv_b="fused", qtype="q8_0")
    assert _greedy(tmp_path, q8, "gguf-q8", prompt) == expected
