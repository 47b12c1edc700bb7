"""RewriteMLAAttention: turn the exported MLA attention into one of three forms.

The importer leaves, per layer, ``mla.cache_write(cache, latent_rows, slot_rows, layer)`` and
``mla.attention(q_nope, q_pe, cache, kv_b, q_indptr, kv_rows, kv_indptr, layer, sm_scale)``.
This pass rewrites both into one of:

- ``absorbed`` (mla=2, and decode of mla=3): W_UK (the K half of kv_b) is folded into the query,
  ``q = [q_nope·W_UK ; q_pe]`` [T, H, 576]; ``mla.attn_absorbed`` runs over the latent cache rows
  with V = their first 512 columns; W_UV (the V half) is applied to the [T, H, 512] output.
- ``decompress`` (prompt chunks of mla=3): the sequence's latent rows are gathered and expanded
  with kv_b into K [N, H, 192] and V [N, H, 128]; ``mla.attn_decompressed`` runs 192/128
  attention (3.4x fewer attention FLOPs than absorbed).
- ``decompressed_cache`` (mla=0, the reference layout): the cache holds per-head K and V, written
  decompressed; the cache parameter's width becomes H*(192+128).

W_UK / W_UV are Relax expressions of the kv_b parameter, so LiftTransformParams moves them into
the weight transform that runs once at compile time.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R

from mla_compiler.errors import ConfigError
from mla_compiler.model_export.config import MLADims
from mla_compiler.passes import pseudo

FORMS = ("absorbed", "decompress", "decompressed_cache")


def _slice(x, axis: int, begin: int, end: int):
    return R.strided_slice(x, axes=[axis], begin=[begin], end=[end])


def _head_batched_matmul(x, w):
    """x [T, H, a] @ w [H, a, b] -> [T, H, b] (a batched product over heads)."""
    xt = R.permute_dims(x, [1, 0, 2])  # [H, T, a]
    return R.permute_dims(R.matmul(xt, w), [1, 0, 2])


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, *, dims: MLADims, form: str, kv_b_of_layer: dict, new_cache):
        super().__init__(mod)
        self.dims, self.form = dims, form
        self.kv_b_of_layer = kv_b_of_layer
        self.new_cache = new_cache

    def _emit(self, expr, name="lv"):
        return self.builder_.emit(expr, name_hint=name)

    def visit_var_(self, op):
        if self.new_cache is not None and op.same_as(self.new_cache[0]):
            return self.new_cache[1]
        return super().visit_var_(op)

    def visit_call_(self, op):
        name = pseudo.name_of(op)
        if name == "cache_write" and self.form == "decompressed_cache":
            return self._write_decompressed(op)
        if name == "attention":
            return self._attention(op)
        return super().visit_call_(op)

    def _args(self, op):
        return [self.visit_expr(a) for a in pseudo.args_of(op)]

    def _expand(self, latent, kv_b):
        """latent rows [N, R+dr] -> K [N, H, dn+dr], V [N, H, dv] via kv_b [H*(dn+dv), R]."""
        d = self.dims
        n = latent.ty.shape[0]
        c = _slice(latent, 1, 0, d.kv_lora_rank)
        k_pe = _slice(latent, 1, d.kv_lora_rank, d.latent_dim)  # [N, dr]
        kv = self._emit(R.matmul(c, R.permute_dims(kv_b, [1, 0])))  # [N, H*(dn+dv)]
        kv = R.reshape(kv, [n, d.heads, d.qk_nope_head_dim + d.v_head_dim])
        k_nope = _slice(kv, 2, 0, d.qk_nope_head_dim)
        v = self._emit(_slice(kv, 2, d.qk_nope_head_dim, d.qk_nope_head_dim + d.v_head_dim))
        k_pe = R.broadcast_to(R.expand_dims(k_pe, 1), [n, d.heads, d.qk_rope_head_dim])
        k = self._emit(R.concat([k_nope, k_pe], axis=2), "k")  # [N, H, 192]
        return k, v

    def _write_decompressed(self, op):
        cache, rows, slot_rows, layer = self._args(op)
        d = self.dims
        kv_b = self.visit_expr(self.kv_b_of_layer[int(pseudo.scalar(layer))])
        rows = self._emit(R.astype(rows, kv_b.ty.dtype))
        k, v = self._expand(rows, kv_b)
        t = rows.ty.shape[0]
        row = R.concat(
            [R.reshape(k, [t, d.heads * d.qk_head_dim]), R.reshape(v, [t, d.heads * d.v_head_dim])],
            axis=1,
        )  # [T, H*(192+128)]
        row = self._emit(R.astype(row, cache.ty.dtype), "kv_row")
        return pseudo.emit("cache_write", [cache, row, slot_rows, layer], cache.ty)

    def _attention(self, op):
        q_nope, q_pe, cache, kv_b, q_indptr, kv_rows, kv_indptr, layer, sm_scale = self._args(op)
        d = self.dims
        t = q_nope.ty.shape[0]
        dtype = q_nope.ty.dtype
        n = kv_rows.ty.shape[0]
        if self.form == "absorbed":
            w = R.reshape(kv_b, [d.heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank])
            w_uk = self._emit(_slice(w, 1, 0, d.qk_nope_head_dim), "w_uk")  # [H, dn, R]
            w_uv = _slice(w, 1, d.qk_nope_head_dim, d.qk_nope_head_dim + d.v_head_dim)
            w_uv = self._emit(R.permute_dims(w_uv, [0, 2, 1]), "w_uv")  # [H, R, dv]
            q_lat = self._emit(_head_batched_matmul(q_nope, w_uk), "q_latent")  # [T, H, R]
            q = self._emit(R.concat([q_lat, q_pe], axis=2), "q")  # [T, H, R+dr]
            out_ty = [
                relax.TensorType([t, d.heads, d.kv_lora_rank], dtype),
                relax.TensorType([t, d.heads], "float32"),
            ]
            res = self._emit(
                pseudo.emit(
                    "attn_absorbed",
                    [q, cache, q_indptr, kv_rows, kv_indptr, layer, sm_scale],
                    relax.TupleType(out_ty),
                ),
                "attn",
            )
            o_lat = self._emit(relax.TupleGetItem(res, 0))  # [T, H, R]
            return _head_batched_matmul(o_lat, w_uv)  # [T, H, dv]
        if self.form == "decompress":
            latent = self._emit(
                pseudo.emit(
                    "cache_gather",
                    [cache, kv_rows, layer],
                    relax.TensorType([n, d.latent_dim], cache.ty.dtype),
                ),
                "latent",
            )
            k, v = self._expand(self._emit(R.astype(latent, dtype)), kv_b)
        else:  # decompressed_cache
            width = d.heads * (d.qk_head_dim + d.v_head_dim)
            rows = self._emit(
                pseudo.emit(
                    "cache_gather",
                    [cache, kv_rows, layer],
                    relax.TensorType([n, width], cache.ty.dtype),
                ),
                "kv",
            )
            rows = self._emit(R.astype(rows, dtype))
            split = d.heads * d.qk_head_dim
            k = self._emit(R.reshape(_slice(rows, 1, 0, split), [n, d.heads, d.qk_head_dim]))
            v = self._emit(R.reshape(_slice(rows, 1, split, width), [n, d.heads, d.v_head_dim]))
        q = self._emit(R.concat([q_nope, q_pe], axis=2), "q")  # [T, H, 192]
        out_ty = [
            relax.TensorType([t, d.heads, d.v_head_dim], dtype),
            relax.TensorType([t, d.heads], "float32"),
        ]
        res = self._emit(
            pseudo.emit(
                "attn_decompressed",
                [q, k, v, q_indptr, kv_indptr, sm_scale],
                relax.TupleType(out_ty),
            ),
            "attn",
        )
        return relax.TupleGetItem(res, 0)


def _kv_b_by_layer(func: relax.Function) -> dict[int, relax.Expr]:
    found: dict[int, relax.Expr] = {}

    @relax.expr_functor.visitor
    class _Scan(relax.PyExprVisitor):
        def visit_call_(self, op):
            if pseudo.name_of(op) == "attention":
                args = pseudo.args_of(op)
                found[int(pseudo.scalar(args[7]))] = args[3]

    _Scan().visit_expr(func)
    return found


def rewrite_function(func: relax.Function, *, dims: MLADims, form: str, mod=None) -> relax.Function:
    if form not in FORMS:
        raise ConfigError(f"unknown attention form {form!r}: use one of {FORMS}")
    kv_b = _kv_b_by_layer(func)
    params = list(func.params)
    new_cache = None
    if form == "decompressed_cache":
        idx = [p.name for p in params].index("cache")
        old = params[idx]
        layers, rows, _ = old.ty.shape
        width = dims.heads * (dims.qk_head_dim + dims.v_head_dim)
        params[idx] = relax.Var("cache", relax.TensorType([layers, rows, width], old.ty.dtype))
        new_cache = (old, params[idx])
    rw = _Rewriter(mod, dims=dims, form=form, kv_b_of_layer=kv_b, new_cache=new_cache)
    body = rw.visit_expr(func.body)
    return relax.Function(params, body, is_pure=func.is_pure, attrs=func.attrs)


def RewriteMLAAttention(*, dims: MLADims, forms: dict[str, str]) -> tvm.transform.Pass:  # noqa: N802
    """Rewrite each named Relax function into its form, e.g. ``{"prefill": "decompress"}``."""

    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for name, form in forms.items():
            gv = out.get_global_var(name)
            out[gv] = rewrite_function(out[gv], dims=dims, form=form, mod=out)
        return out

    return tvm.transform.module_pass(transform, opt_level=0, name="RewriteMLAAttention")
