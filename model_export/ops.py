"""The two MLA custom ops that mark the KV cache and attention in the exported graph.

The PyTorch model calls them; in eager mode they run the PyTorch code below (the reference
semantics), and ``torch.export`` keeps them as single nodes that the Relax importer turns into
the pseudo-calls ``mla.cache_write`` / ``mla.attention``, which the compiler's MLA passes lower
per mode (decompressed, absorbed, phase-aware).

Batch metadata (CSR, see ``mla_compiler.reference``):
- ``slot_rows [T]``: the cache row each new token's latent row is written to.
- ``q_indptr [B+1]``: sequence b's queries are rows ``q_indptr[b]:q_indptr[b+1]`` of q.
- ``kv_rows [N]``, ``kv_indptr [B+1]``: sequence b attends to cache rows
  ``kv_rows[kv_indptr[b]:kv_indptr[b+1]]`` (its new rows last), causally with offset N_b - T_b.
The cache is ``[layers, rows, kv_lora_rank + qk_rope_head_dim]``: one latent row per token.
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import custom_op

_PLAIN = False  # see plain_ops()


@contextlib.contextmanager
def plain_ops():
    """Trace with plain torch ops instead of the custom ops (for exporters, such as ONNX, that
    cannot carry them): the model then computes one whole sequence without a cache."""
    global _PLAIN
    old, _PLAIN = _PLAIN, True
    try:
        yield
    finally:
        _PLAIN = old


def plain() -> bool:
    return _PLAIN


def dense_causal_attention(q_nope, q_pe, latent, kv_b, *, kv_lora_rank: int, sm_scale: float):
    """One sequence from position 0, no cache: decompress the latent rows and attend causally.

    q_nope [T, H, dn], q_pe [T, H, dr], latent [T, R+dr], kv_b [H*(dn+dv), R] -> [T, H, dv].
    """
    t, heads, dn = q_nope.shape
    kv = (latent[:, :kv_lora_rank] @ kv_b.T).view(t, heads, -1)  # [T, H, dn+dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k_pe = latent[:, kv_lora_rank:]  # [T, dr]
    s = torch.einsum("thd,nhd->htn", q_nope, k_nope) + torch.einsum("thd,nd->htn", q_pe, k_pe)
    pos = torch.arange(t, device=q_nope.device)
    s = (s * sm_scale).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    return torch.einsum("htn,nhd->thd", p, v)


@custom_op("mla::cache_write", mutates_args=())
def cache_write(
    cache: torch.Tensor, rows: torch.Tensor, slot_rows: torch.Tensor, layer: int
) -> torch.Tensor:
    """Return ``cache`` with ``rows [T, W]`` written at ``cache[layer, slot_rows]``.

    Functional in PyTorch (a copy); the compiler makes it an in-place write.
    """
    out = cache.clone()
    out[layer, slot_rows.long()] = rows.to(cache.dtype)
    return out


@cache_write.register_fake
def _(cache, rows, slot_rows, layer):
    return torch.empty_like(cache)


@custom_op("mla::attention", mutates_args=())
def attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    kv_b: torch.Tensor,
    q_indptr: torch.Tensor,
    kv_rows: torch.Tensor,
    kv_indptr: torch.Tensor,
    layer: int,
    sm_scale: float,
) -> torch.Tensor:
    """Causal MLA over latent cache rows, decompressed with ``kv_b`` (the textbook form).

    q_nope [T, H, dn], q_pe [T, H, dr], cache [L, C, R+dr], kv_b [H*(dn+dv), R] -> [T, H, dv].
    """
    heads, dn = q_nope.shape[1], q_nope.shape[2]
    rank = kv_b.shape[1]
    dv = kv_b.shape[0] // heads - dn
    out = q_nope.new_empty(q_nope.shape[0], heads, dv)
    for b in range(q_indptr.shape[0] - 1):
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        rows = cache[layer, kv_rows[int(kv_indptr[b]) : int(kv_indptr[b + 1])].long()]
        rows = rows.to(q_nope.dtype)  # [N, R+dr]
        n, t = rows.shape[0], q1 - q0
        kv = (rows[:, :rank] @ kv_b.T).view(n, heads, dn + dv)  # [N, H, dn+dv]
        k_nope, v = kv[..., :dn], kv[..., dn:]
        k_pe = rows[:, rank:]  # [N, dr], shared by all heads
        s = torch.einsum("thd,nhd->htn", q_nope[q0:q1], k_nope)
        s = s + torch.einsum("thd,nd->htn", q_pe[q0:q1], k_pe)
        s = s * sm_scale
        pos = torch.arange(n, device=s.device)
        mask = pos[None, :] > torch.arange(t, device=s.device)[:, None] + (n - t)
        s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)
        out[q0:q1] = torch.einsum("htn,nhd->thd", p, v)
    return out


@attention.register_fake
def _(q_nope, q_pe, cache, kv_b, q_indptr, kv_rows, kv_indptr, layer, sm_scale):
    heads, dn = q_nope.shape[1], q_nope.shape[2]
    dv = kv_b.shape[0] // heads - dn
    return q_nope.new_empty(q_nope.shape[0], heads, dv)
