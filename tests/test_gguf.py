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
from mla_compiler.model_export import gguf_tokenizer, quantize  # noqa: E402
from mla_compiler.model_export.config import load_config  # noqa: E402
from mla_compiler.model_export.weights import load_hf_state  # noqa: E402

Q = gguf.GGMLQuantizationType


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _pick_type(name: str, t: np.ndarray, qtype: str, layers: int):
    """llama.cpp's choice: 1-D tensors stay f32; q8_0 / q4_0 / q4_1 need rows that are multiples
    of 32; a mix (q4_k_m) picks per tensor (``model_export.quantize.mix_type``)."""
    if qtype == "q4_k_m":
        return Q[quantize.mix_type(qtype, name, t.shape, layers).upper()]
    if qtype == "f32" or t.ndim == 1:
        return Q.F32
    if qtype in ("q8_0", "q4_0", "q4_1") and t.shape[-1] % 32 == 0:
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
    edit: dict | None = None,
    dequantized: dict | None = None,
) -> Path:
    """Convert a HF checkpoint as llama.cpp's DeepseekV2Model does (names from gguf-py's own
    tensor map): experts stacked, kv_b split into k_b (transposed) / v_b or kept ("fused"),
    rope rows untouched. ``legacy_mla_keys`` writes the pre-MLA-split header (key_length =
    per-head Q/K width, no key_length_mla) of older files. ``edit``: header key -> (value,
    GGUFValueType) written instead, or None to leave the key out. ``dequantized``: filled with
    what each tensor written decodes to from the file (``{hf name: f32 tensor}``; experts
    stacked as ``...mlp.experts.{down,gate,up}_proj.weight``, kv_b as written)."""
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
    for key, value in (edit or {}).items():
        if value is None:
            del w.kv_data[0][key]
        else:
            w.kv_data[0][key] = gguf.GGUFValue(value=value[0], type=value[1])

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
        kind = _pick_type(new, data, qtype, layers)
        if kind == Q.F32:
            stored = data
        elif kind == Q.F16:
            stored = data.astype(np.float16)
        elif kind == Q.BF16 or kind.name.lower() not in quantize.QTYPES:
            stored = gguf.quants.quantize(data, kind)
        else:
            stored = quantize.quantize(data, kind.name.lower())
        w.add_tensor(new, stored, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
        if dequantized is not None:
            values = gguf.quants.dequantize(stored, kind).reshape(data.shape)
            dequantized[name] = torch.from_numpy(np.array(values, np.float32))
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
    got = gguf_tokenizer.tokenizer_from_gguf(meta)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert got.encode(text).ids == ids, text
        assert got.decode(ids, skip_special_tokens=False) == tok.decode(
            ids, skip_special_tokens=False
        )
    out = tmp_path / "art"
    out.mkdir()
    assert gguf_tokenizer.write_tokenizer_files(path, out)
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
    path = write_gguf(hf_checkpoint("small-yarn"), tmp_path / "q4.gguf", qtype="q4_1")
    with pytest.raises(
        WeightError, match=r"blk\.1\.ffn_down_exps\.weight: .* not supported yet: Q4_1"
    ):
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
    assert proc.returncode == 2 and "not supported yet: Q4_1" in proc.stderr
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


@pytest.fixture(scope="module")
def quant_checkpoint(hf_checkpoint):
    return hf_checkpoint("quant", scale=8.0)


def test_cli_mixed_quant_gguf_generates_the_greedy_tokens_of_its_weights(
    tmp_path, quant_checkpoint
):
    """A Q4_K_M file (Q4_K, Q6_K, Q5_0, Q8_0 and f32 tensors, as llama.cpp mixes them) compiles
    for cpu and generates transformers' greedy tokens of the weights the file decodes to."""
    from transformers import DeepseekV2ForCausalLM

    decoded: dict = {}
    path = write_gguf(
        quant_checkpoint, tmp_path / "m.gguf", kv_b="split", qtype="q4_k_m", dequantized=decoded
    )
    types = {Q(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= types, types
    hf = DeepseekV2ForCausalLM.from_pretrained(quant_checkpoint).eval()
    state = hf.state_dict()
    for name in list(decoded):  # as transformers holds them
        if name.endswith("k_b_proj.weight"):  # k_b (written transposed) and v_b -> kv_b
            k_b, v_b = decoded.pop(name), decoded.pop(name.replace("k_b_proj", "v_b_proj"))
            kv_b = name.replace("k_b_proj", "kv_b_proj")
            decoded[kv_b] = torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(state[kv_b].shape)
        elif ".mlp.experts.gate_proj." in name:  # stacked experts: gate | up, down
            up = decoded.pop(name.replace("gate_proj", "up_proj"))
            prefix = name.removesuffix("gate_proj.weight")
            decoded[prefix + "gate_up_proj"] = torch.cat([decoded.pop(name), up], 1)
            decoded[prefix + "down_proj"] = decoded.pop(prefix + "down_proj.weight")
    assert sorted(decoded) == sorted(n for n in state if "rotary" not in n)
    changed = sum(not torch.equal(decoded[n], state[n]) for n in decoded)
    assert changed >= 20  # the quantized ones
    hf.load_state_dict(decoded, strict=False)
    prompt = torch.randint(3, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.generate(prompt[None], max_new_tokens=NEW, do_sample=False)[0, PROMPT_LEN:]
    assert _greedy(tmp_path, path, "q4km", prompt.tolist()) == expected.tolist()
    # the artifact keeps the file's blocks (kv_b, made of k_b and v_b, is decoded)
    meta = json.loads((tmp_path / "q4km" / "metadata.json").read_text())
    assert set(meta["weight_formats"].values()) == {"q4_k", "q6_k", "q5_0", "q8_0"}
    assert not any("kv_b" in n for n in meta["weight_formats"])


def test_truncated_quant_blocks_are_named(tmp_path, hf_checkpoint):
    path = write_gguf(hf_checkpoint("small-yarn"), tmp_path / "q8.gguf", qtype="q8_0")
    reader = gguf_import._open(path)
    t = next(t for t in reader.tensors if Q(t.tensor_type) == Q.Q8_0)
    t = t._replace(data=t.data[:-1])  # a row of blocks short
    with pytest.raises(WeightError, match=f"{t.name}: its Q8_0 blocks do not make its shape"):
        gguf_import._to_torch(t)


# ---- metadata and tensor checks --------------------------------------------------------------

V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def small_gguf_meta(hf_checkpoint, tmp_path_factory):
    """(metadata, tensor shapes) of small-yarn's GGUF: the base the bad headers are made from."""
    path = write_gguf(hf_checkpoint("small-yarn"), tmp_path_factory.mktemp("g") / "m.gguf")
    reader = gguf_import._open(path)
    return gguf_import.read_metadata(reader), gguf_import.tensor_shapes(reader)


A = "deepseek2"
BAD_META = [  # (key, value or None to drop it, message)
    (f"{A}.block_count", "three", f"{A}.block_count must be a positive integer, got 'three'"),
    (f"{A}.block_count", 0, f"{A}.block_count must be a positive integer, got 0"),
    (f"{A}.block_count", None, f"lacks {A}.block_count: the file is not a DeepSeek-V2 GGUF"),
    (f"{A}.attention.kv_lora_rank", -4, "kv_lora_rank must be a positive integer, got -4"),
    (f"{A}.rope.dimension_count", 7, "dimension_count must be a positive even integer, got 7"),
    (f"{A}.attention.key_length_mla", 16, "key_length_mla must be greater than"),
    (f"{A}.expert_used_count", 9, f"{A}.expert_used_count must be an integer in 1..{A}.expert"),
    (f"{A}.leading_dense_block_count", 4, "leading_dense_block_count must be an integer in 0.."),
    (f"{A}.expert_weights_norm", 1, "expert_weights_norm must be true or false, got 1"),
    (f"{A}.expert_weights_scale", 0.0, "expert_weights_scale must be a number > 0, got 0.0"),
    (f"{A}.attention.layer_norm_rms_epsilon", "1e-6", "epsilon must be a number > 0, got '1e-6'"),
    (f"{A}.rope.freq_base", 0.5, f"{A}.rope.freq_base must be a number > 1, got 0.5"),
    (f"{A}.rope.scaling.factor", None, f"lacks {A}.rope.scaling.factor"),
    (f"{A}.rope.scaling.factor", 0.25, "rope.scaling.factor must be a number >= 1, got 0.25"),
    (f"{A}.expert_gating_func", 2, "expert_gating_func 2 is not softmax (1)"),
    ("tokenizer.ggml.eos_token_id", 999, "eos_token_id must be an integer in 0..deepseek2.voc"),
]


@pytest.mark.parametrize(
    "key,value,message", BAD_META, ids=[f"{k.split('.', 1)[1]}={v!r}" for k, v, _ in BAD_META]
)
def test_bad_metadata_is_one_config_error(small_gguf_meta, key, value, message):
    meta, shapes = small_gguf_meta
    meta = dict(meta)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    with pytest.raises(ConfigError) as err:
        gguf_import.config_from_gguf(meta, shapes, where="m.gguf")
    assert str(err.value).startswith("m.gguf"), err.value
    assert message in str(err.value), err.value


def test_cli_bad_metadata_is_one_line(tmp_path, hf_checkpoint):
    path = write_gguf(
        hf_checkpoint("small-yarn"),
        tmp_path / "m.gguf",
        edit={f"{A}.block_count": ("three", V.STRING)},
    )
    out = tmp_path / "o"
    proc = run_cli("compile", "--model", str(path), "--output", str(out), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mla-compiler compile: error: m.gguf: {A}.block_count must be a positive integer, "
        "got 'three'"
    ]
    assert not out.exists()


def test_misshaped_tensor_is_named_before_any_conversion(tmp_path, hf_checkpoint):
    """A kv_a_mqa tensor with rows missing: named with both shapes, not an IndexError from the
    rope permutation."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("small-yarn"), hf)
    tensors = load_file(str(hf / "model.safetensors"))
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    tensors[name] = tensors[name][:40].contiguous()
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    path = write_gguf(hf, tmp_path / "m.gguf", qtype="q8_0")
    with pytest.raises(WeightError) as err:
        gguf_import.load_gguf_model(path)
    assert str(err.value) == (
        "blk.1.attn_kv_a_mqa.weight has shape (40, 64), metadata implies (48, 64): the file is "
        "inconsistent (re-convert it)"
    )


# ---- SentencePiece ("llama") vocabularies ---------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary as llama.cpp's converter writes one (tokens, scores, token
    types): <unk> <s> </s>, the 256 byte tokens <0xNN>, pieces learnt by a BPE on CORPUS with
    score -(merge rank) (no piece with a newline: newlines take the byte fallback), then a
    user-defined token and an unused one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    pieces = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in pieces if "\n" not in p]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    tokens += ["<|tool|>", "[PAD0]"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces) + [USER, UNUSED]
    return tokens, scores, types


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int]):
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm), written plainly: split off special and
    user-defined tokens; before each other stretch that starts the text or follows one of those,
    a space; spaces become ▁; then repeatedly merge the adjacent pair whose concatenation is the
    highest-scoring token (leftmost on ties); pieces that are not tokens become byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = sorted(
        (t for t, k in zip(tokens, types, strict=True) if k in (UNKNOWN, CONTROL, USER, UNUSED)),
        key=len,
        reverse=True,
    )
    ids, i, stretch, pieces = [], 0, "", []
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            stretch, i = stretch + text[i], i + 1
            continue
        pieces += [stretch] if stretch else []
        pieces.append((hit,))
        stretch, i = "", i + len(hit)
    pieces += [stretch] if stretch else []
    after_special = True
    for piece in pieces:
        if isinstance(piece, tuple):
            ids.append(vocab[piece[0]])
            after_special = True
            continue
        syms = list((" " * after_special + piece).replace(" ", "▁"))
        after_special = False
        while True:
            pairs = [
                (scores[vocab[a + b]], -j)
                for j, (a, b) in enumerate(zip(syms, syms[1:], strict=False))
                if a + b in vocab
            ]
            if not pairs:
                break
            j = -max(pairs)[1]
            syms[j : j + 2] = [syms[j] + syms[j + 1]]
        for sym in syms:
            ids += [vocab[sym]] if sym in vocab else [vocab[f"<0x{b:02X}>"] for b in sym.encode()]
    return ids


SPM_TEXTS = [
    "hello world, the latent cache",
    "experts are routed by a softmax gate",
    "café crème 🙂",  # é, è and the emoji are no piece: byte fallback
    "  a  b",
    " leading and trailing ",
    "User: hi\n\nAssistant:",
    "",
]


def _spm_meta(tokens, scores, types, **extra) -> dict:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        **extra,
    }


def test_spm_tokenizer_encodes_as_llama_cpp():
    tokens, scores, types = spm_vocab()
    tok = gguf_tokenizer.tokenizer_from_gguf(_spm_meta(tokens, scores, types))
    for text in SPM_TEXTS:
        ids = tok.encode(text).ids
        assert ids == llama_cpp_spm(text, tokens, scores, types), text
        assert tok.decode(ids) == text
    assert any(tokens[i] == "<0xC3>" for i in tok.encode("café").ids)  # byte fallback
    # special and user-defined tokens: never split, a ▁ after each as llama.cpp puts it
    text = "<s>User: hi<|tool|>x</s>"
    ids = tok.encode(text).ids
    assert ids == llama_cpp_spm(text, tokens, scores, types)
    assert ids[0] == 1 and ids[-1] == 2 and tokens.index("<|tool|>") in ids
    assert tok.decode(ids) == "User: hi<|tool|> x"  # specials left out of decoded text


def test_spm_unigram_vocab_takes_the_best_segmentation():
    """A vocabulary BPE cannot build (▁abc has no split into two tokens) is a SentencePiece
    unigram model: the segmentation with the highest total score, as SentencePiece gives."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0, "bc": -2.5, "▁abc": -3.0, "ca": -2.2}
    tokens += list(pieces)
    scores = [0.0] * 259 + list(pieces.values())
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    tok = gguf_tokenizer.tokenizer_from_gguf(_spm_meta(tokens, scores, types))
    ids = {text: [tokens[i] for i in tok.encode(text).ids] for text in ("abc", "cabc", "d abc")}
    assert ids == {
        "abc": ["▁abc"],  # -3 beats ▁ a bc (-5.5)
        "cabc": ["▁", "ca", "bc"],  # -5.7 beats ▁ c a bc (-7.5)
        "d abc": ["▁", "<0x64>", "▁abc"],
    }
    for text in ("abc", "cabc", "d abc"):
        assert tok.decode(tok.encode(text).ids) == text


def _tokenizer_gguf(path: Path, model: str | None, **keys) -> Path:
    """A GGUF with no tensors and only a tokenizer header (all write_tokenizer_files reads)."""
    w = gguf.GGUFWriter(str(path), "deepseek2")
    if model is not None:
        w.add_tokenizer_model(model)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_write_tokenizer_files_converts_spm(tmp_path):
    from tokenizers import Tokenizer

    tokens, scores, types = spm_vocab()
    path = _tokenizer_gguf(
        tmp_path / "spm.gguf",
        "llama",
        token_list=tokens,
        token_scores=scores,
        token_types=types,
        bos_token_id=1,
        eos_token_id=2,
    )
    out = tmp_path / "art"
    out.mkdir()
    lines = []
    assert gguf_tokenizer.write_tokenizer_files(path, out, log=lines.append)
    assert lines == []
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))  # what the runtime loads
    for text in SPM_TEXTS:
        assert tok.encode(text).ids == llama_cpp_spm(text, tokens, scores, types), text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg == {"bos_token": "<s>", "eos_token": "</s>"}


FIX = (
    "the artifact takes --prompt-ids only; put the model's tokenizer.json next to the .gguf to "
    "get text in/out"
)


def test_write_tokenizer_files_says_what_it_cannot_convert(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    bert = _tokenizer_gguf(tmp_path / "bert.gguf", "bert", token_list=["[UNK]", "a"])
    lines = []
    assert not gguf_tokenizer.write_tokenizer_files(bert, out, log=lines.append)
    assert lines == [f"note: bert.gguf: tokenizer model 'bert' is not supported: {FIX}"]
    assert not (out / "tokenizer.json").exists()
    # the default log prints the same line
    assert not gguf_tokenizer.write_tokenizer_files(bert, out)
    assert capsys.readouterr().out == lines[0] + "\n"
    bare = _tokenizer_gguf(tmp_path / "bare.gguf", None)
    assert not gguf_tokenizer.write_tokenizer_files(bare, out, log=lines.append)
    assert lines[1] == f"note: bare.gguf: the file has no vocabulary: {FIX}"
    # a malformed vocabulary (fewer scores than tokens) is reported, not raised
    broken = _tokenizer_gguf(
        tmp_path / "broken.gguf", "llama", token_list=["<unk>", "a", "b"], token_scores=[0.0]
    )
    assert not gguf_tokenizer.write_tokenizer_files(broken, out, log=lines.append)
    assert lines[2].startswith("note: broken.gguf: its 'llama' vocabulary could not be converted")
    assert lines[2].endswith(FIX) and len(lines) == 3
