"""LiftPhaseWeightTransforms: weight transforms that only one phase needs also run at load time.

``LiftTransformParams(shared_transform=True)`` moves to ``transform_params`` only what every
phase computes from the weights alike. With ``--mla 3`` the prefill phase decompresses K/V from
``kv_b`` while decode absorbs it, so decode's ``W_UK`` / ``W_UV`` (slices, transposes of
``kv_b``) stayed in decode and were recomputed at every step (two copies of 2 MB per layer and
step on DeepSeek-V2-Lite). This pass runs after it and moves every binding of a phase that
depends on weights only into ``transform_params``: its results become extra outputs, and every
phase takes them as extra trailing parameters (phases that do not use one ignore it, so the
engine passes one parameter list to all of them).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm_ffi import structural_equal, structural_hash


def _phases(mod: tvm.IRModule) -> list[tuple[relax.GlobalVar, relax.Function, int]]:
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or gv.name_hint == "transform_params":
            continue
        attrs = func.attrs
        if attrs is None or "num_input" not in attrs:
            continue
        n = int(attrs["num_input"])
        if len(func.params) > n:
            out.append((gv, func, n))
    return out


def _free_vars(expr) -> list:
    return list(relax.analysis.free_vars(expr))


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    def __init__(self, table: dict):
        super().__init__()
        self.table = table

    def visit_var_(self, op):
        return self.table.get(op, op)

    def visit_dataflow_var_(self, op):
        return self.table.get(op, op)


def _weight_only(func: relax.Function, n_input: int):
    """(bindings computed from weights only, in order; those of them used by the rest)."""
    weight = set(func.params[n_input:])
    moved = []
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding) or not isinstance(b.value, relax.Call):
                continue
            free = _free_vars(b.value)
            if free and all(v in weight for v in free):
                weight.add(b.var)
                moved.append(b)
    moved_vars = {b.var for b in moved}
    used = set()
    for block in func.body.blocks:
        for b in block.bindings:
            if b.var not in moved_vars:
                used.update(v for v in _free_vars(b.value) if v in moved_vars)
    used.update(v for v in _free_vars(func.body.body) if v in moved_vars)
    leaves = [b.var for b in moved if b.var in used]
    return moved, leaves


def LiftPhaseWeightTransforms() -> tvm.transform.Pass:  # noqa: N802
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if "transform_params" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        phases = [(gv, f, n, *_weight_only(f, n)) for gv, f, n in _phases(mod)]
        if not any(leaves for *_, leaves in phases):
            return mod
        tp = mod["transform_params"]
        (block,) = tp.body.blocks
        out_var = tp.body.body
        fields = list(relax.analysis.get_var2val(tp)[out_var].fields)

        # transform_params: the moved bindings of each phase, weights -> its current outputs;
        # a binding another phase already moved (the same value of the same weights: W_UK /
        # W_UV of decode and prefill_deep) is computed and returned once
        bindings = list(block.bindings)
        added: dict = {}  # structural hash -> [(value, var)]
        extra_fields, index, positions = [], {}, []
        for _gv, func, n, moved, leaves in phases:
            table = dict(zip(func.params[n:], fields, strict=True))
            for b in moved:
                value = _Substitute(table).visit_expr(b.value)
                same = added.setdefault(structural_hash(value, map_free_vars=False), [])
                match = next((v for e, v in same if structural_equal(e, value)), None)
                if match is None:
                    match = relax.DataflowVar(b.var.name, b.var.ty)
                    bindings.append(relax.VarBinding(match, value))
                    same.append((value, match))
                table[b.var] = match
            for v in leaves:
                if table[v] not in index:
                    index[table[v]] = len(extra_fields)
                    extra_fields.append(table[v])
            positions.append([index[table[v]] for v in leaves])
        new_out = relax.Var(out_var.name, relax.TupleType([f.ty for f in fields + extra_fields]))
        bindings.append(relax.VarBinding(new_out, relax.Tuple(fields + extra_fields)))
        new_tp = relax.Function(
            tp.params,
            relax.BlockBuilder().normalize(relax.SeqExpr([relax.DataflowBlock(bindings)], new_out)),
            is_pure=tp.is_pure,
            attrs=tp.attrs,
        )

        out = tvm.IRModule({gv: f for gv, f in mod.functions_items()}, attrs=mod.attrs)
        out[mod.get_global_var("transform_params")] = new_tp
        for (gv, func, _n, moved, leaves), pos in zip(phases, positions, strict=True):
            # every phase takes every lifted tensor (one parameter list for all of them), each
            # as parameters of its own (a Var is the parameter of one function)
            mine = [relax.Var(f"{v.name}_lifted", v.ty) for v in extra_fields]
            table = {leaf: mine[i] for leaf, i in zip(leaves, pos, strict=True)}
            drop = {b.var for b in moved}
            blocks = []
            for blk in func.body.blocks:
                kept = [
                    relax.VarBinding(b.var, _Substitute(table).visit_expr(b.value))
                    if isinstance(b, relax.VarBinding)
                    else b
                    for b in blk.bindings
                    if b.var not in drop
                ]
                blocks.append(type(blk)(kept))
            body = relax.SeqExpr(blocks, _Substitute(table).visit_expr(func.body.body))
            body = relax.BlockBuilder().normalize(body)
            params = list(func.params) + mine
            out[gv] = relax.Function(params, body, is_pure=func.is_pure, attrs=func.attrs)
        return relax.transform.Normalize()(out)

    return tvm.transform.module_pass(transform, opt_level=0, name="LiftPhaseWeightTransforms")
