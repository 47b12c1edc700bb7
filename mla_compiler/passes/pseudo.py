"""The ``mla.*`` pseudo-calls the importer emits and the passes lower.

A pseudo-call is ``R.call_pure_packed("mla.<name>", *args)``; scalar attributes travel as
``R.prim_value`` arguments. After the pipeline none may remain (``check_lowered``).
"""

from __future__ import annotations

import tvm
from tvm import relax

from mla_compiler.errors import MLAError

_CALL_PURE_PACKED = tvm.ir.Op.get("relax.call_pure_packed")


def name_of(call) -> str | None:
    """``"attention"`` for ``call_pure_packed("mla.attention", ...)``, else None."""
    if not isinstance(call, relax.Call) or call.op != _CALL_PURE_PACKED:
        return None
    sym = call.args[0].global_symbol
    return sym[4:] if sym.startswith("mla.") else None


def args_of(call) -> list:
    return list(call.args[1:])


def scalar(arg) -> int | float:
    """The Python value of a ``R.prim_value`` argument."""
    value = arg.value
    return value if isinstance(value, int | float) else value.value


def emit(name: str, args: list, out_ty) -> relax.Call:
    return relax.call_pure_packed(f"mla.{name}", *args, ty_args=out_ty)


def check_lowered(mod: tvm.IRModule) -> None:
    """Raise if any ``mla.*`` pseudo-call survived lowering (a pipeline bug)."""
    left: set[str] = set()

    @relax.expr_functor.visitor
    class _Find(relax.PyExprVisitor):
        def visit_call_(self, op):
            if (n := name_of(op)) is not None:
                left.add(n)
            for a in op.args:
                self.visit_expr(a)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            _Find().visit_expr(func)
    if left:
        raise MLAError(f"internal: pseudo-ops {sorted(left)} were not lowered")
