"""Float64 references shared by tests, benchmarks and tuning.

Conventions every kernel follows:
- ``lse`` is the natural-log sum-exp of the *scaled* logits: ``log(sum_j exp(sm_scale * q.k_j))``.
- Causal masking with a position offset: query ``i`` of a sequence with ``T`` new tokens and ``N``
  KV rows (the new rows included, ``N >= T``) sees rows ``j <= i + (N - T)``.
- Ragged batches use CSR-style ``indptr`` arrays: sequence ``b`` owns query rows
  ``q_indptr[b]:q_indptr[b+1]`` and KV rows ``kv_indptr[b]:kv_indptr[b+1]``.
"""

from __future__ import annotations

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: float, causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, per-head K/V or one shared KV head.

    q: [T, H, Dk]; k: [N, H, Dk] or [N, Dk]; v: [N, H, Dv] or [N, Dv].
    Returns O [T, H, Dv] and LSE [T, H], both float64.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    t, n = q.shape[0], k.shape[0]
    if k.dim() == 2:
        s = torch.einsum("thd,nd->htn", q, k) * sm_scale  # [H, T, N]
    else:
        s = torch.einsum("thd,nhd->htn", q, k) * sm_scale
    if causal:
        i = torch.arange(t, device=s.device)[:, None]
        j = torch.arange(n, device=s.device)[None, :]
        s = s.masked_fill(j > i + (n - t), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, T]
    p = torch.exp(s - lse[..., None])
    if v.dim() == 2:
        o = torch.einsum("htn,nd->thd", p, v)
    else:
        o = torch.einsum("htn,nhd->thd", p, v)
    return o, lse.transpose(0, 1).contiguous()


