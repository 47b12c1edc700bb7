"""GGUF import: DeepSeek-V2 files as llama.cpp / ik_llama.cpp write them (arch ``deepseek2``).

The result is the same config and state dict ``load_hf_state`` gives for the HF checkpoint the
GGUF was converted from: llama.cpp's converter keeps HF's interleaved rope rows (its ``deepseek2``
graph ropes adjacent pairs), so ``permute_rope_rows`` applies unchanged; ``attn_kv_b`` is taken
as is, or rebuilt from the split ``attn_k_b`` ([H, kv_lora, nope], transposed) / ``attn_v_b``
([H, v, kv_lora]) that newer converters write; stacked ``ffn_{gate,up,down}_exps`` become our
``experts_gate_up`` (gate rows first) and ``experts_down``.

Files without ``expert_group_count`` (older converters) route greedily over all experts, as
llama.cpp did before it read that key (full DeepSeek-V2 uses group-limited routing).

GGUF has no key for HF's YaRN ``mscale``: llama.cpp scales cos/sin by 1 and the logits by
``yarn_mscale(factor, mscale_all_dim)**2``, which is HF's model when ``mscale ==
mscale_all_dim`` (as in every DeepSeek-V2 release), so that is the config built here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mla_compiler.errors import ConfigError, WeightError
from mla_compiler.model_export.config import MLADims, ModelConfig, RopeConfig
from mla_compiler.model_export.modeling import DeepseekV2
from mla_compiler.model_export.weights import permute_rope_rows, torch_dtype

ARCH = "deepseek2"

# GGUF tensor name (without ".weight") -> our parameter name; {n} is the block index.
_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "blk.{n}.attn_norm": "layers.{n}.input_layernorm",
    "blk.{n}.attn_q": "layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_q_a": "layers.{n}.self_attn.q_a_proj",
    "blk.{n}.attn_q_a_norm": "layers.{n}.self_attn.q_a_layernorm",
    "blk.{n}.attn_q_b": "layers.{n}.self_attn.q_b_proj",
    "blk.{n}.attn_kv_a_mqa": "layers.{n}.self_attn.kv_a_proj_with_mqa",
    "blk.{n}.attn_kv_a_norm": "layers.{n}.self_attn.kv_a_layernorm",
    "blk.{n}.attn_kv_b": "layers.{n}.self_attn.kv_b_proj",
    "blk.{n}.attn_output": "layers.{n}.self_attn.o_proj",
    "blk.{n}.ffn_norm": "layers.{n}.post_attention_layernorm",
    "blk.{n}.ffn_gate": "layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_up": "layers.{n}.mlp.up_proj",
    "blk.{n}.ffn_down": "layers.{n}.mlp.down_proj",
    "blk.{n}.ffn_gate_inp": "layers.{n}.mlp.gate",
    "blk.{n}.ffn_gate_shexp": "layers.{n}.mlp.shared_experts.gate_proj",
    "blk.{n}.ffn_up_shexp": "layers.{n}.mlp.shared_experts.up_proj",
    "blk.{n}.ffn_down_shexp": "layers.{n}.mlp.shared_experts.down_proj",
}
# Combined into our tensors after the loop (several GGUF tensors make one of ours).
_PARTS = ("attn_k_b", "attn_v_b", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _open(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise WeightError("reading GGUF files needs the gguf package: `pip install gguf`") from None
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"GGUF file {path} does not exist: pass a .gguf file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        if m := re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e)):
            raise WeightError(
                f"{path}: not supported yet: tensor type id {m.group(1)} (a quant type gguf-py "
                "does not know, e.g. ik_llama.cpp's own): use an f32/f16/bf16/Q8_0 file"
            ) from None
        raise WeightError(f"{path} is not a readable GGUF file ({e}): re-download it") from None


def read_metadata(reader, *, arrays: bool = False) -> dict[str, Any]:
    """The key/values of a GGUF header as Python values; arrays (the vocabulary: 100k+ strings)
    only when asked for."""
    from gguf import GGUFValueType

    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if arrays or not field.types or field.types[0] != GGUFValueType.ARRAY
    }


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Each tensor's name -> its torch shape (GGUF lists dimensions fastest first)."""
    return {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}


