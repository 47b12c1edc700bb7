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

from mla_compiler import kernel_configs, kernels
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.passes import pseudo
from mla_compiler.passes.dequantize_weights import quantized_views
from mla_compiler.schedules.target import is_gpu
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
    def __init__(self, mod, target, choice: KernelChoice):
        super().__init__(mod)
        self.target, self.choice = target, choice
        self.kernels: dict[tuple[int, int], relax.GlobalVar] = {}
        self.views: dict = {}  # the function's quantized weights (DequantizeWeights)

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _topk(self, x, k: int):
        """(values [T, k] f32, indices [T, k] int32) of x [T, W] through ``moe_topk``."""
        width = int(x.ty.shape[1])
        if (width, k) not in self.kernels:
            func = kernels.mark_scheduled(topk_kernel(width, k, target=self.target))
            self.kernels[(width, k)] = self.builder_.add_func(func, f"moe_topk_{width}_{k}")
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
        raw = pseudo.args_of(op)
        args = [self.visit_expr(a) for a in raw]
        x, router, gate_up, down = args[:4]
        quant = (self.views.get(raw[2]), self.views.get(raw[3]))  # blocks the kernels can read
        top_k, method, n_group, topk_group, norm, scaling = (pseudo.scalar(a) for a in args[4:])
        routing = dict(
            top_k=int(top_k),
            method=int(method),
            n_group=int(n_group),
            topk_group=int(topk_group),
            norm=bool(norm),
            scaling=float(scaling),
        )
        fused = self._fused(x, router, gate_up, down, quant=quant, **routing)
        if fused is not None:
            return fused
        dense_w = route(x, router, **routing, emit=self._emit, topk=self._topk)
        inter = down.ty.shape[2]
        h = self._emit(R.matmul(R.expand_dims(x, 0), R.permute_dims(gate_up, [0, 2, 1])))
        gate = R.strided_slice(h, axes=[2], begin=[0], end=[inter])
        up = R.strided_slice(h, axes=[2], begin=[inter], end=[2 * inter])
        act = self._emit(R.multiply(R.nn.silu(gate), up))  # [E, T, I]
        y = self._emit(R.matmul(act, R.permute_dims(down, [0, 2, 1])))  # [E, T, D]
        w = R.expand_dims(R.permute_dims(dense_w, [1, 0]), 2)  # [E, T, 1]
        out = R.sum(R.multiply(R.astype(y, "float32"), w), axis=0)  # [T, D]
        return R.astype(out, x.ty.dtype)

    def _interleaved(self, gate_up):
        """[E, 2I, D] gate rows then up rows -> rows interleaved in groups of SWIGLU_GROUP for
        the fused SiLU·up epilogues (a weight transform: LiftTransformParams moves it to load
        time)."""
        from mla_compiler.schedules import gemm as G

        e, two_i, d = (int(v) for v in gate_up.ty.shape)
        g = G.SWIGLU_GROUP
        w = R.reshape(gate_up, [e, 2, two_i // 2 // g, g, d])
        return self._emit(R.reshape(R.permute_dims(w, [0, 2, 1, 3, 4]), [e, two_i, d]))

    def _add(self, key, make, name):
        """The kernel for ``key``; ``make()`` builds it only the first time (every MoE layer
        asks for the same kernels: building them each time cost V2-Lite ~30 s)."""
        if key not in self.kernels:
            func = kernels.mark_scheduled(make())
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _weights(self, gate_up, down, quant):
        """(gate_up, down, gate_up format, down format) in the layouts the expert kernels read:
        a quantized weight as its blocks (``[E, rows, row bytes]`` uint8; gate_up in the
        checkpoint's ``[gate; up]`` row order, the kernels pair the rows) and its format; else
        the values (gate_up interleaved, :meth:`_interleaved`) and None."""
        gu_view, dn_view = quant
        if gu_view is None:
            gate_up, gu_fmt = self._interleaved(gate_up), None
        else:
            gate_up, gu_fmt = gu_view.blocks(gate_up.ty.shape, self._emit), gu_view.fmt
        if dn_view is None:
            return gate_up, down, gu_fmt, None
        return gate_up, dn_view.blocks(down.ty.shape, self._emit), gu_fmt, dn_view.fmt

    def _fused(
        self, x, router, gate_up, down, *, quant, top_k, method, n_group, topk_group, norm, scaling
    ):
        """The fused MoE kernels of ``schedules.moe`` (GPU, f16/bf16): routing, tokens grouped
        by expert on the device, grouped gate+up GEMM with SiLU·up, grouped down GEMM with the
        routing weight, gather-sum back to token order (the grouped GEMMs on wgmma where
        ``gemm_wgmma.moe_config`` applies: sm_90a, weights not quantized). ``quant``: the
        views of quantized gate_up / down (or None): their kernels read the blocks. None where
        they do not apply."""
        from mla_compiler.schedules import gemm as G
        from mla_compiler.schedules import gemm_wgmma as W
        from mla_compiler.schedules import moe as M
        from mla_compiler.schedules import moe_gemv as MG

        dtype = x.ty.dtype.dtype
        e, two_i, d = (int(v) for v in gate_up.ty.shape)
        inter = two_i // 2
        if not is_gpu(self.target) or dtype not in ("float16", "bfloat16"):
            return None
        # SiLU·up pairs gate/up rows in groups of SWIGLU_GROUP; 16-byte (cp.async / vector)
        # loads need rows of a multiple of 8 halves. Partial block tiles are fine (predicated
        # loads; the D = I = 64 H100 segfault was the gather left on the host, fixed in moe.py).
        if inter % G.SWIGLU_GROUP or d % 8 or inter % 8:
            return None
        cfg = M.default_config(self.target)
        bm = cfg.block_m
        spec = M.RouteSpec(
            num_experts=e,
            top_k=top_k,
            method=M.ROUTE_METHODS[method],
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=norm,
            routed_scaling_factor=scaling,
        )
        key = (e, top_k, method, n_group, topk_group, norm, scaling, d, inter, dtype)
        route_gv = self._add(
            ("route",) + key, lambda: M.moe_route(spec, target=self.target), "moe_route"
        )
        t = x.ty.shape[0]
        logits = self._emit(
            R.matmul(R.astype(x, "float32"), R.permute_dims(R.astype(router, "float32"), [1, 0]))
        )  # [T, E]
        routed = self._emit(
            relax.call_tir(
                route_gv,
                [logits],
                out_ty=[
                    relax.TensorType([t, top_k], "float32"),
                    relax.TensorType([t, top_k], "int32"),
                ],
            )
        )
        weights = self._emit(relax.TupleGetItem(routed, 0))
        ids = self._emit(relax.TupleGetItem(routed, 1))
        gate_up, down, gu_fmt, dn_fmt = self._weights(gate_up, down, quant)
        key = key + (gu_fmt, dn_fmt)
        if isinstance(t, tvm.tirx.IntImm) and int(t) <= MG.GEMV_MAX_TOKENS:
            # decode: per-(token, slot) expert GEMVs, no grouping pass, the combine folded
            return self._fused_gemv(
                x, gate_up, down, weights, ids, key=key, e=e, d=d, inter=inter,
                formats=(gu_fmt, dn_fmt),
            )  # fmt: skip
        # sm_90a: warpgroup MMAs (`compile --tuning-db`: the tile measured fastest, if recorded)
        shape = dict(hidden=d, inter=inter, num_experts=e, top_k=top_k)
        wg = None
        if gu_fmt is None and dn_fmt is None:  # the wgmma kernels read f16/bf16 weights only
            wg = kernel_configs.moe_config(self.choice, self.target, **shape)
        if wg is not None:
            bm = wg.block_m
            grouped_kw = dict(num_experts=e, top_k=top_k, dtype=dtype, target=self.target)

            def gate_up_fn():
                return W.moe_grouped("gate_up", d, inter, config=wg, **grouped_kw)

            def down_fn():
                return W.moe_grouped("down", d, inter, config=wg, **grouped_kw)
        else:
            kw = dict(num_experts=e, top_k=top_k, dtype=dtype, target=self.target)

            def gate_up_fn():
                return M.moe_gate_up(d, inter, weight_format=gu_fmt, **kw)

            def down_fn():
                return M.moe_down(d, inter, weight_format=dn_fmt, **kw)

        align_gv = self._add(
            ("align", bm) + key,
            lambda: M.moe_align(e, top_k, block_m=bm, target=self.target),
            "moe_align",
        )
        gate_up_gv = self._add(("gate_up",) + key, gate_up_fn, "moe_gate_up")
        down_gv = self._add(("down",) + key, down_fn, "moe_down")
        combine_gv = self._add(
            ("combine",) + key,
            lambda: M.moe_combine(d, top_k=top_k, dtype=dtype, target=self.target),
            "moe_combine",
        )
        nb = M.num_row_blocks(t, top_k=top_k, num_experts=e, block_m=bm)
        grouped = self._emit(
            relax.call_tir(
                align_gv,
                [ids],
                out_ty=[
                    relax.TensorType([nb * bm], "int32"),  # sorted_rows
                    relax.TensorType([nb], "int32"),  # block_expert
                    relax.TensorType([t * top_k], "int32"),  # row_of
                    relax.TensorType([e + 1], "int32"),  # expert_offsets
                    relax.TensorType([(t + M.CHUNK - 1) // M.CHUNK, e], "int32"),  # workspace
                ],
            )
        )
        sorted_rows = self._emit(relax.TupleGetItem(grouped, 0))
        block_expert = self._emit(relax.TupleGetItem(grouped, 1))
        row_of = self._emit(relax.TupleGetItem(grouped, 2))
        h = self._emit(
            relax.call_tir(
                gate_up_gv,
                [x, sorted_rows, block_expert, gate_up],
                out_ty=relax.TensorType([nb * bm, inter], dtype),
            )
        )
        y = self._emit(
            relax.call_tir(
                down_gv,
                [h, sorted_rows, block_expert, down, weights],
                out_ty=relax.TensorType([nb * bm, d], dtype),
            )
        )
        return relax.call_tir(combine_gv, [y, row_of], out_ty=relax.TensorType([t, d], dtype))

    def _fused_gemv(self, x, gate_up, down, weights, ids, *, key, e, d, inter, formats):
        """Small static T: gate+up GEMVs per (token, slot), down GEMVs summed per token."""
        from mla_compiler.schedules import moe_gemv as MG

        dtype = x.ty.dtype.dtype
        t, top_k = x.ty.shape[0], int(ids.ty.shape[1])
        kw = dict(num_experts=e, top_k=top_k, dtype=dtype, target=self.target)
        gu_fmt, dn_fmt = formats
        if gu_fmt is not None and dn_fmt is not None:
            return self._quant_gemv(
                x, gate_up, down, weights, ids, key=key, kw=kw, d=d, i=inter, formats=formats
            )
        gate_up_gv = self._add(
            ("gate_up_gemv",) + key,
            lambda: MG.moe_gate_up_gemv(d, inter, weight_format=gu_fmt, **kw),
            "moe_gate_up_gemv",
        )
        down_gv = self._add(
            ("down_gemv",) + key,
            lambda: MG.moe_down_gemv(d, inter, weight_format=dn_fmt, **kw),
            "moe_down_gemv",
        )
        h = self._emit(
            relax.call_tir(
                gate_up_gv, [x, ids, gate_up], out_ty=relax.TensorType([t * top_k, inter], dtype)
            )
        )
        return relax.call_tir(
            down_gv, [h, ids, down, weights], out_ty=relax.TensorType([t, d], dtype)
        )

    def _quant_gemv(self, x, gate_up, down, weights, ids, *, key, kw, d, i, formats):
        """Both expert weights quantized, small static T: ``quant_moe_gemv``'s four kernels
        (gate/up GEMVs per slot on the stacked blocks, SiLU·up, down GEMVs, weighted sum)."""
        from mla_compiler.schedules import gemm as G
        from mla_compiler.schedules import quant_moe_gemv as QM

        t, dtype, top_k = int(x.ty.shape[0]), kw["dtype"], kw["top_k"]
        s = t * top_k
        gv = {
            "gate_up": self._add(("qgemv_gate_up", t) + key, lambda: QM.quant_moe_gemv(
                t, 2 * i, d, weight_format=formats[0], **kw), "quant_moe_gemv_gate_up"),
            "down": self._add(("qgemv_down", t) + key, lambda: QM.quant_moe_gemv(
                t, d, i, weight_format=formats[1], x_per_slot=True, **kw), "quant_moe_gemv_down"),
            "silu": self._add(("silu_mul", s) + key, lambda: G.silu_mul_epilogue(
                s, i, layout="stacked", dtype=dtype, target=self.target), "moe_silu_mul"),
            "sum": self._add(("weighted_sum", t) + key, lambda: QM.moe_weighted_sum(
                t, d, top_k=top_k, dtype=dtype, target=self.target), "moe_weighted_sum"),
        }  # fmt: skip
        ty = lambda *shape: relax.TensorType(list(shape), dtype)  # noqa: E731
        g = self._emit(relax.call_tir(gv["gate_up"], [x, gate_up, ids], out_ty=ty(s, 2 * i)))
        h = self._emit(relax.call_tir(gv["silu"], [g], out_ty=ty(s, i)))
        y = self._emit(relax.call_tir(gv["down"], [h, down, ids], out_ty=ty(s, d)))
        return relax.call_tir(gv["sum"], [y, weights], out_ty=ty(t, d))


def LowerMoE(*, target: tvm.target.Target, choice: KernelChoice) -> tvm.transform.Pass:  # noqa: N802
    """Lower the MoE blocks to kernels; ``choice`` picks the grouped GEMMs' tuned configs."""

    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod, target, choice)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lower.views = quantized_views(mod, func)
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, new)
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerMoE")
