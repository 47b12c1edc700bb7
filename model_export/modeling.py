"""Our PyTorch definition of the DeepSeek-V2 family, written for export.

Differences from HF transformers' ``DeepseekV2ForCausalLM`` (the independent reference), none of
which changes the function computed:
- RoPE is real-valued rotate-half. The checkpoint's interleaved (complex-pair) rope dims of q and
  k_pe are permuted to half-split order at load time (``weights.permute_rope_rows``), which
  leaves every q.k product unchanged.
- One flat batch of tokens with explicit cache metadata (see ``ops``), no attention mask tensor.
- Attention core, cache write and MoE are the custom ops of ``ops``/``moe``: single nodes in the
  exported graph that the compiler's passes recognise and lower.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mla_compiler.model_export import moe as moe_ops
from mla_compiler.model_export import ops
from mla_compiler.model_export.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] (YaRN-corrected when configured) and the cos/sin scale."""
    dim, r = cfg.dims.qk_rope_head_dim, cfg.rope
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    if r.kind != "yarn":
        return inv_freq.float(), 1.0

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(r.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(r.theta))
        )

    low = max(math.floor(correction_dim(r.beta_fast)), 0)
    high = min(math.ceil(correction_dim(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / r.factor * (1 - extrapolation) + inv_freq * extrapolation
    scale = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    return inv_freq.float(), float(scale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [T, ..., dr]; cos/sin [T, dr/2] broadcast over the middle axes."""
    half = x.shape[-1] // 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Batch:
    """The per-call tensors every layer reads (positions and cache metadata, see ``ops``)."""

    def __init__(self, positions, slot_rows, q_indptr, kv_rows, kv_indptr, cos, sin):
        self.positions = positions
        self.slot_rows = slot_rows
        self.q_indptr = q_indptr
        self.kv_rows = kv_rows
        self.kv_indptr = kv_indptr
        self.cos = cos
        self.sin = sin


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.dims
        self.dims, self.layer = d, layer
        self.sm_scale = cfg.softmax_scale
        if d.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, d.heads * d.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, d.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(d.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(d.q_lora_rank, d.heads * d.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, d.latent_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(d.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            d.kv_lora_rank, d.heads * (d.qk_nope_head_dim + d.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(d.heads * d.v_head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, batch: Batch):
        d, t = self.dims, x.shape[0]
        if d.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, d.heads, d.qk_head_dim)  # [T, H, 192]
        q_nope, q_pe = q[..., : d.qk_nope_head_dim], q[..., d.qk_nope_head_dim :]
        kv = self.kv_a_proj_with_mqa(x)  # [T, 576]
        c, k_pe = kv[:, : d.kv_lora_rank], kv[:, d.kv_lora_rank :]
        c = self.kv_a_layernorm(c)  # [T, 512]
        q_pe = apply_rope(q_pe, batch.cos, batch.sin)  # [T, H, 64]
        k_pe = apply_rope(k_pe, batch.cos, batch.sin)  # [T, 64]
        latent = torch.cat([c, k_pe], dim=-1)  # [T, 576]: the cache row
        if ops.plain():
            o = ops.dense_causal_attention(
                q_nope,
                q_pe,
                latent,
                self.kv_b_proj.weight,
                kv_lora_rank=d.kv_lora_rank,
                sm_scale=self.sm_scale,
            )
            return self.o_proj(o.reshape(t, d.heads * d.v_head_dim)), cache
        cache = ops.cache_write(cache, latent, batch.slot_rows, self.layer)
        o = ops.attention(
            q_nope,
            q_pe,
            cache,
            self.kv_b_proj.weight,
            batch.q_indptr,
            batch.kv_rows,
            batch.kv_indptr,
            self.layer,
            self.sm_scale,
        )  # [T, H, 128]
        return self.o_proj(o.reshape(t, d.heads * d.v_head_dim)), cache


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts stored stacked: gate_up [E, 2I, D] (gate rows first), down [E, D, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.cfg = cfg
        self.gate = nn.Linear(h, e, bias=False)  # router, kept in float32
        self.experts_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.experts_down = nn.Parameter(torch.empty(e, h, i))
        self.shared_experts = MLP(h, i * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        fn = moe_ops.dense_moe if ops.plain() else moe_ops.moe
        y = fn(
            x,
            self.gate.weight,
            self.experts_gate_up,
            self.experts_down,
            c.num_experts_per_tok,
            c.topk_method,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x, cache, batch: Batch):
        h, cache = self.self_attn(self.input_layernorm(x), cache, batch)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DeepseekV2(nn.Module):
    """Causal LM. ``forward`` runs one flat batch of new tokens against the latent cache.

    Inputs: input_ids [T] int64, positions [T] int64, slot_rows [T] int32, q_indptr [B+1] int32,
    kv_rows [N] int32, kv_indptr [B+1] int32, logit_rows [R] int64 (which of the T tokens get
    logits, usually each sequence's last), cache [L, C, 576].
    Returns logits [R, vocab] (float32) and the updated cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_tables(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the RoPE frequencies float32 when the model moves to f16/bf16."""
        inv_freq = self.inv_freq
        out = super()._apply(fn, recurse)
        moved = fn(inv_freq)
        self.inv_freq = inv_freq.to(moved.device) if moved.is_floating_point() else moved
        return out

    def forward(
        self, input_ids, positions, slot_rows, q_indptr, kv_rows, kv_indptr, logit_rows, cache
    ):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dr/2]
        cos = torch.cos(freqs) * self.rope_scale
        sin = torch.sin(freqs) * self.rope_scale
        x = self.embed_tokens(input_ids)  # [T, D]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        batch = Batch(positions, slot_rows, q_indptr, kv_rows, kv_indptr, cos, sin)
        for layer in self.layers:
            x, cache = layer(x, cache, batch)
        x = self.norm(x[logit_rows])  # [R, D]
        return self.lm_head(x).float(), cache

    def new_cache(self, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        d = self.cfg.dims
        dtype = dtype or self.embed_tokens.weight.dtype
        return torch.zeros(self.cfg.num_hidden_layers, rows, d.latent_dim, dtype=dtype)


def single_sequence_inputs(
    tokens: list[int] | torch.Tensor, *, start: int, logits: str = "last"
) -> dict[str, torch.Tensor]:
    """Inputs of ``DeepseekV2.forward`` for one sequence occupying cache rows ``0..start+T``."""
    ids = torch.as_tensor(tokens, dtype=torch.int64)
    t = ids.shape[0]
    n = start + t
    return dict(
        input_ids=ids,
        positions=torch.arange(start, n, dtype=torch.int64),
        slot_rows=torch.arange(start, n, dtype=torch.int32),
        q_indptr=torch.tensor([0, t], dtype=torch.int32),
        kv_rows=torch.arange(n, dtype=torch.int32),
        kv_indptr=torch.tensor([0, n], dtype=torch.int32),
        logit_rows=torch.arange(t) if logits == "all" else torch.tensor([t - 1]),
    )
