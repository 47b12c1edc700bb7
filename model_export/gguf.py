"""GGUF import: DeepSeek-V2 files as llama.cpp / ik_llama.cpp write them (arch ``deepseek2``).

The result is the same config and state dict ``load_hf_state`` gives for the HF checkpoint the
GGUF was converted from: llama.cpp's converter keeps HF's interleaved rope rows (its ``deepseek2``
graph ropes adjacent pairs), so ``permute_rope_rows`` applies unchanged; ``attn_kv_b`` is taken
as is, or rebuilt from the split ``attn_k_b`` ([H, kv_lora, nope], transposed) / ``attn_v_b``
([H, v, kv_lora]) that newer converters write; stacked ``ffn_{gate,up,down}_exps`` become our
``experts_gate_up`` (gate rows first) and ``experts_down``. Tensors of the block formats a
kernel decodes can stay blocks (``load_gguf_weights(keep=...)``: ``QuantTensor``); the others are
decoded with gguf-py. The vocabulary: ``gguf_tokenizer``.

Files without ``expert_group_count`` (older converters) route greedily over all experts, as
llama.cpp did before it read that key (full DeepSeek-V2 uses group-limited routing).

GGUF has no key for HF's YaRN ``mscale``: llama.cpp scales cos/sin by 1 and the logits by
``yarn_mscale(factor, mscale_all_dim)**2``, which is HF's model when ``mscale ==
mscale_all_dim`` (as in every DeepSeek-V2 release), so that is the config built here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mla_compiler.errors import ConfigError, WeightError
from mla_compiler.model_export.config import (
    BOOL,
    COUNT,
    EVEN,
    FACTOR,
    NEEDED,
    NUMBER_GE0,
    NUMBER_GT0,
    POSITIVE,
    STRING,
    THETA,
    MLADims,
    ModelConfig,
    RopeConfig,
    Spec,
    read_values,
)
from mla_compiler.model_export.modeling import DeepseekV2, rope_tables
from mla_compiler.model_export.quantize import QuantTensor
from mla_compiler.model_export.weights import expected_shapes, permute_rope_rows, torch_dtype

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
                f"does not know, e.g. ik_llama.cpp's own): use a file of {SUPPORTED} tensors"
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


# deepseek2.<key> -> (what it must be, value when absent; NEEDED: must be present). GGUF has no
# null: absent keys take llama.cpp's defaults.
_GGUF_FIELDS: dict[str, tuple[Spec, Any]] = {
    "block_count": (POSITIVE, NEEDED),
    "embedding_length": (POSITIVE, NEEDED),
    "feed_forward_length": (POSITIVE, NEEDED),
    "attention.head_count": (POSITIVE, NEEDED),
    "attention.kv_lora_rank": (POSITIVE, NEEDED),
    "rope.dimension_count": (EVEN, NEEDED),
    "attention.key_length_mla": (POSITIVE, None),
    "attention.value_length_mla": (POSITIVE, None),
    "attention.key_length": (POSITIVE, None),
    "attention.value_length": (POSITIVE, None),
    "attention.q_lora_rank": (COUNT, 0),  # 0: q_proj is one dense matrix
    "vocab_size": (POSITIVE, None),  # absent: token_embd's rows
    "context_length": (POSITIVE, 163840),
    "attention.layer_norm_rms_epsilon": (NUMBER_GT0, 1e-6),
    "expert_feed_forward_length": (COUNT, 0),
    "expert_count": (COUNT, 0),
    "expert_shared_count": (COUNT, 0),
    "expert_used_count": (COUNT, 0),
    "leading_dense_block_count": (COUNT, 0),
    "expert_group_count": (COUNT, 0),  # 0 or 1: no groups
    "expert_group_used_count": (COUNT, 0),  # 0: expert_group_count
    "expert_gating_func": (COUNT, None),
    "expert_weights_norm": (BOOL, False),
    "expert_weights_scale": (NUMBER_GT0, 1.0),
    "rope.freq_base": (THETA, 10000.0),
    "rope.scaling.type": (STRING, None),
    "rope.scaling.factor": (FACTOR, None),  # needed for yarn
    "rope.scaling.original_context_length": (POSITIVE, None),  # needed for yarn
    "rope.scaling.yarn_beta_fast": (NUMBER_GT0, 32.0),
    "rope.scaling.yarn_beta_slow": (NUMBER_GT0, 1.0),
    "rope.scaling.yarn_log_multiplier": (NUMBER_GE0, 0.0),
}
_GGUF_TOKEN_IDS: dict[str, tuple[Spec, Any]] = {
    "bos_token_id": (COUNT, None),
    "eos_token_id": (COUNT, None),
}
# ModelConfig field -> the GGUF key it comes from (for the messages of ``ModelConfig.validate``).
_GGUF_NAMES = {
    "vocab_size": f"{ARCH}.vocab_size",
    "hidden_size": f"{ARCH}.embedding_length",
    "num_hidden_layers": f"{ARCH}.block_count",
    "intermediate_size": f"{ARCH}.feed_forward_length",
    "moe_intermediate_size": f"{ARCH}.expert_feed_forward_length",
    "n_routed_experts": f"{ARCH}.expert_count",
    "n_shared_experts": f"{ARCH}.expert_shared_count",
    "num_experts_per_tok": f"{ARCH}.expert_used_count",
    "first_k_dense_replace": f"{ARCH}.leading_dense_block_count",
    "n_group": f"{ARCH}.expert_group_count",
    "topk_group": f"{ARCH}.expert_group_used_count",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "dims.heads": f"{ARCH}.attention.head_count",
    "dims.kv_lora_rank": f"{ARCH}.attention.kv_lora_rank",
    "dims.qk_rope_head_dim": f"{ARCH}.rope.dimension_count",
}
_NOT_DEEPSEEK2 = "the file is not a DeepSeek-V2 GGUF"


def config_from_gguf(
    meta: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    *,
    name: str = "gguf",
    where: str = "GGUF metadata",
) -> ModelConfig:
    """Build a ``ModelConfig`` from the ``deepseek2.*`` metadata that llama.cpp's converter writes.

    Files from before llama.cpp split MLA (no ``attention.key_length_mla``) carry the per-head
    Q/K and V widths in ``attention.key_length`` / ``value_length``. Every key read is checked
    for type and range (``_GGUF_FIELDS``); ``where`` (the file's name) starts each message.
    """
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported: mla-compiler imports {ARCH!r} "
            "(DeepSeek-V2) files"
        )

    def under(prefix: str) -> dict[str, Any]:
        # GGUF floats are f32: their shortest repr gives back the decimal the converter wrote
        return {
            k.removeprefix(prefix): float(str(np.float32(x))) if isinstance(x, float) else x
            for k, x in meta.items()
            if k.startswith(prefix)
        }

    v = read_values(
        where, under(f"{ARCH}."), _GGUF_FIELDS, prefix=f"{ARCH}.", if_missing=_NOT_DEEPSEEK2
    )
    ids = read_values(where, under("tokenizer.ggml."), _GGUF_TOKEN_IDS, prefix="tokenizer.ggml.")

    def need(key: str) -> Any:
        if v[key] is None:
            raise ConfigError(f"{where} lacks {ARCH}.{key}: {_NOT_DEEPSEEK2}")
        return v[key]

    rope_dim = v["rope.dimension_count"]
    mla = "_mla" if f"{ARCH}.attention.key_length_mla" in meta else ""
    qk_head, v_head = need(f"attention.key_length{mla}"), need(f"attention.value_length{mla}")
    if qk_head <= rope_dim:
        raise ConfigError(
            f"{where}: {ARCH}.attention.key_length{mla} must be greater than "
            f"{ARCH}.rope.dimension_count ({rope_dim}), got {qk_head}: {_NOT_DEEPSEEK2}"
        )
    gating = v["expert_gating_func"]
    if gating not in (None, 1):  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ConfigError(
            f"{where}: {ARCH}.expert_gating_func {gating} is not softmax (1): sigmoid (2) is "
            "DeepSeek-V3 routing, not supported; mla-compiler runs DeepSeek-V2 (softmax) models"
        )
    theta = v["rope.freq_base"]
    rope = RopeConfig(theta=theta)
    scaling = v["rope.scaling.type"]
    if scaling not in (None, "none", "yarn"):
        raise ConfigError(
            f"{where}: {ARCH}.rope.scaling.type {scaling!r} is not supported: use 'yarn' or none"
        )
    if scaling == "yarn":
        # the converter writes 0.1 * mscale_all_dim (llama.cpp's TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        mscale_all_dim = float(f"{v['rope.scaling.yarn_log_multiplier'] * 10:.6g}")
        rope = RopeConfig(
            theta=theta,
            kind="yarn",
            factor=need("rope.scaling.factor"),
            original_max_position=need("rope.scaling.original_context_length"),
            beta_fast=v["rope.scaling.yarn_beta_fast"],
            beta_slow=v["rope.scaling.yarn_beta_slow"],
            mscale=mscale_all_dim,
            mscale_all_dim=mscale_all_dim,
        )
    n_group = v["expert_group_count"] or 1
    vocab = v["vocab_size"] or shapes.get("token_embd.weight", (None,))[0]
    if vocab is None:
        raise ConfigError(f"{where} lacks {ARCH}.vocab_size and token_embd: not a complete model")
    return ModelConfig(
        name=name,
        vocab_size=int(vocab),
        hidden_size=v["embedding_length"],
        num_hidden_layers=v["block_count"],
        intermediate_size=v["feed_forward_length"],
        moe_intermediate_size=v["expert_feed_forward_length"],
        n_routed_experts=v["expert_count"],
        n_shared_experts=v["expert_shared_count"],
        num_experts_per_tok=v["expert_used_count"],
        first_k_dense_replace=v["leading_dense_block_count"],
        dims=MLADims(
            heads=v["attention.head_count"],
            kv_lora_rank=v["attention.kv_lora_rank"],
            qk_nope_head_dim=qk_head - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_head,
            q_lora_rank=v["attention.q_lora_rank"] or None,
        ),
        rope=rope,
        rms_norm_eps=v["attention.layer_norm_rms_epsilon"],
        topk_method="group_limited_greedy" if n_group > 1 else "greedy",
        n_group=n_group,
        topk_group=v["expert_group_used_count"] or n_group,
        norm_topk_prob=v["expert_weights_norm"],
        routed_scaling_factor=v["expert_weights_scale"],
        max_position_embeddings=v["context_length"],
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
    ).validate(where, _GGUF_NAMES)


# the block formats read from GGUF files (each one gguf-py's ``dequantize`` decodes)
QUANT_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
SUPPORTED = "f32/f16/bf16/" + "/".join(QUANT_TYPES)


def _to_torch(t) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in its torch shape: f32/f16/bf16 exact, the block
    formats of ``QUANT_TYPES`` dequantized to f32 (bit-exact with gguf-py)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    kind = Q(t.tensor_type)
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data).reshape(shape))
    if kind == Q.BF16:
        raw = np.array(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    if kind.name not in QUANT_TYPES:
        raise WeightError(
            f"{t.name}: GGUF tensor type not supported yet: {kind.name} (supported: {SUPPORTED})"
        )
    try:
        values = dequantize(np.array(t.data), kind).reshape(shape)
    except ValueError:
        raise WeightError(
            f"{t.name}: its {kind.name} blocks do not make its shape {shape}: the file is "
            "truncated or corrupt (re-download it)"
        ) from None
    return torch.from_numpy(values)


def _to_value(t, keep: Collection[str]):
    """A GGUF tensor as a ``QuantTensor`` where its type is in ``keep`` (block formats kept as
    stored), else as ``_to_torch`` gives it."""
    from gguf import GGMLQuantizationType as Q

    kind = Q(t.tensor_type).name.lower()
    if kind not in keep:
        return _to_torch(t)
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        return QuantTensor(np.array(t.data, dtype=np.uint8), kind, shape)
    except WeightError:
        raise WeightError(
            f"{t.name}: its {kind.upper()} blocks do not make its shape {shape}: the file is "
            "truncated or corrupt (re-download it)"
        ) from None


def _values(v) -> torch.Tensor:
    """A loaded tensor's values (a kept ``QuantTensor`` decoded to f32)."""
    return torch.from_numpy(v.dequantize()) if isinstance(v, QuantTensor) else v


def _permute_rows(cfg: ModelConfig, name: str, v):
    """``permute_rope_rows`` for values or kept blocks (rows are whole blocks: a permutation of
    rows permutes their blocks)."""
    if not isinstance(v, QuantTensor):
        return permute_rope_rows(cfg, name, v)
    index = torch.arange(v.shape[0]).view(-1, 1).float()
    order = permute_rope_rows(cfg, name, index).view(-1).long().numpy()
    return QuantTensor(np.ascontiguousarray(v.data[order]), v.qtype, v.shape)


_OURS_TO_GGUF = {ours: gguf for gguf, ours in _NAMES.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+?)(\.weight)?$")
_EXPERTS = {"mlp.experts_gate_up": "ffn_gate_exps", "mlp.experts_down": "ffn_down_exps"}


def gguf_tensor_name(ours: str) -> str:
    """The GGUF name of our parameter (stacked gate+up experts: ``ffn_gate_exps``, the name
    llama.cpp's type rules see for both halves)."""
    m = _LAYER.match(ours)
    if m is None:
        return _OURS_TO_GGUF[ours.removesuffix(".weight")] + ".weight"
    if m.group(2) in _EXPERTS:
        return f"blk.{m.group(1)}.{_EXPERTS[m.group(2)]}.weight"
    return _OURS_TO_GGUF[f"layers.{{n}}.{m.group(2)}"].format(n=m.group(1)) + ".weight"


def _ours(gguf_name: str) -> str | None:
    base = gguf_name.removesuffix(".weight")
    if base in _NAMES:
        return _NAMES[base] + ".weight"
    m = _BLOCK.match(gguf_name)
    if m and f"blk.{{n}}.{m.group(2)}" in _NAMES:
        return _NAMES[f"blk.{{n}}.{m.group(2)}"].format(n=m.group(1)) + ".weight"
    return None


def _check_shapes(cfg: ModelConfig, reader) -> dict[str, tuple[int, ...]]:
    """Every tensor the metadata implies has the shape it implies, checked before any
    conversion (dequantization, rope permutation, k_b/v_b and expert merging): the first
    mismatch in our parameter order is named with both shapes."""
    d, want = cfg.dims, expected_shapes(cfg)
    order = {name: i for i, name in enumerate(want)}
    found = []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        part = m.group(2) if m and m.group(2) in _PARTS else None
        if part is None:
            ours = _ours(t.name)
            shape = want.get(ours)
        elif part in ("attn_k_b", "attn_v_b"):
            ours = f"layers.{m.group(1)}.self_attn.kv_b_proj.weight"
            shape = (
                (d.heads, d.kv_lora_rank, d.qk_nope_head_dim)  # transposed by the converter
                if part == "attn_k_b"
                else (d.heads, d.v_head_dim, d.kv_lora_rank)
            )
        else:
            which = "down" if part == "ffn_down_exps" else "gate_up"
            ours = f"layers.{m.group(1)}.mlp.experts_{which}"
            shape = want.get(ours)
            if shape is not None and part != "ffn_down_exps":
                shape = (shape[0], shape[1] // 2, shape[2])  # gate and up: one half each
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if ours in want and shape is not None and got != shape:
            found.append((order[ours], t.name, got, shape))
    if found:
        _, name, got, shape = min(found)
        raise WeightError(
            f"{name} has shape {got}, metadata implies {shape}: the file is inconsistent "
            "(re-convert it)"
        )
    return want


def load_gguf_state(cfg: ModelConfig, reader, *, keep: Collection[str] = ()) -> dict:
    """The GGUF's tensors under our parameter names, exactly as ``load_hf_state`` lays them out.
    Tensors of a type in ``keep`` (block formats: "q4_k", ...) stay ``QuantTensor`` blocks
    where our tensor is theirs up to a row order or stacking (kv_b from k_b / v_b and mixed
    expert halves are decoded)."""
    d = cfg.dims
    want = _check_shapes(cfg, reader)
    state: dict = {}
    parts: dict = {}
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m and m.group(2) in _PARTS:
            parts[(int(m.group(1)), m.group(2))] = _to_value(t, keep)
            continue
        if m and m.group(2) == "exp_probs_b":
            raise ConfigError(f"{t.name}: expert score bias is DeepSeek-V3 routing, not supported")
        ours = _ours(t.name)
        if ours is None:
            raise WeightError(
                f"GGUF tensor {t.name} is not a DeepSeek-V2 tensor mla-compiler knows"
            )
        # tensors the metadata does not imply stay as they are: load_gguf_model names them
        value = _to_value(t, keep)
        state[ours] = _permute_rows(cfg, ours, value) if ours in want else value
    for layer in sorted({n for n, _ in parts}):
        attn = f"layers.{layer}.self_attn.kv_b_proj.weight"
        k_b, v_b = parts.pop((layer, "attn_k_b"), None), parts.pop((layer, "attn_v_b"), None)
        if attn not in state and (k_b is not None or v_b is not None):
            if k_b is None or v_b is None:
                raise WeightError(
                    f"block {layer} has only one of attn_k_b / attn_v_b: file is incomplete"
                )
            # k_b [H, kv_lora, nope] (transposed by the converter), v_b [H, v, kv_lora]
            # (shapes checked by _check_shapes) -> kv_b [H, nope + v, kv_lora]
            k_b, v_b = _values(k_b), _values(v_b)
            kv_b = torch.cat([k_b.transpose(1, 2), v_b.to(k_b.dtype)], dim=1)
            state[attn] = kv_b.reshape(d.heads * (d.qk_nope_head_dim + d.v_head_dim), -1)
        exps = [parts.pop((layer, f"ffn_{w}_exps"), None) for w in ("gate", "up", "down")]
        if any(e is not None for e in exps):
            if any(e is None for e in exps):
                raise WeightError(
                    f"block {layer} lacks one of ffn_gate/up/down_exps: file is incomplete"
                )
            if f"layers.{layer}.mlp.experts_gate_up" not in want:
                raise WeightError(
                    f"block {layer} has routed experts but the metadata makes it a dense layer "
                    f"({ARCH}.expert_count={cfg.n_routed_experts}, leading_dense_block_count="
                    f"{cfg.first_k_dense_replace}): the file is inconsistent (re-convert it)"
                )
            gate, up, down = exps
            state[f"layers.{layer}.mlp.experts_gate_up"] = _stack_halves(gate, up)
            state[f"layers.{layer}.mlp.experts_down"] = down
    if "lm_head.weight" not in state and cfg.tie_word_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    return state


def _stack_halves(gate, up):
    """Experts' gate [E, I, D] and up rows into gate_up [E, 2I, D]: blocks where both halves
    are kept in one format, values otherwise."""
    if isinstance(gate, QuantTensor) and isinstance(up, QuantTensor) and gate.qtype == up.qtype:
        data = np.concatenate([gate.data, up.data], axis=1)
        return QuantTensor(data, gate.qtype, (gate.shape[0], 2 * gate.shape[1], gate.shape[2]))
    gate, up = _values(gate), _values(up)
    return torch.cat([gate, up.to(gate.dtype)], dim=1)


def load_gguf_model(path: str | Path, *, dtype: str = "float32") -> tuple[ModelConfig, DeepseekV2]:
    """(config, our model with the GGUF's weights); missing, extra or mis-shaped tensors named."""
    cfg, model, kept = load_gguf_weights(path, dtype=dtype)
    return cfg, model


def load_gguf_weights(
    path: str | Path, *, dtype: str = "float32", keep: Collection[str] = ()
) -> tuple[ModelConfig, DeepseekV2, dict[str, QuantTensor]]:
    """(config, our model, the weights kept in their block formats): tensors of a type in
    ``keep`` are ``QuantTensor`` blocks (their parameters left on 'meta'), the others values in
    ``dtype``. Missing, extra or mis-shaped tensors are named."""
    reader = _open(path)
    cfg = load_gguf_config(path, reader)
    state = load_gguf_state(cfg, reader, keep=keep)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has extra {', '.join(extra[:3])}"
        raise WeightError(f"GGUF {path} {what}: metadata and tensors disagree")
    kept = {}
    for name, p in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(p.shape):
            raise WeightError(
                f"{name} has shape {tuple(t.shape)} in {path}, metadata implies "
                f"{tuple(p.shape)}: the file is inconsistent"
            )
        if isinstance(t, QuantTensor):
            kept[name] = t
            continue
        module, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module) if module else model
        value = t.to(torch.float32).to(torch_dtype(dtype))
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    if not kept:  # every parameter real: the model runs (a buffer made on 'meta' is not)
        model.inv_freq = rope_tables(cfg)[0]
    return cfg, model.eval(), kept


def load_gguf_config(path: str | Path, reader=None) -> ModelConfig:
    reader = _open(path) if reader is None else reader
    path = Path(path)
    return config_from_gguf(
        read_metadata(reader), tensor_shapes(reader), name=path.stem, where=path.name
    )
