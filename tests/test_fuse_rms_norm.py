"""FuseRMSNorm: the exported RMSNorm chain becomes one kernel with the same numerics."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from mla_compiler.passes.fuse_rms_norm import FuseRMSNorm

EPS = 1e-6


def _exported_norm(rows: int, dim: int, dtype: str) -> tvm.IRModule:
    """The op chain ``modeling.RMSNorm`` exports: w * astype(xf * rsqrt(mean(xf^2) + eps))."""
    op, bb = relax.op, relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, dim), dtype))
    w = relax.Var("w", relax.TensorType((dim,), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            xf = bb.emit(op.astype(x, "float32"))  # [T, D]
            ms = bb.emit(op.mean(op.multiply(xf, xf), axis=[-1], keepdims=True))  # [T, 1]
            r = bb.emit(op.rsqrt(op.add(ms, relax.const(EPS, "float32"))))
            y = bb.emit(op.astype(op.multiply(xf, r), dtype))
            out = bb.emit_output(op.multiply(w, y))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x, w):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()


@pytest.mark.parametrize("rows,dim", [(1, 2048), (5, 1000)])
def test_fuse_rms_norm_one_kernel_same_numerics(rows, dim):
    mod = _exported_norm(rows, dim, "float16")
    fused = FuseRMSNorm()(mod)
    ops = [
        b.value.op.name
        for blk in fused["main"].body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call)
    ]
    assert ops == ["relax.nn.rms_norm", "relax.multiply"]
    with tvm.target.Target("llvm"):
        lowered = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(fused)
    kernels = [gv for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1

    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, dim)) * 4).astype("float16")
    w = rng.standard_normal(dim).astype("float16")
    got, before = _run(fused, x, w), _run(mod, x, w)
    xf = x.astype(np.float64)
    want = w.astype(np.float64) * (xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + EPS)).astype(
        np.float16
    ).astype(np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=2e-3)
    # at most one f16 ulp of the product from the unfused chain (f32 sums in another order)
    np.testing.assert_allclose(got, before, rtol=1e-3, atol=1e-3)


def test_fuse_rms_norm_leaves_other_reductions():
    """A mean over another axis (or without the weight multiply) is not an RMSNorm."""
    op, bb = relax.op, relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float16"))
    w = relax.Var("w", relax.TensorType((8,), "float16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            xf = bb.emit(op.astype(x, "float32"))
            ms = bb.emit(op.mean(op.multiply(xf, xf), axis=[0], keepdims=True))  # [1, 8]
            r = bb.emit(op.rsqrt(op.add(ms, relax.const(EPS, "float32"))))
            y = bb.emit(op.astype(op.multiply(xf, r), "float16"))
            out = bb.emit_output(op.multiply(w, y))
        bb.emit_func_output(out)
    mod = bb.get()
    assert "rms_norm" not in FuseRMSNorm()(mod).script()
