"""DequantizeWeights: weights kept in GGUF block formats enter the functions as their bytes.

Each quantized weight parameter ``W [..., N, K]`` (``formats``: weight name -> format name of
``schedules.quant_formats``) becomes ``Wq [..., N, row_bytes(K)] uint8``, and the function
starts with ``W = reshape(call_tir(dequantize_<fmt>, reshape(Wq, [rows, row_bytes])))``: a
*view* of the blocks (:func:`quantized_views`). The lowering passes that follow (LowerMoE,
LowerDenseGemm) hand the blocks to kernels that decode them as they load them; the views left
in use (weights no kernel of theirs reads, e.g. sliced or transposed ones) are moved to load
time by LiftTransformParams and stay on the device decoded.
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import relax
from tvm.relax import op as R

from mla_compiler.schedules.quant_formats import FORMATS, dequantize_func


def DequantizeWeights(formats: dict[str, str], param_names, *, target) -> tvm.transform.Pass:
    """``formats``: weight name -> format; ``param_names``: the weight parameters' names in the
    order of every function's weight parameters (after its ``num_input`` inputs)."""
    names = tuple(param_names)
    unknown = sorted(set(formats) - set(names))
    if unknown:
        raise ValueError(f"quantized weights {unknown[:3]} are not parameters of the model")

    @tvm.transform.module_pass(opt_level=0, name="DequantizeWeights")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not formats:
            return mod
        bb = relax.BlockBuilder(mod)
        kernels: dict[tuple, relax.GlobalVar] = {}

        def kernel(fmt: str, rows: int, k: int, dtype: str) -> relax.GlobalVar:
            key = (fmt, rows, k, dtype)
            if key not in kernels:
                func = dequantize_func(FORMATS[fmt], rows, k, out_dtype=dtype, target=target)
                func = func.without_attr("global_symbol")  # named by add_func
                func = func.with_attr("weight_format", fmt)  # marks views: quantized_views
                kernels[key] = bb.add_func(func, f"dequantize_{fmt}_{rows}x{k}_{dtype}")
            return kernels[key]

        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and func.attrs and "num_input" in func.attrs:
                bb.update_func(gv, _rewrite(func, names, formats, kernel, bb))
        return bb.get()

    return run


def _rewrite(func: relax.Function, names, formats, kernel, bb) -> relax.Function:
    n_in = int(func.attrs["num_input"])
    weights = func.params[n_in:]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weight parameters, {len(names)} names")
    params, bindings, binds = list(func.params[:n_in]), [], {}
    for name, w in zip(names, weights, strict=True):
        if name not in formats:
            params.append(w)
            continue
        fmt = FORMATS[formats[name]]
        *lead, k = (int(s) for s in w.ty.shape)
        rows, rb = math.prod(lead), fmt.row_bytes(k)
        wq = relax.Var(w.name, relax.TensorType([*lead, rb], "uint8"))
        params.append(wq)
        flat = wq
        if len(lead) != 1:
            flat = relax.Var(f"{w.name}_rows", relax.TensorType([rows, rb], "uint8"))
            bindings.append(relax.VarBinding(flat, bb.normalize(R.reshape(wq, [rows, rb]))))
        dtype = str(w.ty.dtype)
        call = relax.call_tir(
            kernel(fmt.name, rows, k, dtype), [flat], out_ty=relax.TensorType([rows, k], dtype)
        )
        value = relax.Var(f"{w.name}_values", relax.TensorType([rows, k], dtype))
        bindings.append(relax.VarBinding(value, bb.normalize(call)))
        if len(lead) != 1:
            shaped = relax.Var(f"{w.name}_dq", w.ty)
            bindings.append(relax.VarBinding(shaped, bb.normalize(R.reshape(value, w.ty.shape))))
            value = shaped
        binds[w] = value
    bound = func.bind_params(binds)
    # a dataflow block: LiftTransformParams lifts from dataflow blocks only
    body = relax.SeqExpr([relax.DataflowBlock(bindings), *bound.body.blocks], bound.body.body)
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)


@dataclasses.dataclass(frozen=True)
class QuantView:
    """A dequantized weight ``[..., N, K]`` whose blocks are ``data`` (uint8, rows of
    ``row_bytes(K)``, leading dims flattened or not) in format ``fmt``."""

    data: relax.Expr
    fmt: str

    def blocks(self, shape, emit) -> relax.Expr:
        """The blocks shaped ``[*shape[:-1], row_bytes(shape[-1])]``: ``data`` itself, or its
        reshape bound by ``emit`` (a BlockBuilder's ``emit``)."""
        shape = [int(s) for s in shape]
        want = [*shape[:-1], FORMATS[self.fmt].row_bytes(shape[-1])]
        have = [int(s) for s in self.data.ty.shape]
        return self.data if have == want else emit(R.reshape(self.data, want))


def quantized_views(mod: tvm.IRModule, func: relax.Function) -> dict:
    """Var -> :class:`QuantView` for each dequantized weight of ``func`` (the ``call_tir`` of a
    kernel marked ``weight_format``, and reshapes of it)."""
    views: dict = {}
    reshaped: dict = {}  # var -> what it reshapes (the blocks as the parameter holds them)
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding) or not isinstance(b.value, relax.Call):
                continue
            call = b.value
            if call.op.same_as(tvm.ir.Op.get("relax.call_tir")):
                callee = mod[call.args[0]] if isinstance(call.args[0], relax.GlobalVar) else None
                fmt = callee.attrs.get("weight_format") if callee and callee.attrs else None
                if fmt is not None:
                    data = call.args[1].fields[0]
                    views[b.var] = QuantView(reshaped.get(data, data), str(fmt))
            elif call.op.same_as(tvm.ir.Op.get("relax.reshape")):
                src = call.args[0]
                if src not in views:
                    reshaped[b.var] = reshaped.get(src, src)
                elif int(src.ty.shape[-1]) == int(b.var.ty.shape[-1]):
                    views[b.var] = views[src]  # rows regrouped, each row whole: the same blocks
    return views
