"""Export the PyTorch model with ``torch.export`` (or ONNX) and import it into TVM Relax.

The MLA/MoE custom ops become pseudo-calls ``R.call_pure_packed("mla.<op>", ...)`` carrying
their scalar attributes as ``R.prim_value``/``R.str`` arguments; the compiler's passes
(``mla_compiler.passes``) recognise and lower them, and a build with one left over fails.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import tvm
from tvm import relax

from mla_compiler.model_export import moe as _moe_op  # noqa: F401  (registers mla::moe)
from mla_compiler.model_export import ops as _ops  # noqa: F401  (registers mla::attention)
from mla_compiler.model_export.modeling import DeepseekV2, rope_tables, single_sequence_inputs

INPUT_NAMES = (
    "input_ids",
    "positions",
    "slot_rows",
    "q_indptr",
    "kv_rows",
    "kv_indptr",
    "logit_rows",
    "cache",
)


@dataclasses.dataclass(frozen=True)
class Exported:
    """A Relax module whose ``main`` takes the user inputs, then the parameters by name."""

    mod: tvm.IRModule
    param_names: tuple[str, ...]


def _pseudo_call(name: str, args: list, out_sinfo) -> relax.Call:
    return relax.call_pure_packed(name, *args, ty_args=out_sinfo)


def _cache_write(node, importer):
    cache, rows, slot_rows, layer = node.args
    env = importer.env
    c = env[cache]
    return importer.block_builder.emit(
        _pseudo_call(
            "mla.cache_write",
            [c, env[rows], env[slot_rows], relax.prim_value(int(layer))],
            c.ty,
        ),
        name_hint="cache",
    )


def _attention(node, importer):
    (q_nope, q_pe, cache, kv_b, q_indptr, kv_rows, kv_indptr, layer, sm_scale) = node.args
    env = importer.env
    qn, w = env[q_nope], env[kv_b]
    t, h, dn = qn.ty.shape
    dv = w.ty.shape[0] // h - dn
    out = relax.TensorType([t, h, dv], qn.ty.dtype)
    args = [qn, env[q_pe], env[cache], w, env[q_indptr], env[kv_rows], env[kv_indptr]]
    args += [relax.prim_value(int(layer)), relax.prim_value(float(sm_scale))]
    return importer.block_builder.emit(_pseudo_call("mla.attention", args, out), name_hint="attn")


def _moe(node, importer):
    x, router, gate_up, down, top_k, method, n_group, topk_group, norm, scaling = node.args
    env = importer.env
    xv = env[x]
    args = [xv, env[router], env[gate_up], env[down], relax.prim_value(int(top_k))]
    args += [relax.prim_value(TOPK_METHODS.index(method)), relax.prim_value(int(n_group))]
    args += [relax.prim_value(int(topk_group)), relax.prim_value(int(bool(norm)))]
    args += [relax.prim_value(float(scaling))]
    return importer.block_builder.emit(_pseudo_call("mla.moe", args, xv.ty), name_hint="moe")


TOPK_METHODS = ("greedy", "group_limited_greedy")  # method code of mla.moe


def _matmul(node, importer):
    """TVM's importer forces matmul outputs to float32; keep the inputs' dtype (f16 stays f16,
    the kernels accumulate in f32 anyway)."""
    args = importer.retrieve_args(node)
    a, b = args[0], args[1]
    if "linear" in str(node.target):
        b = relax.op.permute_dims(b, [1, 0])
    return importer.block_builder.emit(relax.op.matmul(a, b, out_dtype=a.ty.dtype.dtype))


CONVERTERS = {
    "cache_write.default": _cache_write,
    "attention.default": _attention,
    "moe.default": _moe,
    "mm.default": _matmul,
    "matmul.default": _matmul,
    "bmm.default": _matmul,
    "linear.default": _matmul,
}


def example_inputs(
    model: DeepseekV2, *, cache_rows: int, kv_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Inputs used to trace: 3 prompt tokens after 2 cached ones (no dim is 0 or 1)."""
    inp = single_sequence_inputs([1, 2, 3], start=2, logits="all")
    inp["cache"] = model.new_cache(cache_rows, kv_dtype)
    return inp


def export_program(
    model: DeepseekV2, *, kv_dtype: torch.dtype = torch.float16, cache_rows: int = 64
) -> torch.export.ExportedProgram:
    """``torch.export`` with dynamic tokens T, sequences B, KV rows N, logit rows R and cache
    rows C."""
    dim = torch.export.Dim
    t, n, r = dim("T", min=1, max=1 << 20), dim("N", min=1, max=1 << 24), dim("R", min=1)
    b1 = dim("B1", min=2, max=1 << 16)  # B + 1
    c = dim("C", min=2, max=1 << 26)
    dynamic = {
        "input_ids": {0: t},
        "positions": {0: t},
        "slot_rows": {0: t},
        "q_indptr": {0: b1},
        "kv_rows": {0: n},
        "kv_indptr": {0: b1},
        "logit_rows": {0: r},
        "cache": {1: c},
    }
    inputs = example_inputs(model, cache_rows=cache_rows, kv_dtype=kv_dtype)
    if model.embed_tokens.weight.is_meta:  # too large to materialise: trace on 'meta'
        inputs = {k: v.to("meta") for k, v in inputs.items()}
    with torch.no_grad():
        return torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dynamic, strict=False)


@contextlib.contextmanager
def _meta_tensors_as_placeholders(model: DeepseekV2):
    """Let the importer take a model built on 'meta': parameters (kept as function inputs, their
    values unused) become 1-element placeholders; the RoPE table gets its real values."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter as imp

    inv_freq, _ = rope_tables(model.cfg)
    original = imp._convert_pytorch_tensor_to_tvm

    def convert(t: torch.Tensor):
        if not t.is_meta:
            return original(t)
        if tuple(t.shape) == tuple(inv_freq.shape) and t.dtype == inv_freq.dtype:
            return original(inv_freq)
        return original(torch.zeros(1, dtype=t.dtype))

    imp._convert_pytorch_tensor_to_tvm = staticmethod(convert)
    try:
        yield
    finally:
        imp._convert_pytorch_tensor_to_tvm = staticmethod(original)


def to_relax(ep: torch.export.ExportedProgram, model: DeepseekV2) -> Exported:
    from tvm.relax.frontend.torch import from_exported_program

    guard = (
        _meta_tensors_as_placeholders(model)
        if model.embed_tokens.weight.is_meta
        else contextlib.nullcontext()
    )
    with guard:
        mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=CONVERTERS)
    # Drop the dims' upper bounds: Relax's memory planner would reserve every intermediate at
    # its bound (e.g. gathered KV rows at 16M rows). Without bounds it allocates per call.
    func = mod["main"].without_attr("params").without_attr("tir_var_upper_bound")
    mod["main"] = func
    names = tuple(name for name, _ in model.named_parameters())
    return Exported(mod=mod, param_names=names)


def export_relax(model: DeepseekV2, *, kv_dtype: torch.dtype = torch.float16) -> Exported:
    """Export and import; the cache is ``kv_dtype`` (f16: 2 bytes per latent element)."""
    return to_relax(export_program(model, kv_dtype=kv_dtype), model)
