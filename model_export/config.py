"""Model configuration of the DeepSeek-V2 family, read from a HuggingFace ``config.json``.

``MLADims`` is the single source of the attention dimensions: the exporter, the Relax passes, the
kernels, the schedules, the runtime and the tests all take it instead of loose integers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from mla_compiler.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MLADims:
    """Multi-head latent attention dimensions (DeepSeek-V2-Lite defaults)."""

    heads: int = 16
    kv_lora_rank: int = 512  # compressed KV width: the latent row and V of absorbed attention
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    q_lora_rank: int | None = None  # None: q_proj is one dense matrix (V2-Lite)

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
        if mla in (2, 3):
            return layers * self.latent_dim * itemsize
        if mla == 0:
            return layers * self.heads * (self.qk_head_dim + self.v_head_dim) * itemsize
        raise ConfigError(f"unknown MLA mode {mla}: use 0, 2 or 3")


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

    def validate(self) -> ModelConfig:
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"topk_method {self.topk_method!r} is not supported: use 'greedy' or "
                "'group_limited_greedy' (DeepSeek-V2); 'noaux_tc' is DeepSeek-V3"
            )
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not a multiple of "
                    f"n_group={self.n_group}: fix config.json"
                )
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"1..n_routed_experts={self.n_routed_experts}: fix config.json"
                )
        for field in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive: fix config.json")
        return self


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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


def config_from_hf(hf: dict[str, Any], *, name: str = "hf") -> ModelConfig:
    """Build a ``ModelConfig`` from the dict of a HF DeepSeek-V2 ``config.json``.

    Accepts both the ``rope_scaling`` + ``rope_theta`` keys of the original checkpoints and the
    ``rope_parameters`` key that transformers >= 5 writes.
    """
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v2", None):
        raise ConfigError(
            f"model_type {model_type!r} is not supported: mla-compiler compiles "
            "'deepseek_v2' models"
        )
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(
            f"config.json lacks {', '.join(missing)}: a DeepSeek-V2 config needs all of "
            + ", ".join(_REQUIRED)
        )
    n_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if n_kv != hf["num_attention_heads"]:
        raise ConfigError(
            f"num_key_value_heads={n_kv} != num_attention_heads={hf['num_attention_heads']}: "
            "MLA models have one KV head per query head before absorption"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention_bias/mlp_bias are not supported: DeepSeek-V2 has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported: use 'silu'")

    rope_params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope_params
    theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind not in ("default", "yarn"):
        raise ConfigError(f"rope type {kind!r} is not supported: use 'default' or 'yarn'")
    rope = RopeConfig(theta=theta, kind=kind)
    if kind == "yarn":
        rope = RopeConfig(
            theta=theta,
            kind="yarn",
            factor=float(scaling["factor"]),
            original_max_position=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast") or 32),
            beta_slow=float(scaling.get("beta_slow") or 1),
            mscale=float(scaling.get("mscale") or 1.0),
            mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        )
    n_routed = int(hf.get("n_routed_experts") or 0)
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    dims = MLADims(
        heads=int(hf["num_attention_heads"]),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
        qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]),
        q_lora_rank=hf.get("q_lora_rank"),
    )
    return ModelConfig(
        name=name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        intermediate_size=int(hf["intermediate_size"]),
        moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
        n_routed_experts=n_routed,
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0),
        first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
        dims=dims,
        rope=rope,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        topk_method=hf.get("topk_method") or "greedy",
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 163840)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    ).validate()


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
        hf = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg} is not valid JSON ({e}): fix or re-download it") from None
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
    dims=MLADims(),
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
            heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32
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
        dims=MLADims(),
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