def config_from_gguf(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, name: str = "gguf"
) -> ModelConfig:
    """Build a ``ModelConfig`` from the ``deepseek2.*`` metadata that llama.cpp's converter writes.

    Files from before llama.cpp split MLA (no ``attention.key_length_mla``) carry the per-head
    Q/K and V widths in ``attention.key_length`` / ``value_length``.
    """
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported: mla-compiler imports {ARCH!r} "
            "(DeepSeek-V2) files"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{ARCH}.{key}"
        if full not in meta:
            if required:
                raise ConfigError(f"GGUF metadata lacks {full}: the file is not a DeepSeek-V2 GGUF")
            return default
        value = meta[full]
        # GGUF floats are f32: their shortest repr gives back the decimal the converter wrote
        return float(str(np.float32(value))) if isinstance(value, float) else value

    rope_dim = int(get("rope.dimension_count", required=True))
    kv_lora = int(get("attention.kv_lora_rank", required=True))
    if f"{ARCH}.attention.key_length_mla" in meta:
        qk_head = int(get("attention.key_length_mla"))
        v_head = int(get("attention.value_length_mla", required=True))
    else:
        qk_head = int(get("attention.key_length", required=True))
        v_head = int(get("attention.value_length", required=True))
    gating = get("expert_gating_func")
    if gating not in (None, 1):  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ConfigError(
            f"expert_gating_func {gating} (sigmoid) is DeepSeek-V3 routing: not supported, "
            "mla-compiler runs DeepSeek-V2 (softmax) models"
        )
    theta = float(get("rope.freq_base", 10000.0))
    rope = RopeConfig(theta=theta)
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none", "yarn"):
        raise ConfigError(f"rope.scaling.type {scaling!r} is not supported: use 'yarn' or none")
    if scaling == "yarn":
        # the converter writes 0.1 * mscale_all_dim (llama.cpp's TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        mscale_all_dim = float(f"{get('rope.scaling.yarn_log_multiplier', 0.0) * 10:.6g}")
        rope = RopeConfig(
            theta=theta,
            kind="yarn",
            factor=float(get("rope.scaling.factor", required=True)),
            original_max_position=int(get("rope.scaling.original_context_length", required=True)),
            beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
            mscale=mscale_all_dim,
            mscale_all_dim=mscale_all_dim,
        )
    q_lora = get("attention.q_lora_rank")
    n_group = int(get("expert_group_count", 1) or 1)
    vocab = get("vocab_size") or shapes.get("token_embd.weight", (None,))[0]
    if vocab is None:
        raise ConfigError(f"GGUF lacks {ARCH}.vocab_size and token_embd: not a complete model")
    return ModelConfig(
        name=name,
        vocab_size=int(vocab),
        hidden_size=int(get("embedding_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        intermediate_size=int(get("feed_forward_length", required=True)),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0)),
        n_routed_experts=int(get("expert_count", 0)),
        n_shared_experts=int(get("expert_shared_count", 0)),
        num_experts_per_tok=int(get("expert_used_count", 0)),
        first_k_dense_replace=int(get("leading_dense_block_count", 0)),
        dims=MLADims(
            heads=int(get("attention.head_count", required=True)),
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=qk_head - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_head,
            q_lora_rank=int(q_lora) if q_lora else None,
        ),
        rope=rope,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        topk_method="group_limited_greedy" if n_group > 1 else "greedy",
        n_group=n_group,
        topk_group=int(get("expert_group_used_count", n_group) or n_group),
        norm_topk_prob=bool(get("expert_weights_norm", False)),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
        max_position_embeddings=int(get("context_length", 163840)),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    ).validate()


def _to_torch(t) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in its torch shape: f32/f16/bf16 exact, Q8_0 as f32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    kind = Q(t.tensor_type)
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data).reshape(shape))
    if kind == Q.BF16:
        raw = np.array(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    if kind == Q.Q8_0:
        return torch.from_numpy(dequantize(np.array(t.data), kind).reshape(shape))
    raise WeightError(
        f"{t.name}: GGUF tensor type not supported yet: {kind.name} (use an f32/f16/bf16/Q8_0 file)"
    )


def _ours(gguf_name: str) -> str | None:
    base = gguf_name.removesuffix(".weight")
    if base in _NAMES:
        return _NAMES[base] + ".weight"
    m = _BLOCK.match(gguf_name)
    if m and f"blk.{{n}}.{m.group(2)}" in _NAMES:
        return _NAMES[f"blk.{{n}}.{m.group(2)}"].format(n=m.group(1)) + ".weight"
    return None


def load_gguf_state(cfg: ModelConfig, reader) -> dict[str, torch.Tensor]:
    """The GGUF's tensors under our parameter names, exactly as ``load_hf_state`` lays them out."""
    d = cfg.dims
    state: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str], torch.Tensor] = {}
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m and m.group(2) in _PARTS:
            parts[(int(m.group(1)), m.group(2))] = _to_torch(t)
            continue
        if m and m.group(2) == "exp_probs_b":
            raise ConfigError(f"{t.name}: expert score bias is DeepSeek-V3 routing, not supported")
        ours = _ours(t.name)
        if ours is None:
            raise WeightError(
                f"GGUF tensor {t.name} is not a DeepSeek-V2 tensor mla-compiler knows"
            )
        state[ours] = permute_rope_rows(cfg, ours, _to_torch(t))
    for layer in sorted({n for n, _ in parts}):
        attn = f"layers.{layer}.self_attn.kv_b_proj.weight"
        k_b, v_b = parts.pop((layer, "attn_k_b"), None), parts.pop((layer, "attn_v_b"), None)
        if attn not in state and (k_b is not None or v_b is not None):
            if k_b is None or v_b is None:
                raise WeightError(
                    f"block {layer} has only one of attn_k_b / attn_v_b: file is incomplete"
                )
            # k_b [H, kv_lora, nope] (transposed by the converter), v_b [H, v, kv_lora]
            # -> kv_b [H, nope + v, kv_lora]
            want = {
                "k_b": (d.heads, d.kv_lora_rank, d.qk_nope_head_dim),
                "v_b": (d.heads, d.v_head_dim, d.kv_lora_rank),
            }
            for what, t in (("k_b", k_b), ("v_b", v_b)):
                if tuple(t.shape) != want[what]:
                    raise WeightError(
                        f"blk.{layer}.attn_{what} has shape {tuple(t.shape)}, metadata implies "
                        f"{want[what]}: the file is inconsistent"
                    )
            kv_b = torch.cat([k_b.transpose(1, 2), v_b.to(k_b.dtype)], dim=1)
            state[attn] = kv_b.reshape(d.heads * (d.qk_nope_head_dim + d.v_head_dim), -1)
        exps = [parts.pop((layer, f"ffn_{w}_exps"), None) for w in ("gate", "up", "down")]
        if any(e is not None for e in exps):
            if any(e is None for e in exps):
                raise WeightError(
                    f"block {layer} lacks one of ffn_gate/up/down_exps: file is incomplete"
                )
            gate, up, down = exps
            state[f"layers.{layer}.mlp.experts_gate_up"] = torch.cat(
                [gate, up.to(gate.dtype)], dim=1
            )
            state[f"layers.{layer}.mlp.experts_down"] = down
    if "lm_head.weight" not in state and cfg.tie_word_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    return state


