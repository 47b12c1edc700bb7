"""Next-token sampling on the device: logits [B, V] -> token ids [B] int32, one block per row.

Per row, ``params[b] = (temperature, top_p, top_k, u)`` (float32; ``u`` in [0, 1) drawn by the
host from its seeded generator, so runs are reproducible). The rule (``reference.sample`` is the
float64 model of it):

- a row holding a non-finite logit (NaN, +-Inf) gives -1: the caller refuses it (a row of NaN
  would otherwise read as token 0);
- greedy (``temperature <= 0`` or ``top_k == 1``): argmax, ties to the lowest index;
- else ``p_i = exp((z_i - max z) / temperature)`` over ``z = float32(logits)``, and the kept set
  is ``{i : z_i >= tau}`` for a threshold *value* ``tau``:

  * top-k (``0 < top_k < V``): ``tau_k`` = the k-th largest logit. Ties at the boundary are all
    kept (the set can hold more than k ids);
  * top-p (``top_p < 1``): ``tau`` = the largest logit value ``>= tau_k`` whose set
    ``{z_i >= tau}`` holds at least ``top_p`` of the mass of ``{z_i >= tau_k}``: the smallest
    head of the (top-k) distribution reaching ``top_p``, boundary ties all kept;
- the token is the first kept index ``i`` (index order) whose inclusive prefix of kept
  ``p`` exceeds ``u * sum(kept p)``.

No sort: ``tau`` is found by an exact search over the float32 bit patterns (order-preserving
int keys): each pass over the row counts (top-k) or sums (top-p) the row above ``WAYS - 1``
thresholds at once and narrows the interval ``WAYS``-fold, so 32-bit keys take 8 passes at 16
ways. Reductions are block-wide trees in shared memory; the pick is a block prefix scan over
per-thread chunk sums, then one thread scans its chunk. The CPU path (``llvm``) is the same code
with one "thread" per row.
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm.script import tirx as T

from mla_compiler.schedules.target import is_gpu

PARAMS = ("temperature", "top_p", "top_k", "u")  # columns of the params tensor [B, 4] float32


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    threads: int = 512  # per block (power of two); the CPU path uses 1
    ways: int = 16  # thresholds tried per pass (power of two): 32 / log2(ways) passes per search


def default_config(target: tvm.target.Target) -> SamplingConfig:
    return SamplingConfig() if is_gpu(target) else SamplingConfig(threads=1)


def sample(
    vocab: int, *, dtype: str, target: tvm.target.Target, config: SamplingConfig | None = None
) -> tvm.tirx.PrimFunc:
    """``sample(logits [B, V] dtype, params [B, 4] float32, out [B] int32)``; see the module."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"sampling takes float16 or float32 logits, not {dtype}")
    config = config or default_config(target)
    gpu = is_gpu(target)
    V, NT, R = vocab, config.threads, config.ways
    if NT & (NT - 1) or R & (R - 1) or R < 2:
        raise ValueError(f"threads and ways must be powers of two: {config}")
    WARP = 32 if gpu else 1
    if NT % WARP:
        raise ValueError(f"threads must be a multiple of {WARP}: {config}")
    LOGW = WARP.bit_length() - 1  # shuffle steps within a warp
    NW = NT // WARP  # warps per block
    STRIDES = (V + NT - 1) // NT  # strided elements per thread (reductions)
    CHUNK = STRIDES  # contiguous elements per thread (the pick)
    PASSES = (32 + R.bit_length() - 2) // (R.bit_length() - 1)  # search steps for 32-bit keys
    neg_inf = -math.inf
    key_min = -(2**31)

    def sync():
        return T.tvm_storage_sync("shared") if gpu else T.int32(0)

    def xor(v, k):
        """v of lane ^ k (GPU; the CPU path has one lane per warp and never calls it)."""
        return T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), v, k, 32, 32)

    def last(v):
        """v of the warp's last lane, to every lane (the CPU path: v)."""
        return T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), v, WARP - 1, 32, 32) if gpu else v

    def up(v, k):
        return T.tvm_warp_shuffle_up(T.uint32(0xFFFFFFFF), v, k, 32, 32)

    def nonfinite(z):
        """NaN or +-Inf, from the exponent bits (immune to fast-math flags)."""
        bits = T.reinterpret("int32", z)
        return T.bitwise_and(bits, 0x7F800000) == 0x7F800000

    def key(z):
        """int64 key of a float32, ordered like the floats."""
        bits = T.reinterpret("int32", z)
        return T.Cast("int64", T.if_then_else(bits >= 0, bits, T.bitwise_xor(bits, 0x7FFFFFFF)))

    # Reductions: butterfly shuffles in each warp (every lane ends with the warp's value), each
    # warp's value to shared memory (all lanes store the same value: no branch), barrier, every
    # thread folds the NW warp values itself, barrier. No barrier sits under a condition (TVM's
    # ThreadSync refuses that), and block-uniform branches are loops of 0 or 1 trips.
    @T.prim_func
    def kernel(logits_h: T.handle, params_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "sample", "tirx.noalias": True})
        B = T.int64()
        logits = T.match_buffer(logits_h, (B, V), dtype)
        params = T.match_buffer(params_h, (B, 4), "float32")
        out = T.match_buffer(out_h, (B,), "int32")
        for b in T.thread_binding(B, "blockIdx.x") if gpu else T.serial(B):
            for tx in T.thread_binding(NT, "threadIdx.x") if gpu else T.serial(1):
                red = T.alloc_buffer((R * NW,), "float32", scope="shared")
                acc = T.alloc_buffer((R,), "float32", scope="local")
                fs = T.alloc_buffer((6,), "float32", scope="local")
                ks = T.alloc_buffer((4,), "int64", scope="local")  # lo, hi, new lo, new hi
                warp = tx // WARP
                # ---- max and argmax (lowest index among ties): fs[0], fs[1]; a non-finite
                # logit enters as (+inf, index -1), which wins every comparison below
                fs[0] = T.float32(neg_inf)
                fs[1] = T.float32(V)  # index as float32 (exact below 2**24)
                for j in range(STRIDES):
                    if j * NT + tx < V:
                        z = T.Cast("float32", logits[b, j * NT + tx])
                        if nonfinite(z):
                            fs[0] = T.float32(math.inf)
                            fs[1] = T.float32(-1)
                        elif fs[1] == T.float32(V) or z > fs[0]:
                            fs[0] = z
                            fs[1] = T.Cast("float32", j * NT + tx)
                for k in range(LOGW):
                    fs[2] = xor(fs[0], 1 << k)
                    fs[3] = xor(fs[1], 1 << k)
                    if fs[2] > fs[0] or (fs[2] == fs[0] and fs[3] < fs[1]):
                        fs[0] = fs[2]
                        fs[1] = fs[3]
                red[warp] = fs[0]
                red[NW + warp] = fs[1]
                T.evaluate(sync())
                for w in range(NW):
                    fs[2] = red[w]
                    fs[3] = red[NW + w]
                    if fs[2] > fs[0] or (fs[2] == fs[0] and fs[3] < fs[1]):
                        fs[0] = fs[2]
                        fs[1] = fs[3]
                T.evaluate(sync())
                temperature = params[b, 0]
                top_k = T.Cast("int64", params[b, 2])
                greedy = temperature <= T.float32(0) or top_k == 1 or fs[1] < T.float32(0)
                if greedy and tx == 0:
                    out[b] = T.Cast("int32", T.min(T.Cast("int32", fs[1]), V - 1))
                for _ in range(T.if_then_else(greedy, 0, 1)):
                    inv_t = T.float32(1) / temperature
                    # ---- threshold key ks[0]: phase 0 top-k (counts), phase 1 top-p (masses)
                    ks[0] = T.int64(key_min)  # every key >= lo: nothing cut yet
                    fs[4] = T.float32(0)  # top-p: the mass to reach
                    for phase in range(2):
                        active = T.if_then_else(
                            phase == 0, top_k > 0 and top_k < V, params[b, 1] < T.float32(1)
                        )
                        ks[1] = key(fs[0]) + 1  # no key >= hi
                        for it in range(T.if_then_else(active, PASSES, 0)):
                            # (once lo + 1 == hi every threshold is lo: nothing changes)
                            for r in range(R):
                                acc[r] = T.float32(0)
                            for j in range(STRIDES):
                                if j * NT + tx < V:
                                    z = T.Cast("float32", logits[b, j * NT + tx])
                                    kz = key(z)
                                    w = T.if_then_else(
                                        phase == 0, T.float32(1), T.exp((z - fs[0]) * inv_t)
                                    )
                                    for r in range(R):
                                        if kz >= ks[0] + (ks[1] - ks[0]) * r // R:
                                            acc[r] = acc[r] + w
                            for k in range(LOGW):
                                for r in range(R):
                                    acc[r] = acc[r] + xor(acc[r], 1 << k)
                            for r in range(R):
                                red[r * NW + warp] = acc[r]
                            T.evaluate(sync())
                            for r in range(R):
                                acc[r] = T.float32(0)
                                for w in range(NW):
                                    acc[r] = acc[r] + red[r * NW + w]
                            T.evaluate(sync())
                            if phase == 1 and it == 0:
                                fs[4] = params[b, 1] * acc[0]  # top_p x mass(top-k set)
                            # lo: the largest threshold that holds; hi: the smallest that fails
                            ks[2] = ks[0]
                            ks[3] = ks[1]
                            for r in range(R):
                                thr = ks[0] + (ks[1] - ks[0]) * r // R
                                keep = T.if_then_else(
                                    phase == 0,
                                    T.Cast("int64", acc[r]) >= top_k,
                                    acc[r] >= fs[4],
                                )
                                if keep:
                                    ks[2] = thr
                                elif ks[3] == ks[1]:
                                    ks[3] = thr
                            ks[0] = ks[2]
                            ks[1] = ks[3]
                    # ---- pick: chunk sums of kept p (fs[2]), block prefix scan (fs[3])
                    fs[2] = T.float32(0)
                    for j in range(CHUNK):
                        if tx * CHUNK + j < V:
                            z = T.Cast("float32", logits[b, tx * CHUNK + j])
                            if key(z) >= ks[0]:
                                fs[2] = fs[2] + T.exp((z - fs[0]) * inv_t)
                    fs[3] = fs[2]
                    for k in range(LOGW):
                        fs[5] = up(fs[3], 1 << k)
                        if tx % WARP >= (1 << k):
                            fs[3] = fs[3] + fs[5]
                    red[warp] = last(fs[3])  # the warp's total (its last lane's prefix)
                    T.evaluate(sync())
                    fs[1] = T.float32(0)  # total kept mass
                    for w in range(NW):
                        if w < warp:
                            fs[3] = fs[3] + red[w]
                        fs[1] = fs[1] + red[w]
                    T.evaluate(sync())
                    fs[4] = params[b, 3] * fs[1]  # target: u x total
                    # the first thread whose inclusive prefix passes the target, else (rounding)
                    # the last thread holding mass
                    acc[0] = T.if_then_else(
                        fs[3] > fs[4] and fs[2] > T.float32(0), T.Cast("float32", tx), T.float32(NT)
                    )
                    acc[1] = T.if_then_else(
                        fs[2] > T.float32(0), T.Cast("float32", tx), T.float32(-1)
                    )
                    for k in range(LOGW):
                        acc[0] = T.min(acc[0], xor(acc[0], 1 << k))
                        acc[1] = T.max(acc[1], xor(acc[1], 1 << k))
                    red[warp] = acc[0]
                    red[NW + warp] = acc[1]
                    T.evaluate(sync())
                    for w in range(NW):
                        acc[0] = T.min(acc[0], red[w])
                        acc[1] = T.max(acc[1], red[NW + w])
                    if T.Cast("float32", tx) == T.if_then_else(
                        acc[0] < T.float32(NT), acc[0], acc[1]
                    ):
                        # the target within this chunk: minus the exclusive prefix
                        fs[4] = fs[4] - (fs[3] - fs[2])
                        fs[2] = T.float32(0)
                        ks[2] = T.int64(-1)  # picked
                        ks[3] = T.int64(-1)  # last kept
                        for j in range(CHUNK):
                            if tx * CHUNK + j < V and ks[2] < 0:
                                z = T.Cast("float32", logits[b, tx * CHUNK + j])
                                if key(z) >= ks[0]:
                                    ks[3] = T.Cast("int64", tx * CHUNK + j)
                                    fs[2] = fs[2] + T.exp((z - fs[0]) * inv_t)
                                    if fs[2] > fs[4]:
                                        ks[2] = ks[3]
                        out[b] = T.Cast("int32", T.if_then_else(ks[2] >= 0, ks[2], ks[3]))

    return kernel
