"""Kernel registry: which TIR kernel serves each MLA call site on each target.

Tuned kernels (schedules.attention_prefill / attention_decode) register here when they apply to
the shapes and target; the simple kernels are the fallback everywhere.
"""

from __future__ import annotations

import tvm

from mla_compiler import kernel_configs
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import MLADims
from mla_compiler.schedules import attention_simple, kv_cache

OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps leaves our scheduled kernels alone


def mark_scheduled(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A hand-scheduled kernel: dlight skips it, FuseOps does not fuse it, the caller names it."""
    return (
        func.with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE)
        .without_attr("global_symbol")
    )


def select(op: str, *, dims: MLADims, target: tvm.target.Target, **kw) -> tvm.tirx.PrimFunc:
    if op == "cache_write":
        return kv_cache.cache_write(kw["width"], dtype=kw["dtype"], target=target)
    if op == "cache_gather":
        return kv_cache.cache_gather(kw["width"], dtype=kw["dtype"], target=target)
    if op == "attn_absorbed":
        return attention_simple.simple_attention(
            dims,
            dtype=kw["dtype"],
            kv_dtype=kw["kv_dtype"],
            target=target,
            variant="absorbed",
            sm_scale=kw["sm_scale"],
        )
    if op == "attn_decompressed":
        return attention_simple.simple_attention(
            dims,
            dtype=kw["dtype"],
            target=target,
            variant="decompressed",
            sm_scale=kw["sm_scale"],
        )
    raise KeyError(f"no kernel for {op}")


def decode_kernels(
    dims: MLADims, *, target: tvm.target.Target, dtype: str, sm_scale: float, choice: KernelChoice
):
    """(DecodeKernels, split count) of tensor-core split-KV decode for ``choice.max_context``,
    or None where it does not apply: CPU targets, non-f16 queries, shapes no config fits."""
    from mla_compiler.errors import TargetError
    from mla_compiler.schedules import attention_decode as ad
    from mla_compiler.schedules.target import is_gpu

    if not is_gpu(target) or dtype != "float16":
        return None
    max_context = choice.max_context
    try:
        config = kernel_configs.decode_config(choice, target, dims, sm_scale=sm_scale)
        if not config.tensor_cores:
            return None
        dk = ad.absorbed_decode(
            dims,
            dtype=dtype,
            target=target,
            config=config,
            sm_scale=sm_scale,
            q_tokens=1,
        )
    except TargetError:
        return None
    splits = ad.splits_for(config, target, dims, q_tokens=1, batch=1, max_context=max_context)
    return dk, splits


def prefill_kernel(
    op: str,
    dims: MLADims,
    *,
    target: tvm.target.Target,
    dtype: str,
    sm_scale: float,
    choice: KernelChoice,
    config=None,
):
    """Tensor-core flash prefill (``attn_absorbed`` or ``attn_decompressed``), or None where it
    does not apply: CPU targets, non-f16, shapes no config fits. ``config``: the first chunk's
    config (default: ``choice``'s); the extend and short kernels are then left out."""
    from mla_compiler.errors import TargetError
    from mla_compiler.schedules import attention_prefill as ap
    from mla_compiler.schedules.target import is_gpu

    if not is_gpu(target) or dtype != "float16":
        return None
    factory = ap.absorbed_prefill if op == "attn_absorbed" else ap.decompressed_prefill
    try:
        extend = short = None
        if config is None:
            config = kernel_configs.prefill_config(choice, op, target, dims, sm_scale=sm_scale)
            extend = kernel_configs.prefill_extend_config(choice, op, target, dims)
            short = kernel_configs.prefill_short_config(op, target, dims)
        return factory(
            dims,
            dtype=dtype,
            target=target,
            config=config,
            extend_config=extend,
            short_config=short,
            sm_scale=sm_scale,
        )
    except TargetError:
        return None