def load_gguf_model(path: str | Path, *, dtype: str = "float32") -> tuple[ModelConfig, DeepseekV2]:
    """(config, our model with the GGUF's weights); missing, extra or mis-shaped tensors named."""
    reader = _open(path)
    cfg = config_from_gguf(read_metadata(reader), tensor_shapes(reader), name=Path(path).stem)
    state = load_gguf_state(cfg, reader)
    model = DeepseekV2(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has extra {', '.join(extra[:3])}"
        raise WeightError(f"GGUF {path} {what}: metadata and tensors disagree")
    with torch.no_grad():
        for name, p in expected.items():
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightError(
                    f"{name} has shape {tuple(t.shape)} in {path}, metadata implies "
                    f"{tuple(p.shape)}: the file is inconsistent"
                )
            p.copy_(t.to(torch.float32))
    return cfg, model.to(torch_dtype(dtype)).eval()


def load_gguf_config(path: str | Path) -> ModelConfig:
    reader = _open(path)
    return config_from_gguf(read_metadata(reader), tensor_shapes(reader), name=Path(path).stem)


# ---- tokenizer -----------------------------------------------------------------------------

# llama.cpp token types (tokenizer.ggml.token_type); control and unused ([PAD{i}]) tokens
# become special tokens: never split, and left out of decoded text as llama.cpp does.
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5


def tokenizer_from_gguf(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` arrays (``gpt2`` byte-level
    BPE, as DeepSeek-V2 files carry), or None for other vocab kinds.

    Decoding is exact. Encoding splits words with GPT-2's regex, not the ``deepseek-llm``
    pre-tokenizer llama.cpp selects from ``tokenizer.ggml.pre``: prompts of text in other
    scripts than Latin may split differently; put the model's ``tokenizer.json`` next to the
    .gguf file to get the exact tokenizer (``write_tokenizer_files`` prefers it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.tokens" not in meta:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _UNUSED)
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    return tok


def write_tokenizer_files(path: str | Path, out_dir: str | Path) -> bool:
    """Put ``tokenizer.json`` (+ ``tokenizer_config.json`` with the chat template) into
    ``out_dir``: the files next to the .gguf when there are any, else built from its vocabulary.
    False when the GGUF carries no usable vocabulary."""
    import json
    import shutil

    path, out_dir = Path(path), Path(out_dir)
    if (path.parent / "tokenizer.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (path.parent / name).exists():
                shutil.copy(path.parent / name, out_dir / name)
        return True
    meta = read_metadata(_open(path), arrays=True)
    tok = tokenizer_from_gguf(meta)
    if tok is None:
        return False
    tok.save(str(out_dir / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {"bos_token": token("bos"), "eos_token": token("eos")}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    return True
