"""NameKernels: give generated kernels names that say what they do.

After legalization and fusion TVM names kernels after their first op (``fused_matmul4_add3``);
``mla-compiler inspect`` lists them by name, so matrix products become ``gemm_*`` and routing
kernels ``moe_*``. Only the ``global_symbol`` changes (what the device code and the VM call),
and every Relax call site is pointed at the renamed GlobalVar.
"""

from __future__ import annotations

import tvm
from tvm import relax

_GEMM = ("matmul", "dense", "linear")


def kernel_name(name: str) -> str:
    if name.startswith(("gemm_", "moe_", "mla_", "attn_", "kv_cache_")):
        return name
    base = name.removeprefix("fused_")
    if any(base.startswith(p) or f"_{p}" in base for p in _GEMM):
        return "gemm_" + base
    if "topk" in base or "scatter_elements" in base:
        return "moe_" + base
    return name


def NameKernels() -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rename = {
            gv: kernel_name(gv.name_hint)
            for gv, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and kernel_name(gv.name_hint) != gv.name_hint
        }
        if not rename:
            return mod
        keep = {gv: f for gv, f in mod.functions_items() if gv not in rename}

        @relax.expr_functor.mutator
        class _Rename(relax.PyExprMutator):
            def visit_global_var_(self, op):
                return self.new_gvs.get(op, op)

        mutator = _Rename(tvm.IRModule(keep, attrs=mod.attrs, global_infos=mod.global_infos))
        # add_func gives the new GlobalVars their types (no duplicate exists to fold into)
        mutator.new_gvs = {
            gv: mutator.builder_.add_func(mod[gv].without_attr("global_symbol"), name)
            for gv, name in rename.items()
        }
        for gv, func in keep.items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return tvm.transform.module_pass(transform, opt_level=0, name="NameKernels")


def _root_block(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` with its body under a root block, as TVM's analyses expect of every kernel
    (RewriteDataflowReshape's HasReshapePattern checks it). Hand-written kernels (routing,
    grouping, attention) are plain statements; the wrapper is removed again by lowering."""
    from tvm import s_tir

    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    block = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, block))


def WrapRootBlocks() -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = _root_block(func)
        return mod

    return tvm.transform.module_pass(transform, opt_level=0, name="WrapRootBlocks")


def build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default Relax pipeline for ``target`` with NameKernels after legalization (reshape
    kernels become views: RewriteDataflowReshape, which needs root blocks, see ``_root_block``)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    backend = cuda if target.kind.name == "cuda" else cpu

    @tvm.transform.module_pass(opt_level=0, name="MLABuildPipeline")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target)
                + backend.legalize_passes(target)
                + [NameKernels(), WrapRootBlocks()]
                + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target)
            )
            return seq(mod)

    return pipeline
