"""The MoE custom op: routing + routed experts as one node of the exported graph.

The eager implementation below is the reference semantics (DeepSeek-V2 softmax routing);
the compiler lowers the node to fused MoE kernels, or to the dense fallback of
``mla_compiler.lower_moe``.

Ties in top-k resolve to the lowest expert index (torch.topk on CPU does the same for the
sizes used here; the compiled kernels follow that rule explicitly).
"""

from __future__ import annotations

import torch
from torch.library import custom_op


def route(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    method: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (float32) and expert ids [T, k] for tokens x [T, D]."""
    scores = torch.softmax(x.float() @ router.float().T, dim=-1)  # [T, E]
    if method == "group_limited_greedy":
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        mask = mask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        scores = scores.masked_fill(mask == 0, 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


@custom_op("mla::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    method: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> torch.Tensor:
    """Routed experts: x [T, D], router [E, D], gate_up [E, 2I, D], down [E, D, I] -> [T, D]."""
    weights, ids = route(x, router, top_k, method, n_group, topk_group, norm_topk_prob, scaling)
    inter = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        h = x[tok] @ gate_up[e].T  # [n, 2I]
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = (h @ down[e].T).float() * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


def dense_moe(x, router, gate_up, down, top_k, method, n_group, topk_group, norm, scaling):
    """Every expert on every token, weighted by the routing weights (zeros off the top-k): the
    traceable form of ``moe`` for exporters that cannot carry custom ops."""
    weights, ids = route(x, router, top_k, method, n_group, topk_group, norm, scaling)
    dense = torch.zeros(x.shape[0], router.shape[0], dtype=torch.float32, device=x.device)
    dense = dense.scatter(1, ids, weights)
    inter = down.shape[-1]
    h = torch.einsum("td,eid->eti", x, gate_up)  # [E, T, 2I]
    h = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("eti,edi->etd", h, down).float()  # [E, T, D]
    return (y * dense.T[..., None]).sum(0).to(x.dtype)


@moe.register_fake
def _(x, router, gate_up, down, top_k, method, n_group, topk_group, norm_topk_prob, scaling):
    return torch.empty_like(x)
