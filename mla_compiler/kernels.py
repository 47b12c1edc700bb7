"""Kernel registry: which TIR kernel serves each MLA call site on each target.

Tuned kernels (schedules.attention_prefill / attention_decode) register here when they apply to
the shapes and target; the simple kernels are the fallback everywhere.
"""

from __future__ import annotations

import tvm

from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules import attention_simple, kv_cache


def select(op: str, *, dims: MLADims, target: tvm.target.Target, config=None, **kw) -> tvm.tirx.PrimFunc:
    if op == "cache_write":
        return kv_cache.cache_write(kw["width"], dtype=kw["dtype"], target=target)
    if op == "cache_gather":
        return kv_cache.cache_gather(kw["width"], dtype=kw["dtype"], target=target)
    if op == "attn_absorbed":
        return attention_simple.simple_attention(
            dims, heads=dims.heads, dtype=kw["dtype"], kv_dtype=kw["kv_dtype"], target=target,
            variant="absorbed", sm_scale=kw["sm_scale"],
        )
    if op == "attn_decompressed":
        return attention_simple.simple_attention(
            dims, heads=dims.heads, dtype=kw["dtype"], target=target, variant="decompressed",
            sm_scale=kw["sm_scale"],
        )
    raise KeyError(f"no kernel for {op}")
