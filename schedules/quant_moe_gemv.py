"""Routed experts at decode over GGUF blocks: ``quant_gemv``'s schedule, one expert per slot.

For ``T <= 8`` tokens with ``top_k`` experts each (``S = T * top_k`` slots), the MoE layer on
quantized experts is four small kernels:

1. :func:`quant_moe_gemv` ``(x [T, D], wq [E, 2I, rb], ids [T, k], g [S, 2I])``: slot s's
   gate and up rows (``[gate; up]`` order, as in the checkpoint) times its token's x;
2. ``gemm.silu_mul_epilogue(S, I, layout="stacked")`` ``(g [S, 2I], h [S, I])``:
   ``h = silu(gate) * up``;
3. :func:`quant_moe_gemv` with ``x_per_slot`` ``(h [S, I], wq [E, D, rb], ids, y [S, D])``;
4. :func:`moe_weighted_sum` ``(y [S, D], weights [T, k] f32, out [T, D])``.

A GEMV is ``quant_gemv``'s CUDA schedule (shared-memory staging of each warp's rows, decode
from register bytes, all 32 lanes busy) with ``blockIdx.y`` the slot: the slot's x row, expert
matrix and output row are buffers declared at offsets of the inputs (``ids`` read once per
block), so the schedule's body is ``quant_gemv``'s own with one token. CPU: a plain loop nest.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as I

from . import quant_gemv as QG
from .elementwise import thread_per_element
from .target import is_gpu

MAX_TOKENS = QG.MAX_TOKENS


def quant_moe_gemv(
    tokens: int,
    n: int,
    k: int,
    *,
    num_experts: int,
    top_k: int,
    target: tvm.target.Target,
    weight_format: str,
    x_per_slot: bool = False,
    config: QG.QuantGemvConfig | None = None,
    dtype: str = "float16",
    emulate: bool = False,
) -> tirx.PrimFunc:
    """``(x [T or S, k], wq [E, n, row_bytes(k)] u8, ids [T, top_k] int32, y [S, n])``:
    ``y[s] = x[row(s)] @ W[ids[s // top_k, s % top_k]]^T`` (f32 sums), ``row(s) = s`` with
    ``x_per_slot`` else ``s // top_k``. ``config``: ``quant_gemv``'s (default: its
    ``default_config`` for the n x k matrix with S matrices' rows in flight). CPU: a plain
    loop nest, or with ``emulate`` the CUDA schedule's index math run serially (tests)."""
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"quant_moe_gemv serves 1..{MAX_TOKENS} tokens, got {tokens}")
    fmt = QG._fmt(weight_format)
    slots, rb = tokens * top_k, fmt.row_bytes(k)
    x_rows = slots if x_per_slot else tokens
    name = f"quant_moe_gemv_{weight_format}_e{num_experts}_n{n}_k{k}_s{slots}"
    gpu = is_gpu(target)
    if not gpu and not emulate:
        return _cpu(fmt, x_rows, n, k, num_experts, top_k, slots, x_per_slot, dtype, name)
    cfg = config or QG.default_config(weight_format, n * slots, k, target, 1)
    g = QG.check(weight_format, 1, n, k, cfg, target if gpu else None, dtype)
    with IRBuilder() as ib:
        with I.prim_func():
            I.func_name(name)
            I.func_attr({"tirx.noalias": True})
            x = I.arg("x", T.buffer((x_rows, k), dtype))
            wq = I.arg("wq", T.buffer((num_experts, n, rb), "uint8"))
            ids = I.arg("ids", T.buffer((tokens, top_k), "int32"))
            y = I.arg("y", T.buffer((slots, n), dtype))
            grid = (
                (
                    lambda: T.launch_thread("blockIdx.y", slots),
                    lambda: T.launch_thread("blockIdx.x", g.n_blk),
                )
                if gpu
                else (lambda: T.serial(0, slots), lambda: T.serial(0, g.n_blk))
            )
            with grid[0]() as s, grid[1]() as bx:
                e = T.max(T.min(ids[s // top_k, s % top_k], num_experts - 1), 0)
                row = s if x_per_slot else s // top_k
                v = _views(x, wq, y, e, row, s, n=n, k=k, rb=rb, dtype=dtype)
                if gpu:
                    with T.launch_thread("threadIdx.x", g.threads) as tx:
                        QG._Emitter(g, True, bx, tx).body(*v)
                else:
                    QG._Emitter(g, False, bx).body(*v)
    return ib.get()


def _views(x, wq, y, e, row, s, *, n, k, rb, dtype):
    """The slot's x row [1, k], expert blocks [n, rb] and output row [1, n]: buffers at offsets
    of the kernel's arguments (the emitter indexes them as quant_gemv's own)."""
    cast = lambda v: T.Cast("int64", v)  # noqa: E731  (offsets past 2^31 bytes)
    return (
        T.decl_buffer((1, k), dtype, data=x.data, elem_offset=cast(row) * k),
        T.decl_buffer((n, rb), "uint8", data=wq.data, elem_offset=cast(e) * (n * rb)),
        T.decl_buffer((1, n), dtype, data=y.data, elem_offset=cast(s) * n),
    )


def _cpu(fmt, x_rows, n, k, num_experts, top_k, slots, x_per_slot, dtype, name):
    rb = fmt.row_bytes(k)
    tokens = slots // top_k

    @T.prim_func
    def kernel(
        x: T.Buffer((x_rows, k), dtype),
        wq: T.Buffer((num_experts, n, rb), "uint8"),
        ids: T.Buffer((tokens, top_k), "int32"),
        y: T.Buffer((slots, n), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        for s, r in T.grid(slots, n):
            acc = T.alloc_buffer((1,), "float32", scope="local")
            e = T.meta_var(T.max(T.min(ids[s // top_k, s % top_k], num_experts - 1), 0))
            xr = T.meta_var(s if x_per_slot else s // top_k)
            acc[0] = T.float32(0)
            for c in range(k):
                acc[0] = acc[0] + T.Cast("float32", x[xr, c]) * fmt.value(wq, (e, r), c)
            y[s, r] = T.Cast(dtype, acc[0])

    return kernel.with_attr("global_symbol", name)


def moe_weighted_sum(
    tokens: int, hidden: int, *, top_k: int, dtype: str = "float16", target
) -> tirx.PrimFunc:
    """``(y [T*k, D], weights [T, k] f32, out [T, D])``: ``out[t] = sum_j weights[t, j] *
    y[t*k + j]`` (f32 sum)."""
    y = te.placeholder((tokens * top_k, hidden), dtype, name="y")
    w = te.placeholder((tokens, top_k), "float32", name="weights")
    j = te.reduce_axis((0, top_k), name="j")
    acc = te.compute(
        (tokens, hidden),
        lambda t, d: te.sum(w[t, j] * y[t * top_k + j, d].astype("float32"), axis=j),
        name="acc",
    )
    out = te.compute((tokens, hidden), lambda t, d: acc[t, d].astype(dtype), name="weighted_sum")
    func = te.create_prim_func([y, w, out]).with_attr("tirx.noalias", True)
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    acc_blk = sch.get_sblock("acc")
    sch.compute_at(acc_blk, thread_per_element(sch, sch.get_sblock("weighted_sum"), target))
    sch.set_scope(acc_blk, 0, "local")
    return sch.mod["main"].with_attr("global_symbol", f"moe_weighted_sum_t{tokens}_d{hidden}")