def absorbed_attention(
    q: torch.Tensor, kv: torch.Tensor, *, v_dim: int, sm_scale: float, causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA over latent rows: q [T, H, 576], kv [N, 576]; V = kv[:, :v_dim] (512).

    Returns O [T, H, v_dim] and LSE [T, H].
    """
    return attention(q, kv, kv[:, :v_dim], sm_scale=sm_scale, causal=causal)


def ragged(fn, q: torch.Tensor, kv_args: tuple[torch.Tensor, ...], q_indptr, kv_indptr, **kw):
    """Apply a one-sequence reference ``fn(q, *kv, **kw)`` to each sequence of a ragged batch."""
    outs, lses = [], []
    for b in range(len(q_indptr) - 1):
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        k0, k1 = int(kv_indptr[b]), int(kv_indptr[b + 1])
        o, lse = fn(q[q0:q1], *(a[k0:k1] for a in kv_args), **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def merge_states(
    o_parts: torch.Tensor, lse_parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results: o_parts [S, ..., D], lse_parts [S, ...] -> (O, LSE)."""
    o_parts, lse_parts = _f64(o_parts), _f64(lse_parts)
    lse = torch.logsumexp(lse_parts, dim=0)
    w = torch.exp(lse_parts - lse)  # empty splits carry lse = -inf and weigh 0
    w = torch.nan_to_num(w, nan=0.0)
    return (w[..., None] * o_parts).sum(0), lse


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = _f64(x)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * _f64(weight)


def gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = a @ w.T with a [M, K] and w [N, K] (torch.nn.Linear layout)."""
    return _f64(a) @ _f64(w).T


def silu_mul_interleaved(h: torch.Tensor, group: int = 32) -> torch.Tensor:
    """SiLU(gate) * up of products ``h [M, 2N]`` whose columns are gate/up in interleaved groups
    of ``group`` (``gemm.transform_weight``'s weight layout) -> ``[M, N]``."""
    m, n = h.shape[0], h.shape[1] // 2
    g = h.reshape(m, n // group, 2, group)
    return (torch.nn.functional.silu(g[:, :, 0]) * g[:, :, 1]).reshape(m, n)


def moe_route(
    logits: torch.Tensor,
    *,
    top_k: int,
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 softmax routing: logits [T, E] -> (weights [T, k], expert ids [T, k])."""
    scores = torch.softmax(_f64(logits), dim=-1)
    if method == "group_limited_greedy":
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        mask = mask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        scores = scores.masked_fill(mask == 0, 0.0)
    w, idx = torch.topk(scores, k=top_k, dim=-1)
    if norm_topk_prob and top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, idx


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Routed experts: x [T, D], gate_up [E, 2I, D] (gate rows first), down [E, D, I]."""
    x = _f64(x)
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            h = _f64(gate_up[e]) @ x[t]
            h = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += w * (_f64(down[e]) @ h)
    return out


def moe_grouping(ids: torch.Tensor, num_experts: int, block_m: int):
    """``moe_align``'s layout of routed rows ``t * k + j`` (ids [T, k]): expert order, blocks of
    ``block_m`` rows padded with -1, unused blocks last with expert -1. Returns
    (sorted_rows [NB * block_m] int32, block_expert [NB] int32, used blocks)."""
    flat = ids.flatten().tolist()
    nb = (len(flat) + num_experts * (block_m - 1)) // block_m
    by_expert: dict[int, list[int]] = {}
    for i, e in enumerate(flat):
        by_expert.setdefault(e, []).append(i)
    sorted_rows, block_expert = [], []
    for e in sorted(by_expert):
        rows = by_expert[e]
        for j in range(0, len(rows), block_m):
            chunk = rows[j : j + block_m]
            sorted_rows += chunk + [-1] * (block_m - len(chunk))
            block_expert.append(e)
    used = len(block_expert)
    sorted_rows += [-1] * (nb - used) * block_m
    block_expert += [-1] * (nb - used)
    i32 = dict(dtype=torch.int32, device=ids.device)
    return torch.tensor(sorted_rows, **i32), torch.tensor(block_expert, **i32), used


def topk_lowest_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, equal values ordered by ascending index (a stable sort)."""
    v, idx = torch.sort(values, dim=-1, descending=True, stable=True)
    return v[..., :k], idx[..., :k]


def moe_route_lowest_index(
    logits: torch.Tensor,
    *,
    top_k: int,
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_route`` with the tie rule of the compiled kernels: among equal scores (and equal
    group scores) the lowest expert (group) index wins."""
    scores = torch.softmax(_f64(logits), dim=-1)
    if method == "group_limited_greedy":
        t, e = scores.shape
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values
        group_idx = topk_lowest_index(group_scores, topk_group)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        mask = mask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        scores = scores.masked_fill(mask == 0, 0.0)
    w, idx = topk_lowest_index(scores, top_k)
    if norm_topk_prob and top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, idx


def sample_kept(logits, temperature: float, top_p: float, top_k: int):
    """(kept mask, p) of ``schedules.sampling``'s rule for one row, in float64: ``p`` =
    exp((z - max z) / T) over float32 logits; kept = {z >= tau}, tau the k-th largest logit
    (top-k) raised to the largest logit whose head holds ``top_p`` of the top-k mass."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float32).astype(np.float64)
    v = z.size
    p = np.exp((z - z.max()) / temperature)
    values = np.sort(z)[::-1]
    tau = values[top_k - 1] if 0 < top_k < v else values[-1]
    if top_p < 1:
        mass = p[z >= tau].sum()
        for cand in np.unique(z[z >= tau])[::-1]:  # descending distinct values
            if p[z >= cand].sum() >= top_p * mass:
                tau = cand
                break
    return z >= tau, p


def sample(logits, temperature: float, top_p: float, top_k: int, u: float) -> int:
    """The token ``schedules.sampling`` draws from one row with uniform ``u``, in float64: -1
    for a row with a non-finite logit; greedy (lowest index of the max) at temperature 0 or
    top_k 1; else the first kept index whose inclusive prefix of kept p exceeds u x (kept
    mass)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float32)
    if not np.isfinite(z).all():
        return -1
    if temperature <= 0 or top_k == 1:
        return int(np.argmax(z))
    kept, p = sample_kept(z, temperature, top_p, top_k)
    q = np.where(kept, p, 0.0)
    cum = np.cumsum(q)
    hit = np.nonzero(kept & (cum > u * cum[-1]))[0]
    return int(hit[0]) if hit.size else int(np.nonzero(kept)[0][-1])
