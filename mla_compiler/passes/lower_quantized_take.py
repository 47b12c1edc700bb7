"""LowerQuantizedTake: row lookups in a quantized weight read its blocks.

``take(W, ids, axis=0)`` with ``W [N, K]`` a view of DequantizeWeights (the token embedding)
becomes ``call_tir(take_rows_<fmt>, [Wq, ids])``: only the looked-up rows are decoded, so the
device keeps the embedding as blocks (V2-Lite Q4_K_M: 118 MiB instead of 400 MiB of f16).
Runs on every target, after DequantizeWeights and before LiftTransformParams.
"""

from __future__ import annotations

import tvm
from tvm import relax

from mla_compiler import kernels
from mla_compiler.passes.dequantize_weights import quantized_views
from mla_compiler.schedules.quant_formats import FORMATS, take_rows_func


@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.mod, self.target = mod, target
        self.views: dict = {}
        self.kernels: dict = {}

    def visit_call_(self, call):
        take = tvm.ir.Op.get("relax.take")
        view = self.views.get(call.args[0]) if call.op.same_as(take) else None
        ids = call.args[1] if view is not None else None
        if view is None or int(call.attrs.axis) != 0 or len(ids.ty.shape) != 1:
            return super().visit_call_(call)
        w = call.args[0]
        n, k = (int(s) for s in w.ty.shape)
        dtype, index = str(w.ty.dtype), str(ids.ty.dtype)
        key = (view.fmt, n, k, dtype, index)
        if key not in self.kernels:
            func = take_rows_func(
                FORMATS[view.fmt], n, k, index_dtype=index, out_dtype=dtype, target=self.target
            )
            name = f"take_rows_{view.fmt}_n{n}_k{k}"
            self.kernels[key] = self.builder_.add_func(kernels.mark_scheduled(func), name)
        blocks = view.blocks(w.ty.shape, self.builder_.emit)
        out = relax.TensorType([ids.ty.shape[0], k], dtype)
        return relax.call_tir(self.kernels[key], [blocks, self.visit_expr(ids)], out_ty=out)


def LowerQuantizedTake(*, target: tvm.target.Target) -> tvm.transform.Pass:  # noqa: N802
    """Row lookups (``take`` on axis 0) in quantized weights -> ``take_rows`` kernels."""

    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod, target)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lower.views = quantized_views(mod, func)
                if not lower.views:
                    continue
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerQuantizedTake")
