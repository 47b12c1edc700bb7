"""LowerMLAKernels: replace the kernel-level ``mla.*`` pseudo-calls with ``call_tir``.

- ``mla.cache_write`` becomes ``call_tir_inplace``: the f16 cache is written in place (the
  function's cache argument is updated, nothing is copied).
- ``mla.cache_gather``, ``mla.attn_absorbed``, ``mla.attn_decompressed`` call the kernels that
  ``mla_compiler.kernels.select`` picks for the target (tuned tensor-core kernels where they
  apply, the simple kernels otherwise). ``layer`` travels as a ``R.prim_value`` argument (a
  TIR scalar), so one kernel serves every layer.
"""

from __future__ import annotations

import tvm
from tvm import relax

from mla_compiler import kernels
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import MLADims
from mla_compiler.passes import pseudo


@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    def __init__(self, mod, *, dims: MLADims, target, choice: KernelChoice):
        super().__init__(mod)
        self.dims, self.target, self.choice = dims, target, choice
        self.phase = None  # name of the Relax function being lowered
        self.funcs: dict[tuple, relax.GlobalVar] = {}
        self.decode: dict[tuple, tuple | None] = {}  # (key, dtype) -> decode_kernels(...)

    def _add(self, key, func, name: str) -> relax.GlobalVar:
        if key not in self.funcs:
            func = kernels.mark_scheduled(func)
            self.funcs[key] = self.builder_.add_func(func, name)
        return self.funcs[key]

    def _kernel(self, op_name: str, **kw) -> relax.GlobalVar:
        key = (op_name, tuple(sorted(kw.items())))
        if key not in self.funcs:
            func = kernels.select(op_name, dims=self.dims, target=self.target, **kw)
            name = (
                func.attrs["global_symbol"]
                if func.attrs and "global_symbol" in func.attrs
                else op_name
            )
            return self._add(key, func, str(name))
        return self.funcs[key]

    def _prefill(self, op_name: str, dtype: str, sm_scale: float):
        """GlobalVar of the tensor-core flash prefill kernel for ``op_name``, or None."""
        key = ("flash", op_name, dtype, sm_scale)
        if key not in self.funcs:
            func = kernels.prefill_kernel(
                op_name,
                self.dims,
                target=self.target,
                dtype=dtype,
                sm_scale=sm_scale,
                choice=self.choice,
            )
            if func is None:
                return None
            short = "absorbed" if op_name == "attn_absorbed" else "decompressed"
            return self._add(key, func, f"mla_prefill_{short}")
        return self.funcs[key]

    def _cache_row_bounds(self, kv_rows, kv_indptr):
        """[first, last+1] cache rows of the one decoding sequence (its slot's rows are
        consecutive): kv_rows[kv_indptr[0]] and that plus the sequence's length."""
        op = relax.op
        start = op.take(kv_rows, op.strided_slice(kv_indptr, axes=[0], begin=[0], end=[1]))
        length = op.subtract(
            op.strided_slice(kv_indptr, axes=[0], begin=[1], end=[2]),
            op.strided_slice(kv_indptr, axes=[0], begin=[0], end=[1]),
        )
        return self.builder_.emit(op.concat([start, op.add(start, length)], axis=0))

    def _decode_attention(self, q, cache, kv_indptr, layer, sm_scale, out_ty):
        """Split-KV tensor-core decode (one token of one sequence) or None where it does not
        apply (CPU, non-f16, a config that does not fit). The workspace holds the splits of
        ``max_context``; both kernels use only ``effective_splits`` of the actual context
        (read from ``kv_indptr`` on the device: no shape depends on it); a context of one used
        split gets O and LSE from the split kernel, the merge (in place) leaves it alone."""
        d, key = self.dims, ("decode", sm_scale)
        # built once, not per layer (~0.8 s each: 22 s of a V2-Lite compile)
        if (key, q.ty.dtype.dtype) not in self.decode:
            self.decode[key, q.ty.dtype.dtype] = kernels.decode_kernels(
                self.dims,
                target=self.target,
                dtype=q.ty.dtype.dtype,
                sm_scale=sm_scale,
                choice=self.choice,
            )
        found = self.decode[key, q.ty.dtype.dtype]
        if found is None:
            return None
        dk, splits = found
        split = self._add(key + ("split",), dk.split, "mla_decode_split")
        q4 = self.builder_.emit(
            relax.op.reshape(q, [1, 1, d.heads, d.latent_dim])
        )  # [B, Q, H, 576]
        o_ty = relax.TensorType([1, 1, d.heads, d.kv_lora_rank], q.ty.dtype)  # [B, Q, H, 512]
        lse_ty = relax.TensorType([1, 1, d.heads], "float32")  # [B, Q, H]
        res = self.builder_.emit(
            relax.call_tir(
                split,
                [q4, cache, kv_indptr, relax.prim_value(tvm.tirx.IntImm("int32", layer))],
                out_ty=[
                    relax.TensorType([splits, 1, 1, d.heads, d.kv_lora_rank], "float32"),
                    relax.TensorType([splits, 1, 1, d.heads], "float32"),
                    o_ty,
                    lse_ty,
                ],
            )
        )
        if splits > 1:  # the split kernel wrote O and LSE where the context used one split
            o, lse = relax.TupleGetItem(res, 2), relax.TupleGetItem(res, 3)
            parts = [relax.TupleGetItem(res, 0), relax.TupleGetItem(res, 1)]
            merge = self._add(key + ("merge",), dk.merge, "mla_decode_merge")
            res = self.builder_.emit(
                relax.call_tir_inplace(
                    merge,
                    [*parts, kv_indptr, o, lse],
                    inplace_indices=[3, 4],
                    out_ty=[o_ty, lse_ty],
                )
            )
        else:
            res = relax.Tuple([relax.TupleGetItem(res, 2), relax.TupleGetItem(res, 3)])
        o = relax.op.reshape(relax.TupleGetItem(res, 0), out_ty[0].shape)
        lse = relax.op.reshape(relax.TupleGetItem(res, 1), out_ty[1].shape)
        return relax.Tuple([o, lse])

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
            if self.phase == "decode":
                fast = self._decode_attention(
                    q,
                    cache,
                    self._cache_row_bounds(kv_rows, kv_indptr),
                    int(pseudo.scalar(layer)),
                    float(pseudo.scalar(sm_scale)),
                    list(op.ty.fields),
                )
                if fast is not None:
                    return fast
            sm = float(pseudo.scalar(sm_scale))
            flash = self._prefill("attn_absorbed", q.ty.dtype.dtype, sm)
            if flash is not None and cache.ty.dtype.dtype == q.ty.dtype.dtype:
                # The kernel streams contiguous rows; sequences sit in slots of the cache, so
                # their rows (kv_rows) are gathered first: one pass over N x 576, small next to
                # the attention FLOPs of a prompt chunk.
                n = kv_rows.ty.shape[0]
                gather = self._kernel(
                    "cache_gather", width=int(cache.ty.shape[2]), dtype=cache.ty.dtype
                )
                rows = self.builder_.emit(
                    relax.call_tir(
                        gather,
                        [cache, kv_rows, layer],
                        out_ty=relax.TensorType([n, cache.ty.shape[2]], cache.ty.dtype),
                    )
                )
                rows = self.builder_.emit(relax.op.reshape(rows, [1, n, cache.ty.shape[2]]))
                layer0 = relax.prim_value(tvm.tirx.IntImm("int32", 0))
                return relax.call_tir(
                    flash, [q, rows, q_indptr, kv_indptr, layer0], out_ty=list(op.ty.fields)
                )
            gv = self._kernel(
                "attn_absorbed",
                dtype=q.ty.dtype,
                kv_dtype=cache.ty.dtype,
                sm_scale=float(pseudo.scalar(sm_scale)),
            )
            return relax.call_tir(
                gv, [q, cache, q_indptr, kv_rows, kv_indptr, layer], out_ty=list(op.ty.fields)
            )
        if name == "attn_decompressed":
            q, k, v, q_indptr, kv_indptr, sm_scale = args
            flash = self._prefill(
                "attn_decompressed", q.ty.dtype.dtype, float(pseudo.scalar(sm_scale))
            )
            if flash is not None:
                return relax.call_tir(
                    flash, [q, k, v, q_indptr, kv_indptr], out_ty=list(op.ty.fields)
                )
            gv = self._kernel(
                "attn_decompressed", dtype=q.ty.dtype, sm_scale=float(pseudo.scalar(sm_scale))
            )
            return relax.call_tir(gv, [q, k, v, q_indptr, kv_indptr], out_ty=list(op.ty.fields))
        return super().visit_call_(op)


def LowerMLAKernels(  # noqa: N802
    *, dims: MLADims, target: tvm.target.Target, choice: KernelChoice
) -> tvm.transform.Pass:
    """``choice`` picks the kernel configs; its ``max_context`` sizes the decode kernel's split
    count (and its workspace)."""

    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod, dims=dims, target=target, choice=choice)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lower.phase = gv.name_hint
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, new)
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerMLAKernels")
