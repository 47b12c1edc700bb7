"""Programmatic dependent launch: which kernels get the launch tag, and where the waits go."""

from __future__ import annotations

import contextlib

import pytest
import tvm
from tvm.script import tirx as T

from mla_compiler.cuda_build import launch_tags
from mla_compiler.schedules import grid_dependency as gd
from mla_compiler.schedules.target import tvm_target


def _kernel(*, wait: bool):
    @T.prim_func
    def scale(a: T.Buffer((1024,), "float32"), b: T.Buffer((1024,), "float32")):
        T.func_attr({"global_symbol": "scale", "tirx.noalias": True})
        for bx in T.thread_binding(8, "blockIdx.x"):
            for tx in T.thread_binding(128, "threadIdx.x"):
                if wait:
                    gd.wait()
                b[bx * 128 + tx] = a[bx * 128 + tx] * 2.0

    return scale


def _build(func, *, every: bool):
    mod = tvm.IRModule({"scale": func})
    with gd.every_kernel() if every else contextlib.nullcontext():
        built = tvm.compile(mod, target=tvm_target("sm_90"))
    body = built.mod.imports[0].inspect_source()
    body = body[body.rindex("scale_kernel(") :]
    return launch_tags(built.mod)["scale_kernel"], body[body.index("{") : body.index("\n}\n")]


WAIT = "tvm_builtin_ptx_griddepcontrol_wait();"
TRIGGER = "tvm_builtin_ptx_griddepcontrol_launch_dependents();"


@pytest.mark.parametrize(
    "wait,every", [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "waits", "every-kernel", "waits-every-kernel"],
)  # fmt: skip
def test_tag_follows_the_wait(wait, every):
    """A kernel is PDL-launched exactly when it waits for its predecessor; under
    ``every_kernel`` a kernel without its own wait gets one first and a trigger last."""
    tags, body = _build(_kernel(wait=wait), every=every)
    assert (gd.PDL_TAG in tags) == (wait or every), tags
    assert body.count(WAIT) == int(wait or every), body
    if every and not wait:
        assert body.lstrip("{ \n").startswith(WAIT), body
        assert body.rstrip().endswith(TRIGGER), body
    if wait:  # its own placement is kept: no trigger added
        assert TRIGGER not in body


def test_pdl_tag_goes_before_dynamic_shared_memory():
    func = _kernel(wait=True).with_attr(
        "tirx.kernel_launch_params", ["blockIdx.x", "threadIdx.x", "tirx.use_dyn_shared_memory"]
    )
    tags = [str(t) for t in gd.with_pdl_tag(func).attrs["tirx.kernel_launch_params"]]
    assert tags == ["blockIdx.x", "threadIdx.x", gd.PDL_TAG, "tirx.use_dyn_shared_memory"]
    assert (
        gd.with_pdl_tag(gd.with_pdl_tag(func)).attrs["tirx.kernel_launch_params"]
        == (gd.with_pdl_tag(func).attrs["tirx.kernel_launch_params"])
    )
