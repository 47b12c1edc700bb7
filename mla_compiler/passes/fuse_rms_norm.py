"""FuseRMSNorm: the exported RMSNorm op chain becomes ``multiply(w, rms_norm(x, ones))``.

The export (``modeling.RMSNorm``) gives eight ops::

    xf = astype(x, f32); r = rsqrt(mean(xf * xf, -1, keepdims) + eps)
    y = w * astype(xf * r, x.dtype)

TVM's FuseOps cannot put them in one kernel: ``xf`` feeds both the reduction and its
epilogue, so the cast and the square stay kernels of their own (three launches per norm).
``R.nn.rms_norm`` legalizes to one PrimFunc that holds the input cast, the f32 sum of squares,
``x * rsqrt(sum / n + eps) * weight`` and the cast back; with an all-ones weight that product is
exactly ``xf * r`` (``* 1.0`` is exact), so the numerics stay those of the export: the weight
is applied after the cast, in the activation dtype, as in HF's DeepseekV2RMSNorm. The trailing
multiply by ``w`` fuses into the same kernel (one launch per norm).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

_NUMPY_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _pattern():
    x, w, eps = wildcard(), wildcard(), is_const()
    xf = is_op("relax.astype")(x)
    mean = is_op("relax.mean")(is_op("relax.multiply")(xf, xf))
    r = is_op("relax.rsqrt")(is_op("relax.add")(mean, eps))
    y = is_op("relax.astype")(is_op("relax.multiply")(xf, r))
    out = is_op("relax.multiply")(w, y)
    return out, {"x": x, "w": w, "eps": eps, "xf": xf, "mean": mean, "y": y}


def _rewriter(names):
    def rewrite(expr, matched):
        x, w, eps = matched[names["x"]], matched[names["w"]], matched[names["eps"]]
        mean = matched[names["mean"]]
        dtype = str(x.ty.dtype)
        rank = len(x.ty.shape)
        axes = [int(a) % rank for a in mean.attrs.axis] if mean.attrs.axis else None
        ok = (
            str(matched[names["xf"]].ty.dtype) == "float32"
            and str(matched[names["y"]].ty.dtype) == dtype
            and dtype in _NUMPY_DTYPES
            and axes == [rank - 1]
            and bool(mean.attrs.keepdims)
            and eps.value.numpy().size == 1
            and str(w.ty.dtype) == dtype
            and len(w.ty.shape) == 1
        )
        if not ok:
            return expr
        dim = int(w.ty.shape[0])
        ones = relax.const(np.ones(dim, dtype=_NUMPY_DTYPES[dtype]), dtype)
        norm = relax.op.nn.rms_norm(x, ones, axes=[-1], epsilon=float(eps.value.numpy()))
        return relax.op.multiply(w, norm)  # [.., D]

    return rewrite


def FuseRMSNorm() -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pattern, names = _pattern()
        rewrite = _rewriter(names)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = relax.analysis.remove_all_unused(rewrite_call(pattern, rewrite, func))
        return mod

    return tvm.transform.module_pass(transform, opt_level=0, name="FuseRMSNorm")
