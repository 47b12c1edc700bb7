"""Programmatic dependent launch (PDL, sm_90+): a kernel starts while its predecessor drains.

A kernel launched with CUDA's programmatic stream serialisation may begin once every CTA of the
kernel before it in the stream has executed ``griddepcontrol.launch_dependents`` (or exited);
its ``griddepcontrol.wait`` then blocks until that predecessor has completed and its memory is
visible. Work before the wait (index math, loads of inputs written long before) overlaps the
predecessor's tail and the launch latency. Launched the ordinary way, the wait is a no-op.

TVM 0.27's runtime launches a kernel this way when its ``launch_param_tags`` hold
``tirx.use_programtic_dependent_launch`` (sic), but no compiler pass puts the tag there. This
module adds it at code generation: ``install_build_hook`` wraps ``target.build.cuda`` so that
every device function whose body calls ``griddepcontrol.wait`` gets the tag. The rule keeps
the two halves together: a kernel is PDL-launched exactly when it waits for its predecessor
before reading what that predecessor wrote. The tags travel in the module's function table,
so artifacts run with the runtime-only TVM bundle.

Rules for a kernel using these (``wait`` / ``launch_dependents`` below):
- ``wait`` before the first read of anything the previous kernel may have written, and
  before any write another kernel may read;
- ``launch_dependents`` only after ``wait``: a dependent that starts early may read inputs
  that the predecessor's own predecessors wrote, and those are complete only past the wait;
- ``launch_dependents`` at the end, once the kernel's stores are issued: triggered at the
  start, the dependent's CTAs crowd whatever SMs the kernel leaves free and sit there waiting,
  so the dependent runs unbalanced (a decode split of 128 CTAs then its merge: 7 merge CTAs
  on each of the 4 free SMs; measured in ``benchmarks/NOTES_decode.md``).
"""

from __future__ import annotations

import contextlib
import contextvars

import tvm
from tvm.script import tirx as T

PDL_TAG = "tirx.use_programtic_dependent_launch"  # spelled as in TVM's runtime
_DYN_SMEM_TAG = "tirx.use_dyn_shared_memory"  # the runtime wants it last
_LAUNCH_PARAMS = "tirx.kernel_launch_params"
_ORIGINAL_BUILD = None
_EVERY_KERNEL = contextvars.ContextVar("mla_pdl_every_kernel", default=False)


def wait():
    """``griddepcontrol.wait``: block until the previous kernel completed (no-op if launched
    without PDL). Marks the kernel for PDL launch (``install_build_hook``)."""
    return T.evaluate(T.ptx.griddepcontrol.wait())


def launch_dependents():
    """``griddepcontrol.launch_dependents``: let the next PDL-launched kernel start."""
    return T.evaluate(T.ptx.griddepcontrol.launch_dependents())


def waits_for_grid(func: tvm.tirx.PrimFunc) -> bool:
    """Whether a statement of ``func``'s body is ``griddepcontrol.wait`` (a walk over the
    statement tree: TVM 0.27 exposes no TIR visitor to Python)."""
    stack = [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tvm.tirx.Evaluate):
            call = node.value
            if (
                isinstance(call, tvm.ir.expr.Call)
                and getattr(call.op, "name", "") == "tirx.ptx.griddepcontrol"
                and call.args
                and getattr(call.args[0], "value", None) == "wait"
            ):
                return True
            continue
        for field in ("body", "then_case", "else_case"):
            child = getattr(node, field, None)
            if child is not None:
                stack.append(child)
        stack.extend(getattr(node, "seq", ()))
    return False


def with_pdl_tag(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` with the PDL launch tag in its launch parameters (before the dynamic shared
    memory tag, which the runtime requires last); unchanged if it has no launch parameters or
    already the tag."""
    tags = func.attrs.get(_LAUNCH_PARAMS) if func.attrs else None
    if tags is None:
        return func
    tags = [str(t) for t in tags]
    if PDL_TAG in tags:
        return func
    at = tags.index(_DYN_SMEM_TAG) if _DYN_SMEM_TAG in tags else len(tags)
    return func.with_attr(_LAUNCH_PARAMS, tags[:at] + [PDL_TAG] + tags[at:])


@contextlib.contextmanager
def every_kernel():
    """While active, every CUDA kernel built starts with ``wait`` and ends with
    ``launch_dependents`` (those that already wait are left as they are), so each is launched
    while its predecessor drains: the launch latency between dependent kernels overlaps the
    predecessor's tail. The kernel's own work still starts only once its predecessor
    completed."""
    token = _EVERY_KERNEL.set(True)
    try:
        yield
    finally:
        _EVERY_KERNEL.reset(token)


def with_wait_first(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` (a lowered device kernel) with ``wait`` as its first statement and
    ``launch_dependents`` as its last (a CTA that returns early triggers as it exits)."""
    wait_ = tvm.tirx.Evaluate(T.ptx.griddepcontrol.wait())
    trigger = tvm.tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents())
    return func.with_body(tvm.tirx.SeqStmt([wait_, func.body, trigger]))


def _build_cuda(mod: tvm.IRModule, target):
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            if _EVERY_KERNEL.get() and not waits_for_grid(func):
                func = with_wait_first(func)
            if waits_for_grid(func):
                func = with_pdl_tag(func)
        funcs[gv] = func
    return _ORIGINAL_BUILD(tvm.IRModule(funcs, attrs=mod.attrs), target)


def install_build_hook() -> None:
    """Wrap ``target.build.cuda`` once per process (idempotent)."""
    global _ORIGINAL_BUILD
    if _ORIGINAL_BUILD is not None:
        return
    _ORIGINAL_BUILD = tvm.get_global_func("target.build.cuda", allow_missing=True)
    if _ORIGINAL_BUILD is None:  # a TVM without CUDA codegen: nothing to launch
        return
    tvm.register_global_func("target.build.cuda", _build_cuda, override=True)


install_build_hook()
