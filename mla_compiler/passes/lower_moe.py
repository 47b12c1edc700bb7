"""LowerMoE: lower each ``mla.moe`` pseudo-call (routing + routed experts).

This is the dense fallback: DeepSeek-V2 softmax routing (greedy or group-limited greedy,
``norm_topk_prob``, ``routed_scaling_factor``) in Relax ops, then every expert on every token as
two batched matmuls weighted by the (mostly zero) routing weights. Correct everywhere and simple
to verify; it does E/k times the needed expert FLOPs, so the fused-MoE kernels replace it where
they apply.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R

from mla_compiler.passes import pseudo
from mla_compiler.schedules.topk import topk as topk_kernel


def route(
    x,
    router,
    *,
    top_k: int,
    method: int,
    n_group: int,
    topk_group: int,
    norm: bool,
    scaling: float,
    emit,
    topk,
):
    """Relax routing: x [T, D], router [E, D] -> dense weights [T, E] (float32, zeros off top-k)."""
    t = x.ty.shape[0]
    e = router.ty.shape[0]
    logits = R.matmul(R.astype(x, "float32"), R.permute_dims(R.astype(router, "float32"), [1, 0]))
    scores = emit(R.nn.softmax(logits, axis=-1))  # [T, E]
    if method == 1:  # group_limited_greedy
        per = int(e) // n_group
        group_scores = R.max(R.reshape(scores, [t, n_group, per]), axis=-1)  # [T, G]
        _, top_groups = topk(emit(group_scores), topk_group)
        mask = R.sum(
            R.one_hot(top_groups, relax.prim_value(1.0), relax.prim_value(0.0), n_group), 1
        )
        mask = R.reshape(R.broadcast_to(R.expand_dims(mask, 2), [t, n_group, per]), [t, e])
        scores = emit(R.multiply(scores, mask))
    weights, ids = topk(scores, top_k)
    if norm and top_k > 1:
        total = R.add(R.sum(weights, axis=-1, keepdims=True), relax.const(1e-20, "float32"))
        weights = emit(R.divide(weights, total))
    weights = R.multiply(weights, relax.const(scaling, "float32"))
    zeros = R.zeros(scores.ty.shape, "float32")
    return emit(R.scatter_elements(zeros, ids, weights, axis=1))  # [T, E]


@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.target = target
        self.kernels: dict[tuple[int, int], relax.GlobalVar] = {}

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _topk(self, x, k: int):
        """(values [T, k] f32, indices [T, k] int32) of x [T, W] through ``moe_topk``."""
        width = int(x.ty.shape[1])
        if (width, k) not in self.kernels:
            func = topk_kernel(width, k, target=self.target).with_attr("tirx.is_scheduled", True)
            self.kernels[(width, k)] = self.builder_.add_func(
                func.without_attr("global_symbol"), f"moe_topk_{width}_{k}"
            )
        t = x.ty.shape[0]
        out = self._emit(
            relax.call_tir(
                self.kernels[(width, k)],
                [x],
                out_ty=[relax.TensorType([t, k], "float32"), relax.TensorType([t, k], "int32")],
            )
        )
        return self._emit(relax.TupleGetItem(out, 0)), self._emit(relax.TupleGetItem(out, 1))

    def visit_call_(self, op):
        if pseudo.name_of(op) != "moe":
            return super().visit_call_(op)
        args = [self.visit_expr(a) for a in pseudo.args_of(op)]
        x, router, gate_up, down = args[:4]
        top_k, method, n_group, topk_group, norm, scaling = (pseudo.scalar(a) for a in args[4:])
        dense_w = route(
            x,
            router,
            top_k=int(top_k),
            method=int(method),
            n_group=int(n_group),
            topk_group=int(topk_group),
            norm=bool(norm),
            scaling=float(scaling),
            emit=self._emit,
            topk=self._topk,
        )
        inter = down.ty.shape[2]
        h = self._emit(R.matmul(R.expand_dims(x, 0), R.permute_dims(gate_up, [0, 2, 1])))
        gate = R.strided_slice(h, axes=[2], begin=[0], end=[inter])
        up = R.strided_slice(h, axes=[2], begin=[inter], end=[2 * inter])
        act = self._emit(R.multiply(R.nn.silu(gate), up))  # [E, T, I]
        y = self._emit(R.matmul(act, R.permute_dims(down, [0, 2, 1])))  # [E, T, D]
        w = R.expand_dims(R.permute_dims(dense_w, [1, 0]), 2)  # [E, T, 1]
        out = R.sum(R.multiply(R.astype(y, "float32"), w), axis=0)  # [T, D]
        return R.astype(out, x.ty.dtype)


def LowerMoE(*, target: tvm.target.Target) -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod, target)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, new)
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerMoE")
