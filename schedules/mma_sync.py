"""mma.sync building blocks shared by the attention kernels (prefill and decode)."""

from __future__ import annotations

from tvm.script import tirx as T


@T.macro(hygienic=False)
def mma_f16(a, a_off, b, b_off, c, c_off):
    """``c[c_off:] += a[a_off:] b[b_off:]``: one mma.sync.m16n8k16, f16 A (row) and B (col)
    fragments, f32 accumulator (fragment layouts of the PTX ISA)."""
    T.ptx_legacy.mma(
        "m16n8k16",
        "row",
        "col",
        "fp16",
        "fp16",
        "fp32",
        a.data,
        a_off,
        b.data,
        b_off,
        c.data,
        c_off,
        False,
        dtype="float32",
    )
