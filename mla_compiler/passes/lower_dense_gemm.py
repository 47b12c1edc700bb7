"""LowerDenseGemm: every dense product with a weight becomes a ``call_tir`` to ``schedules.gemm``.

GPU targets with f16/bf16 activations only (CPU builds keep ``R.matmul``). Patterns, matched on
the dataflow bindings (``W`` is a weight: an expression of the function's weight parameters
only, which LiftTransformParams moves to load time):

- ``matmul(x, permute_dims(W, [1, 0]))``, x ``[..., K]`` (leading dims flattened to M) ->
  ``gemm``; ``add(mm, r)`` / ``add(r, mm)`` of a single-use ``mm`` -> epilogue ``residual``.
- ``multiply(silu(mm_gate), mm_up)`` (``silu`` as ``R.nn.silu`` or the exported
  ``astype(astype(g, f32) * sigmoid(astype(g, f32)))``), both products of the same x ->
  epilogue ``silu_mul`` with ``[Wg; Wu]`` concatenated and SWIGLU-interleaved in Relax.
- ``matmul(astype(x, f32), permute_dims(astype(W, f32), [1, 0]))`` (the MoE router) -> a gemm
  of the f16 operands with f32 output.
- ``permute_dims(matmul(permute_dims(x, [1, 0, 2]), W), [1, 0, 2])`` with x ``[T, H, K]`` and
  W ``[H, K, N]`` (the absorbed W_UK / W_UV per-head products) -> a head-batched gemm that
  reads ``[T, H, K]`` and writes ``[T, H, N]`` in place (W transposed to ``[H, N, K]``).

Static M <= 16 (decode) gets the small-M tensor-core config, symbolic M the large-tile one.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm_ffi import structural_equal

from mla_compiler import kernel_configs, kernels
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.passes.dequantize_weights import quantized_views
from mla_compiler.schedules import gemm as G
from mla_compiler.schedules import quant_gemv as QG
from mla_compiler.schedules.target import is_gpu

DTYPES = ("float16", "bfloat16")


def _op(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _axes(call) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def _dtype(expr) -> str:
    return expr.ty.dtype.dtype if hasattr(expr.ty.dtype, "dtype") else str(expr.ty.dtype)


def _shape(expr) -> list:
    return list(expr.ty.shape)


def _static(v) -> int | None:
    return int(v) if isinstance(v, tvm.tirx.IntImm) else None


class _Analysis:
    """Bindings, use counts and weight-derived vars of one function (before rewriting);
    ``views``: the dequantized weights (``DequantizeWeights``) and their blocks."""

    def __init__(self, func: relax.Function, mod: tvm.IRModule):
        self.value = relax.analysis.get_var2val(func)
        n_in = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 0
        self.weights = {p for p in func.params[n_in:]} if n_in else set()
        self.views = quantized_views(mod, func)
        self.weights |= set(self.views)
        self.uses: dict = {}
        analysis = self

        @relax.expr_functor.visitor
        class _Count(relax.PyExprVisitor):
            def visit_var_(self, v):
                analysis.uses[v] = analysis.uses.get(v, 0) + 1

            def visit_dataflow_var_(self, v):
                analysis.uses[v] = analysis.uses.get(v, 0) + 1

        _Count().visit_expr(func.body)
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and self._of_weights(b.value):
                    self.weights.add(b.var)

    def _of_weights(self, value) -> bool:
        if _op(value) in (None, "relax.call_tir", "relax.call_tir_inplace"):
            return False
        free = relax.analysis.free_vars(value)
        return len(free) > 0 and all(v in self.weights for v in free)

    def bound(self, expr, op: str | None = None):
        """The call bound to var ``expr`` (optionally only if it is ``op``)."""
        val = self.value.get(expr) if isinstance(expr, relax.Var) else None
        if val is None or (op is not None and _op(val) != op):
            return None
        return val

    def single_use(self, var) -> bool:
        return self.uses.get(var, 0) == 1


class _Product:
    """A matched product: x [.., K] (or [T, H, K]), weight expr in [N, K] ([H, N, K]) layout."""

    def __init__(self, x, w, *, out_dtype=None, heads=False, transpose_w=False):
        self.x, self.w, self.out_dtype, self.heads = x, w, out_dtype, heads
        self.transpose_w = transpose_w  # heads: W given as [H, K, N]


def _match_dense(a: _Analysis, var) -> _Product | None:
    """``var = matmul(x, permute_dims(W, [1, 0]))`` (also the f32 router form)."""
    mm = a.bound(var, "relax.matmul")
    if mm is None:
        return None
    x, wt = mm.args
    perm = a.bound(wt, "relax.permute_dims")
    if perm is None or _axes(perm) not in ([1, 0], None) or len(_shape(wt)) != 2:
        return None
    w = perm.args[0]
    if w not in a.weights:
        return None
    if _dtype(x) == "float32" and _dtype(mm) == "float32":  # router: both sides cast from f16
        xc, wc = a.bound(x, "relax.astype"), a.bound(w, "relax.astype")
        if xc is None or wc is None:
            return None
        x, w = xc.args[0], wc.args[0]
        if _dtype(x) not in DTYPES or _dtype(w) != _dtype(x):
            return None
        return _Product(x, w, out_dtype="float32")
    if _dtype(x) not in DTYPES or _dtype(w) != _dtype(x) or _dtype(mm) != _dtype(x):
        return None
    return _Product(x, w)


def _match_heads(a: _Analysis, var) -> tuple[relax.Var, _Product] | None:
    """``var = permute_dims(mm, [1, 0, 2])``, ``mm = matmul(permute_dims(x, [1, 0, 2]), W)``."""
    out = a.bound(var, "relax.permute_dims")
    if out is None or _axes(out) != [1, 0, 2]:
        return None
    mm_var = out.args[0]
    mm = a.bound(mm_var, "relax.matmul")
    if mm is None or not a.single_use(mm_var):
        return None
    xp, w = mm.args
    perm = a.bound(xp, "relax.permute_dims")
    if perm is None or _axes(perm) != [1, 0, 2] or w not in a.weights or len(_shape(w)) != 3:
        return None
    x = perm.args[0]
    if _dtype(x) not in DTYPES or _dtype(w) != _dtype(x) or _dtype(mm) != _dtype(x):
        return None
    return mm_var, _Product(x, w, heads=True, transpose_w=True)


def _silu_arg(a: _Analysis, expr):
    """(g, private) where ``expr`` is silu(g) in one of its exported spellings (else
    (None, False)); ``private``: g and the chain's vars are used by the chain only, so g's
    product is dead once the chain is fused."""
    u = a.uses.get
    if (v := a.bound(expr, "relax.nn.silu")) is not None:
        g = v.args[0]
        return g, u(expr, 0) == 1 and u(g, 0) == 1
    cast = a.bound(expr, "relax.astype")
    inner = cast.args[0] if cast is not None else expr
    mul = a.bound(inner, "relax.multiply")
    if mul is None:
        return None, False
    p, q = mul.args
    for d, s in ((p, q), (q, p)):
        sig = a.bound(s, "relax.sigmoid")
        if sig is not None and sig.args[0].same_as(d):
            chain = u(expr, 0) == 1 and u(inner, 0) == 1 and u(s, 0) == 1 and u(d, 0) == 2
            up = a.bound(d, "relax.astype")
            if up is not None:
                return up.args[0], chain and u(up.args[0], 0) == 1
            return d, chain
    return None, False


@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    def __init__(self, mod, target, choice: KernelChoice):
        super().__init__(mod)
        self.mod, self.target, self.choice = mod, target, choice
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.plan: dict = {}  # original call -> (kind, data)

    # ----------------------------------------------------------------------------- planning

    def analyse(self, func: relax.Function) -> None:
        a = _Analysis(func, self.mod)
        self.views = a.views
        self.plan, self.fused = {}, []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
                    found = self._plan_one(a, b.var, b.value)
                    if found is not None:
                        self.plan[b.value] = found
        for dead in self.fused:  # products folded into an epilogue stay unlowered (and dead)
            self.plan.pop(dead, None)

    def _plan_one(self, a: _Analysis, var, call):
        op = _op(call)
        if op == "relax.add":
            for mm, r in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                p = _match_dense(a, mm)
                if (
                    p is not None
                    and p.out_dtype is None
                    and a.single_use(mm)
                    and isinstance(r.ty, relax.TensorType)
                    and _dtype(r) == _dtype(call)
                    and structural_equal(r.ty.shape, call.ty.shape)
                    and structural_equal(call.ty.shape, a.value[mm].ty.shape)
                ):
                    self.fused.append(a.value[mm])
                    return "residual", (p, r)
        if op == "relax.multiply":
            for s, u in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                g, private = _silu_arg(a, s)
                pg, pu = _match_dense(a, g), _match_dense(a, u)
                if (
                    pg is not None
                    and pu is not None
                    and pg.out_dtype is None
                    and pu.out_dtype is None
                    and pg.x.same_as(pu.x)
                    and a.single_use(u)
                    and structural_equal(pg.w.ty.shape, pu.w.ty.shape)
                    and _dtype(call) == _dtype(pg.x)
                    and structural_equal(call.ty.shape, a.value[u].ty.shape)
                ):
                    if int(_shape(pg.w)[0]) % G.SWIGLU_GROUP:
                        continue
                    self.fused.append(a.value[u])
                    if private:
                        self.fused.append(a.value[g])
                    return "silu_mul", (pg, pu)
        if op == "relax.permute_dims" and (found := _match_heads(a, var)) is not None:
            return "heads", found[1]
        if op == "relax.matmul" and (p := _match_dense(a, var)) is not None:
            return "plain", p
        return None

    # ---------------------------------------------------------------------------- rewriting

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def _kernel(self, m, n, k, **kw) -> relax.GlobalVar:
        key = (m, n, k, tuple(sorted(kw.items())))
        if key not in self.kernels:
            plain = kw.get("batch") is None and kw.get("weight_format") is None
            if plain:  # sm_90a prompt chunks: wgmma, tuned where recorded
                wg = kernel_configs.dense_gemm_config(
                    self.choice,
                    m,
                    n,
                    k,
                    target=self.target,
                    epilogue=kw.get("epilogue"),
                    out_dtype=kw.get("out_dtype"),
                )
                kw = kw if wg is None else {**kw, "config": wg}
            func = G.gemm(m, n, k, target=self.target, **kw)
            name = G.kernel_name(
                m,
                n,
                k,
                epilogue=kw.get("epilogue"),
                out_dtype=kw.get("out_dtype"),
                batch=kw.get("batch"),
                weight_format=kw.get("weight_format"),
            )
            self.kernels[key] = self.builder_.add_func(kernels.mark_scheduled(func), name)
        return self.kernels[key]

    def _add(self, key, make) -> relax.GlobalVar:
        """A kernel built by ``make()`` once per ``key``, named by its global symbol."""
        if key not in self.kernels:
            func = make()
            name = str(func.attrs["global_symbol"])
            self.kernels[key] = self.builder_.add_func(kernels.mark_scheduled(func), name)
        return self.kernels[key]

    def _blocks(self, w):
        """(blocks, format) of a weight the kernels read quantized (a view of
        DequantizeWeights), else None: its blocks ``[N, row_bytes(K)]`` replace the values."""
        view = self.views.get(w)
        if view is None:
            return None
        return view.blocks(_shape(w), self._emit), view.fmt

    def _quant_decode(self, x, wq, fmt, *, m, n, k, epilogue, residual):
        """<= 8 tokens: ``quant_gemv`` over the blocks (the residual added before its store);
        SiLU·up as its own kernel after it."""
        dtype, nc = _dtype(x), G.weight_layout(n, k, epilogue=epilogue)[0]
        res = epilogue == "residual"
        gv = self._add(
            ("quant_gemv", fmt, m, nc, k, dtype, res),
            lambda: QG.quant_gemv(
                m, nc, k, target=self.target, weight_format=fmt, dtype=dtype, residual=res
            ),
        )
        args = [x, wq] + ([residual] if res else [])
        acc = relax.call_tir(gv, args, out_ty=relax.TensorType([m, nc], dtype))
        if epilogue != "silu_mul":
            return acc
        epi = self._add(
            ("silu_mul", m, n, dtype),
            lambda: G.silu_mul_epilogue(m, n, dtype=dtype, target=self.target),
        )
        return relax.call_tir(epi, [self._emit(acc)], out_ty=relax.TensorType([m, n], dtype))

    def _call(self, p: _Product, *, epilogue=None, w=None, fmt=None, residual=None, n=None):
        x = self.visit_expr(p.x)
        if w is None:
            quant = None if p.heads or p.out_dtype else self._blocks(p.w)
            w, fmt = quant if quant is not None else (self.visit_expr(p.w), None)
        dtype = _dtype(x)
        shape = _shape(x)
        k = int(shape[-1])
        if p.heads:
            t, h = shape[0], int(shape[1])
            n = int(_shape(w)[2]) if p.transpose_w else int(_shape(w)[1])
            if p.transpose_w:
                w = self._emit(R.permute_dims(w, [0, 2, 1]))  # [H, K, N] -> [H, N, K]
            m = _static(t)
            gv = self._kernel(
                m if m is not None and m <= G.GEMV_MAX_M else None, n, k, dtype=dtype, batch=h
            )
            return relax.call_tir(gv, [x, w], out_ty=relax.TensorType([t, h, n], dtype))
        lead = shape[:-1]
        n = int(_shape(w)[0]) if n is None else n
        if len(lead) != 1:
            m_expr = lead[0]
            for d in lead[1:]:
                m_expr = m_expr * d
            x = self._emit(R.reshape(x, [m_expr, k]))
            if residual is not None:
                residual = self._emit(R.reshape(residual, [m_expr, n]))
        m_expr = x.ty.shape[0]
        m = _static(m_expr)
        out_dtype = p.out_dtype
        if fmt is not None and m is not None and m <= QG.MAX_TOKENS:
            y = self._quant_decode(x, w, fmt, m=m, n=n, k=k, epilogue=epilogue, residual=residual)
        else:
            quant = {} if fmt is None else {"weight_format": fmt}
            gv = self._kernel(
                m if m is not None and m <= G.GEMV_MAX_M else None,
                n,
                k,
                dtype=dtype,
                epilogue=epilogue,
                out_dtype=out_dtype,
                **quant,
            )
            args = [x, w] + ([residual] if residual is not None else [])
            y = relax.call_tir(gv, args, out_ty=relax.TensorType([m_expr, n], out_dtype or dtype))
        if len(lead) != 1:
            y = R.reshape(self._emit(y), [*lead, n])
        return y

    def _silu_weight(self, pg: _Product, pu: _Product):
        """([Wg; Wu] with gate/up rows interleaved in SWIGLU_GROUP groups, n, format): Relax
        ops (gemm.transform_weight) that LiftTransformParams runs at load time. Quantized gate
        and up of one format interleave as blocks (whole rows: lossless), else as values."""
        n, k = (int(v) for v in _shape(pg.w))
        qg, qu = self._blocks(pg.w), self._blocks(pu.w)
        fmt = None
        if qg is not None and qu is not None and qg[1] == qu[1]:
            (wg, fmt), (wu, _) = qg, qu
        else:
            wg, wu = self.visit_expr(pg.w), self.visit_expr(pu.w)
        g, cols = G.SWIGLU_GROUP, int(_shape(wg)[1])
        w = R.reshape(R.concat([wg, wu], axis=0), [2, n // g, g, cols])
        return self._emit(R.reshape(R.permute_dims(w, [1, 0, 2, 3]), [2 * n, cols])), n, fmt

    def visit_call_(self, op):
        kind, data = self.plan.get(op, (None, None))
        if kind == "plain":
            return self._call(data)
        if kind == "heads":
            return self._call(data)
        if kind == "residual":
            p, r = data
            return self._call(p, epilogue="residual", residual=self.visit_expr(r))
        if kind == "silu_mul":
            pg, pu = data
            w, n, fmt = self._silu_weight(pg, pu)
            return self._call(pg, epilogue="silu_mul", w=w, fmt=fmt, n=n)
        return super().visit_call_(op)


def LowerDenseGemm(*, target: tvm.target.Target, choice: KernelChoice) -> tvm.transform.Pass:  # noqa: N802
    """Lower dense products with weights to ``gemm_*`` kernels (GPU, f16/bf16); no-op on CPU.
    ``choice`` picks the tuned wgmma configs of prompt-chunk products."""

    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not is_gpu(target):
            return mod
        lower = _Lower(mod, target, choice)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lower.analyse(func)
                body = lower.visit_expr(func.body)
                new = relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
                lower.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return lower.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="LowerDenseGemm")
