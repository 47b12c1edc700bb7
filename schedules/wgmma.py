"""Warpgroup-MMA building blocks shared by the sm_90a kernels (prefill attention, GEMMs)."""

from __future__ import annotations

from tvm.script import tirx as T

_PIN_SOURCE = """
__forceinline__ __device__ void mla_pin_f32(float& x) { asm volatile("" : "+f"(x) :: "memory"); }
"""


_STORE_SOURCE = """
__forceinline__ __device__ void mla_store_shared_f32(float& slot, float x) {
  asm volatile("st.shared.f32 [%0], %1;"
               :: "r"((unsigned)__cvta_generic_to_shared(&slot)), "f"(x) : "memory");
}
"""


@T.macro(hygienic=True)
def store_before_wait(slot, value):
    # A shared-memory store the compilers keep (asm, not a C++ store that nvcc drops when
    # nothing reads it). ptxas moves a wgmma wait above independent math, but not above a
    # store: storing a value that needs some math keeps that math before the next wait.
    T.cuda.func_call("mla_store_shared_f32", slot, value, source_code=_STORE_SOURCE)


@T.macro(hygienic=True)
def pin(acc, n):
    # Empty asm reading and writing each accumulator: the compiler may not move their other
    # uses across the wgmma fence / wait that it cannot see them depend on.
    for i in T.unroll(n):
        T.cuda.func_call("mla_pin_f32", acc[i], source_code=_PIN_SOURCE)


def mma_async(
    n, acc, a_desc, b_desc, *, accumulate=True, trans_b: int = 0, acc0: int = 0, dtype="float16"
):
    """One m64n{n}k16 wgmma (f16 or bf16 -> f32) into ``acc[acc0 : acc0 + n/2]``, A and B from
    shared memory (descriptors), A K-major, B K-major (``trans_b=0``) or MN-major (1)."""
    ab = "bf16" if dtype == "bfloat16" else "f16"
    op = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab}"]
    regs = [acc[acc0 + i] for i in range(n // 2)]
    return op(*regs, a_desc, b_desc, accumulate, 1, 1, 0, trans_b)


def mma_async_rs(n, acc, a_regs, b_desc, *, trans_b: int = 0, acc0: int = 0, dtype="float16"):
    """``mma_async`` with A from registers (wgmma's rs form): ``a_regs`` are the four 32-bit
    pairs of the warp's m16k16 A fragment (the mma.sync A layout, warp ``w`` holding rows
    ``16w..16w+15``); always accumulates."""
    ab = "bf16" if dtype == "bfloat16" else "f16"
    op = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab}"]
    regs = [acc[acc0 + i] for i in range(n // 2)]
    return op(*regs, *a_regs, b_desc, True, 1, 1, trans_b)
