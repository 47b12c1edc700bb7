"""Model configuration of the DeepSeek-V2 family, read from a HuggingFace ``config.json``.

``MLADims`` is the single source of the attention dimensions: the exporter, the Relax passes, the
kernels, the schedules, the runtime and the tests all take it instead of loose integers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mla_compiler.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MLADims:
    """Multi-head latent attention dimensions of a model; every field required (a model's own
    dims, never a default: ``preset("deepseek-v2-lite").dims`` for V2-Lite)."""

    heads: int
    kv_lora_rank: int  # compressed KV width: the latent row and V of absorbed attention
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None  # None: q_proj is one dense matrix (V2-Lite)

    @property
    def latent_dim(self) -> int:
        """Width of one cache row: ``kv_lora_rank + qk_rope_head_dim`` (576 for V2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        """Per-head Q/K width of decompressed attention (192 for V2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def cache_bytes_per_token(self, layers: int, *, mla: int, itemsize: int = 2) -> int:
        """Bytes of KV cache one token takes over ``layers`` layers in MLA mode ``mla``."""
        if mla_mode(mla).latent_cache:
            return layers * self.latent_dim * itemsize
        return layers * self.heads * (self.qk_head_dim + self.v_head_dim) * itemsize


@dataclasses.dataclass(frozen=True)
class MLAMode:
    """One ``--mla`` mode: the attention form of prompt chunks and of decode steps (see
    ``passes.rewrite_mla_attention``) and whether the cache holds latent rows (576 per token
    and layer) or decompressed per-head K and V. ``deep_prefill_form``: the form of prompt
    chunks whose KV length passes ``--deep-prefill-from`` (None: ``prefill_form`` throughout):
    mla 3's decompression materialises K/V of the whole context, so deep chunks attend over the
    latent rows instead and the workspace stops growing with the context."""

    number: int
    prefill_form: str
    decode_form: str
    latent_cache: bool
    deep_prefill_form: str | None = None


MLA_MODES = {
    0: MLAMode(0, "decompressed_cache", "decompressed_cache", latent_cache=False),
    2: MLAMode(2, "absorbed", "absorbed", latent_cache=True),
    3: MLAMode(3, "decompress", "absorbed", latent_cache=True, deep_prefill_form="absorbed"),
}


def mla_mode(number: int) -> MLAMode:
    if number not in MLA_MODES:
        raise ConfigError(
            f"unknown --mla {number}: use 0 (decompressed), 2 (absorbed) or 3 (phase-aware)"
        )
    return MLA_MODES[number]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``kind`` is "default" or "yarn"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V2-family model; field names follow HF ``config.json`` where they exist."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense MLP of the first ``first_k_dense_replace`` layers
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    dims: MLADims
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-6
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: 1/sqrt(qk_head_dim), times YaRN's mscale_all_dim squared."""
        scale = self.dims.qk_head_dim**-0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["dims"] = MLADims(**d["dims"])
        d["rope"] = RopeConfig(**d["rope"])
        return cls(**d)

    def validate(self, where: str = "config", names: dict[str, str] | None = None) -> ModelConfig:
        """Check every field's type and range (``FIELD_SPECS``), then the ranges that depend on
        other fields. ``where`` starts each message; ``names`` maps a field (``dims.heads``) to
        the key it was read from, for messages in the source's own terms."""
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, field)

        for field, spec in FIELD_SPECS.items():
            value = self
            for part in field.split("."):
                value = getattr(value, part)
            check_value(where, name(field), value, spec)
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{where}: {name('topk_method')} {self.topk_method!r} is not supported: use "
                "'greedy' or 'group_limited_greedy' (DeepSeek-V2); 'noaux_tc' is DeepSeek-V3"
            )

        def within(field: str, lo: int, hi: int, hi_text: str) -> None:
            value = getattr(self, field)
            if value is not None and not lo <= value <= hi:
                raise ConfigError(
                    f"{where}: {name(field)} must be an integer in {lo}..{hi_text} ({hi}), "
                    f"got {value}"
                )

        layers = self.num_hidden_layers
        within("first_k_dense_replace", 0, layers, name("num_hidden_layers"))
        for field in ("bos_token_id", "eos_token_id"):
            within(field, 0, self.vocab_size - 1, f"{name('vocab_size')} - 1")
        if self.n_routed_experts and self.first_k_dense_replace < layers:  # some MoE layers
            experts = name("n_routed_experts")
            within("num_experts_per_tok", 1, self.n_routed_experts, experts)
            if self.moe_intermediate_size < 1:
                raise ConfigError(
                    f"{where}: {name('moe_intermediate_size')} must be a positive integer when "
                    f"{experts} > 0, got {self.moe_intermediate_size}"
                )
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"{where}: {name('n_group')} must divide {experts} "
                    f"({self.n_routed_experts}), got {self.n_group}"
                )
            within("topk_group", 1, self.n_group, name("n_group"))
            if self.topk_method == "group_limited_greedy":
                per_group = self.n_routed_experts // self.n_group
                within(
                    "num_experts_per_tok",
                    1,
                    self.topk_group * per_group,
                    f"{name('topk_group')} * {experts} / {name('n_group')}",
                )
        return self


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- value checks --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config value must be: its type (``int``: a JSON integer, or a float without a
    fraction, never a bool; ``float``: any finite number; ``bool``; ``str``; ``dict``), a range
    test on the converted value, the words for both, and whether null is allowed."""

    kind: type
    text: str
    ok: Callable[[Any], bool] = lambda _: True
    null: bool = False

    @property
    def or_null(self) -> Spec:
        return dataclasses.replace(self, null=True, text=f"{self.text} or null")


POSITIVE = Spec(int, "a positive integer", lambda v: v > 0)
COUNT = Spec(int, "an integer >= 0", lambda v: v >= 0)
EVEN = Spec(int, "a positive even integer", lambda v: v > 0 and v % 2 == 0)
NUMBER_GT0 = Spec(float, "a number > 0", lambda v: v > 0)
NUMBER_GE0 = Spec(float, "a number >= 0", lambda v: v >= 0)
THETA = Spec(float, "a number > 1", lambda v: v > 1)
FACTOR = Spec(float, "a number >= 1", lambda v: v >= 1)
BOOL = Spec(bool, "true or false")
STRING = Spec(str, "a string")
OBJECT = Spec(dict, "an object")
_EOS = Spec(int, "an integer >= 0, a list of them, or null", lambda v: v >= 0, null=True)


def _show(value: Any) -> str:
    """A value as the message quotes it: strings in quotes, the rest as JSON writes it."""
    if isinstance(value, str):
        return repr(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_value(where: str, key: str, value: Any, spec: Spec) -> Any:
    """``value`` converted to ``spec.kind``, or a ``ConfigError`` naming ``key``, the value and
    what it must be, e.g. ``config.json: num_hidden_layers must be a positive integer, got
    'three'``."""
    got = value
    if value is None:
        if spec.null:
            return None
        good = False
    elif spec.kind is int:
        good = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value, good = int(value), True
    elif spec.kind is float:
        good = isinstance(value, int | float) and not isinstance(value, bool)
        good = good and math.isfinite(value)
        value = float(value) if good else value
    else:
        good = isinstance(value, spec.kind)
    if not good or not spec.ok(value):
        raise ConfigError(f"{where}: {key} must be {spec.text}, got {_show(got)}")
    return value


NEEDED = object()  # default of a key that must be present


def read_values(
    where: str,
    src: dict[str, Any],
    table: dict[str, tuple[Spec, Any]],
    *,
    prefix: str = "",
    if_missing: str = "add it",
) -> dict[str, Any]:
    """Each key of ``table`` (key -> (spec, default)) read from ``src`` and checked: absent (or
    null where the spec allows it) gives the default; absent where the default is ``NEEDED``
    is an error that ends with ``if_missing``."""
    out = {}
    for key, (spec, default) in table.items():
        if key not in src:
            if default is NEEDED:
                raise ConfigError(f"{where} lacks {prefix}{key}: {if_missing}")
            out[key] = default
            continue
        value = check_value(where, prefix + key, src[key], spec)
        out[key] = default if value is None else value
    return out


# Field of ModelConfig (``dims.x`` / ``rope.x`` for the nested ones) -> what it must be.
FIELD_SPECS: dict[str, Spec] = {
    "name": STRING,
    "vocab_size": POSITIVE,
    "hidden_size": POSITIVE,
    "num_hidden_layers": POSITIVE,
    "intermediate_size": POSITIVE,
    "moe_intermediate_size": COUNT,
    "n_routed_experts": COUNT,
    "n_shared_experts": COUNT,
    "num_experts_per_tok": COUNT,
    "first_k_dense_replace": COUNT,
    "dims.heads": POSITIVE,
    "dims.kv_lora_rank": POSITIVE,
    "dims.qk_nope_head_dim": POSITIVE,
    "dims.qk_rope_head_dim": EVEN,
    "dims.v_head_dim": POSITIVE,
    "dims.q_lora_rank": POSITIVE.or_null,
    "rope.theta": THETA,
    "rope.kind": STRING,
    "rope.factor": FACTOR,
    "rope.original_max_position": POSITIVE,
    "rope.beta_fast": NUMBER_GT0,
    "rope.beta_slow": NUMBER_GT0,
    "rope.mscale": NUMBER_GE0,
    "rope.mscale_all_dim": NUMBER_GE0,
    "rms_norm_eps": NUMBER_GT0,
    "topk_method": STRING,
    "n_group": POSITIVE,
    "topk_group": POSITIVE,
    "norm_topk_prob": BOOL,
    "routed_scaling_factor": NUMBER_GT0,
    "max_position_embeddings": POSITIVE,
    "tie_word_embeddings": BOOL,
    "bos_token_id": COUNT.or_null,
    "eos_token_id": COUNT.or_null,
}

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
)

# HF config.json key -> (what it must be, value when absent or null). Null is allowed where
# transformers' DeepseekV2Config allows it (q_lora_rank: no q LoRA; n_group/topk_group: 1).
_HF_FIELDS: dict[str, tuple[Spec, Any]] = {
    "model_type": (STRING.or_null, None),
    "vocab_size": (POSITIVE, NEEDED),
    "hidden_size": (POSITIVE, NEEDED),
    "num_hidden_layers": (POSITIVE, NEEDED),
    "num_attention_heads": (POSITIVE, NEEDED),
    "num_key_value_heads": (POSITIVE.or_null, None),
    "kv_lora_rank": (POSITIVE, NEEDED),
    "q_lora_rank": (POSITIVE.or_null, None),
    "qk_nope_head_dim": (POSITIVE, NEEDED),
    "qk_rope_head_dim": (EVEN, NEEDED),
    "v_head_dim": (POSITIVE, NEEDED),
    "intermediate_size": (POSITIVE, NEEDED),
    "moe_intermediate_size": (COUNT.or_null, 0),
    "n_routed_experts": (COUNT.or_null, 0),
    "n_shared_experts": (COUNT.or_null, 0),
    "num_experts_per_tok": (COUNT.or_null, 0),
    "first_k_dense_replace": (COUNT.or_null, 0),
    "topk_method": (STRING.or_null, "greedy"),
    "n_group": (POSITIVE.or_null, 1),
    "topk_group": (POSITIVE.or_null, 1),
    "norm_topk_prob": (BOOL.or_null, False),
    "routed_scaling_factor": (NUMBER_GT0, 1.0),
    "rms_norm_eps": (NUMBER_GT0, 1e-6),
    "max_position_embeddings": (POSITIVE, 163840),
    "tie_word_embeddings": (BOOL.or_null, False),
    "bos_token_id": (COUNT.or_null, None),
    "attention_bias": (BOOL.or_null, False),
    "mlp_bias": (BOOL.or_null, False),
    "hidden_act": (STRING, "silu"),
    "rope_theta": (THETA, 10000.0),
    "rope_scaling": (OBJECT.or_null, None),
    "rope_parameters": (OBJECT.or_null, None),
}
# Keys of the rope_scaling / rope_parameters object. 0 or null betas and mscales take the
# defaults, as in transformers' YaRN (``get("beta_fast") or 32``).
_HF_ROPE_FIELDS: dict[str, tuple[Spec, Any]] = {
    "rope_theta": (THETA, None),
    "rope_type": (STRING.or_null, None),
    "type": (STRING.or_null, None),
}
_HF_YARN_FIELDS: dict[str, tuple[Spec, Any]] = {
    "factor": (FACTOR, NEEDED),
    "original_max_position_embeddings": (POSITIVE, NEEDED),
    "beta_fast": (NUMBER_GE0.or_null, 32.0),
    "beta_slow": (NUMBER_GE0.or_null, 1.0),
    "mscale": (NUMBER_GE0.or_null, 1.0),
    "mscale_all_dim": (NUMBER_GE0.or_null, 0.0),
}


# ModelConfig field -> config.json key, where they differ (for messages of ``validate``).
_HF_NAMES = {
    "dims.heads": "num_attention_heads",
    "dims.kv_lora_rank": "kv_lora_rank",
    "dims.qk_nope_head_dim": "qk_nope_head_dim",
    "dims.qk_rope_head_dim": "qk_rope_head_dim",
    "dims.v_head_dim": "v_head_dim",
    "dims.q_lora_rank": "q_lora_rank",
}


def config_from_hf(
    hf: dict[str, Any], *, name: str = "hf", where: str = "config.json"
) -> ModelConfig:
    """Build a ``ModelConfig`` from the dict of a HF DeepSeek-V2 ``config.json``.

    Accepts both the ``rope_scaling`` + ``rope_theta`` keys of the original checkpoints and the
    ``rope_parameters`` key that transformers >= 5 writes. Every key read is checked for type and
    range (``_HF_FIELDS``): one ``ConfigError`` names the key, its value and what it must be.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(hf).__name__}: fix it")
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v2", None):
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported: mla-compiler compiles "
            "'deepseek_v2' models"
        )
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)}: a DeepSeek-V2 config needs all of "
            + ", ".join(_REQUIRED)
        )
    v = read_values(where, hf, _HF_FIELDS)
    heads = v["num_attention_heads"]
    n_kv = v["num_key_value_heads"] or heads
    if n_kv != heads:
        raise ConfigError(
            f"{where}: num_key_value_heads={n_kv} != num_attention_heads={heads}: "
            "MLA models have one KV head per query head before absorption"
        )
    if v["attention_bias"] or v["mlp_bias"]:
        raise ConfigError(
            f"{where}: attention_bias/mlp_bias are not supported: set them to false "
            "(DeepSeek-V2 has no biases)"
        )
    if v["hidden_act"] != "silu":
        raise ConfigError(f"{where}: hidden_act {v['hidden_act']!r} is not supported: use 'silu'")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # transformers allows several; the first ends generation here
        eos = [check_value(where, f"eos_token_id[{i}]", e, COUNT) for i, e in enumerate(eos)]
        eos = eos[0] if eos else None
    else:
        eos = check_value(where, "eos_token_id", eos, _EOS)

    rope_key = "rope_scaling" if v["rope_scaling"] else "rope_parameters"
    rope_params = v["rope_parameters"] or {}
    scaling = v["rope_scaling"] or rope_params
    rp = read_values(where, rope_params, _HF_ROPE_FIELDS, prefix="rope_parameters.")
    sc = read_values(where, scaling, _HF_ROPE_FIELDS, prefix=f"{rope_key}.")
    theta = rp["rope_theta"] if rp["rope_theta"] is not None else v["rope_theta"]
    kind = (sc["rope_type"] if "rope_type" in scaling else sc["type"]) or "default"
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{where}: rope type {kind!r} is not supported: use 'default' or 'yarn'")
    rope = RopeConfig(theta=theta, kind=kind)
    if kind == "yarn":
        y = read_values(where, scaling, _HF_YARN_FIELDS, prefix=f"{rope_key}.")
        rope = RopeConfig(
            theta=theta,
            kind="yarn",
            factor=y["factor"],
            original_max_position=y["original_max_position_embeddings"],
            beta_fast=y["beta_fast"] or 32.0,
            beta_slow=y["beta_slow"] or 1.0,
            mscale=y["mscale"] or 1.0,
            mscale_all_dim=y["mscale_all_dim"] or 0.0,
        )
    dims = MLADims(
        heads=heads,
        kv_lora_rank=v["kv_lora_rank"],
        qk_nope_head_dim=v["qk_nope_head_dim"],
        qk_rope_head_dim=v["qk_rope_head_dim"],
        v_head_dim=v["v_head_dim"],
        q_lora_rank=v["q_lora_rank"],
    )
    return ModelConfig(
        name=name,
        vocab_size=v["vocab_size"],
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        intermediate_size=v["intermediate_size"],
        moe_intermediate_size=v["moe_intermediate_size"],
        n_routed_experts=v["n_routed_experts"],
        n_shared_experts=v["n_shared_experts"],
        num_experts_per_tok=v["num_experts_per_tok"],
        first_k_dense_replace=v["first_k_dense_replace"],
        dims=dims,
        rope=rope,
        rms_norm_eps=v["rms_norm_eps"],
        topk_method=v["topk_method"],
        n_group=v["n_group"],
        topk_group=v["topk_group"],
        norm_topk_prob=v["norm_topk_prob"],
        routed_scaling_factor=v["routed_scaling_factor"],
        max_position_embeddings=v["max_position_embeddings"],
        tie_word_embeddings=v["tie_word_embeddings"],
        bos_token_id=v["bos_token_id"],
        eos_token_id=eos,
    ).validate(where, _HF_NAMES)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` of a HF model directory, with a clear error for each way it fails."""
    path = Path(model_dir)
    if not path.exists():
        raise ConfigError(f"model directory {path} does not exist: pass a HF checkpoint directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: pass the HF checkpoint directory")
    cfg = path / "config.json"
    if not cfg.exists():
        raise ConfigError(f"{path} has no config.json: pass a HF checkpoint directory")
    try:
        hf = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg} is not valid JSON ({e}): fix or re-download it") from None
    except OSError as e:
        raise ConfigError(f"cannot read {cfg} ({e.strerror}): fix its permissions") from None
    return config_from_hf(hf, name=path.name)


_V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    num_hidden_layers=27,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    dims=MLADims(
        heads=16,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        q_lora_rank=None,
    ),
    rope=RopeConfig(
        theta=10000.0,
        kind="yarn",
        factor=40.0,
        original_max_position=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
    rms_norm_eps=1e-6,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    max_position_embeddings=163840,
    bos_token_id=100000,
    eos_token_id=100001,
)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-v2-lite": ModelConfig(name="deepseek-v2-lite", **_V2_LITE),
    # V2-Lite's first two layers (the dense one and one MoE layer) with every real shape: GPU
    # checks of the full-size kernels against a float32 PyTorch reference that fits in memory.
    "deepseek-v2-lite-2l": ModelConfig(
        name="deepseek-v2-lite-2l", **{**_V2_LITE, "num_hidden_layers": 2}
    ),
    # Same structure (dense first layer, routed + shared experts, YaRN, 576-wide latent row
    # shrunk to 96), small enough to compile and run on 2 CPU cores in seconds.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=256,
        moe_intermediate_size=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        dims=MLADims(
            heads=4,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=32,
            q_lora_rank=None,
        ),
        rope=_V2_LITE["rope"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # V2-Lite's attention (16 heads, 576/512 latent, 192/128 heads) around a tiny body: exercises
    # the tensor-core attention kernels end to end at a size a CPU reference can follow.
    "tiny-lite-attn": ModelConfig(
        name="tiny-lite-attn",
        vocab_size=512,
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        dims=_V2_LITE["dims"],
        rope=_V2_LITE["rope"],
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict transformers' DeepseekV2Config accepts for ``cfg``."""
    d = cfg.dims
    rope: dict[str, Any] = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind == "yarn":
        rope.update(
            factor=cfg.rope.factor,
            original_max_position_embeddings=cfg.rope.original_max_position,
            beta_fast=cfg.rope.beta_fast,
            beta_slow=cfg.rope.beta_slow,
            mscale=cfg.rope.mscale,
            mscale_all_dim=cfg.rope.mscale_all_dim,
        )
    return dict(
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.heads,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        kv_lora_rank=d.kv_lora_rank,
        q_lora_rank=d.q_lora_rank,
        qk_nope_head_dim=d.qk_nope_head_dim,
        qk_rope_head_dim=d.qk_rope_head_dim,
        v_head_dim=d.v_head_dim,
        rope_parameters=rope,
        rms_norm_eps=cfg.rms_norm_eps,
        topk_method=cfg.topk_method,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
