"""LowerMLAKernels: replace the kernel-level ``mla.*`` pseudo-calls with ``call_tir``.

- ``mla.cache_write`` becomes ``call_tir_inplace``: the f16 cache is written in place (the
  function's cache argument is updated, nothing is copied).
- ``mla.cache_gather``, ``mla.attn_absorbed``, ``mla.attn_decompressed`` call the kernels that
  ``mla_compiler.kernels.select`` picks for the target (tuned tensor-core kernels where they
  apply, the simple kernels otherwise). ``layer`` travels as a ``R.prim_value`` argument (a TIR scalar), so one
  kernel serves every layer.
"""

from __future__ import annotations

import tvm
from tvm import relax

from mla_compiler import kernels
from mla_compiler.model_export.config import MLADims
from mla_compiler.passes import pseudo


@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    def __init__(self, mod, *, dims: MLADims, target, config):
        super().__init__(mod)
        self.dims, self.target, self.config = dims, target, config
        self.funcs: dict[tuple, relax.GlobalVar] = {}

    def _kernel(self, op_name: str, **kw) -> relax.GlobalVar:
        key = (op_name, tuple(sorted(kw.items())))
        if key not in self.funcs:
            func = kernels.select(op_name, dims=self.dims, target=self.target, config=self.config, **kw)
            name = func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs else op_name
            self.funcs[key] = self.builder_.add_func(func.without_attr("global_symbol"), str(name))
        return self.funcs[key]

    def visit_call_(self, op):
        name = pseudo.name_of(op)
        if name is None:
            return super().visit_call_(op)
        args = [self.visit_expr(a) for a in pseudo.args_of(op)]
        if name == "cache_write":
            cache, rows, slots, layer = args
            if rows.ty.dtype != cache.ty.dtype:
                rows = self.builder_.emit(relax.op.astype(rows, cache.ty.dtype))
            gv = self._kernel("cache_write", width=int(cache.ty.shape[2]), dtype=cache.ty.dtype)
            return relax.call_tir_inplace(
                gv, [cache, rows, slots, layer], inplace_indices=[0], out_ty=cache.ty
            )
        if name == "cache_gather":
            cache, rows, layer = args
            gv = self._kernel("cache_gather", width=int(cache.ty.shape[2]), dtype=cache.ty.dtype)
            return relax.call_tir(gv, [cache, rows, layer], out_ty=op.ty)
        if name == "attn_absorbed":
            q, cache, q_indptr, kv_rows, kv_indptr, layer, sm_scale = args
            gv = self._kernel(
                "attn_absorbed", dtype=q.ty.dtype, kv_dtype=cache.ty.dtype,
                sm_scale=float(pseudo.scalar(sm_scale)),
            )
            return relax.call_tir(
                gv, [q, cache, q_indptr, kv_rows, kv_indptr, layer], out_ty=list(op.ty.fields)
            )
        if name == "attn_decompressed":
            q, k, v, q_indptr, kv_indptr, sm_scale = args
            gv = self._kernel(
                "attn_decompressed", dtype=q.ty.dtype, sm_scale=float(pseudo.scalar(sm_scale))
            )
            return relax.call_tir(gv, [q, k, v, q_indptr, kv_indptr], out_ty=list(op.ty.fields))
        return super().visit_call_(op)


def LowerMLAKernels(*, dims: MLADims, target: tvm.target.Target, config=None) -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod, dims=dims, target=target, config=config)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, new)
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerMLAKernels")
