# The kernel-section macros are TVMScript expanded inside `sample`'s kernel (hygienic=False):
# they read its locals (b, tx, warp, logits, params, out, red, acc, fs, ks, top_k, inv_t),
# which Python static analysis cannot see.
# ruff: noqa: F821, F841
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


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The compile-time numbers of one kernel (the macros read them as ``G.*``)."""

    gpu: bool
    V: int  # vocabulary (row length)
    NT: int  # threads per block
    R: int  # ways: thresholds tried per search pass
    WARP: int  # lanes per warp (the CPU path: 1)
    LOGW: int  # shuffle steps within a warp
    NW: int  # warps per block
    STRIDES: int  # strided elements per thread (reductions)
    CHUNK: int  # contiguous elements per thread (the pick)
    PASSES: int  # search steps for 32-bit keys

    @classmethod
    def of(cls, vocab: int, config: SamplingConfig, gpu: bool) -> _Geometry:
        NT, R = config.threads, config.ways
        if NT & (NT - 1) or R & (R - 1) or R < 2:
            raise ValueError(f"threads and ways must be powers of two: {config}")
        WARP = 32 if gpu else 1
        if NT % WARP:
            raise ValueError(f"threads must be a multiple of {WARP}: {config}")
        strides = (vocab + NT - 1) // NT
        return cls(
            gpu=gpu,
            V=vocab,
            NT=NT,
            R=R,
            WARP=WARP,
            LOGW=WARP.bit_length() - 1,
            NW=NT // WARP,
            STRIDES=strides,
            CHUNK=strides,
            PASSES=(32 + R.bit_length() - 2) // (R.bit_length() - 1),
        )


# ---- expression helpers (plain Python, evaluated while the kernel is parsed) ----------------


def _sync(G: _Geometry):
    return T.tvm_storage_sync("shared") if G.gpu else T.int32(0)


def _xor(v, k):
    """v of lane ^ k (GPU; the CPU path has one lane per warp and never calls it)."""
    return T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), v, k, 32, 32)


def _last(G: _Geometry, v):
    """v of the warp's last lane, to every lane (the CPU path: v)."""
    return T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), v, G.WARP - 1, 32, 32) if G.gpu else v


def _up(v, k):
    return T.tvm_warp_shuffle_up(T.uint32(0xFFFFFFFF), v, k, 32, 32)


def _nonfinite(z):
    """NaN or +-Inf, from the exponent bits (immune to fast-math flags)."""
    bits = T.reinterpret("int32", z)
    return T.bitwise_and(bits, 0x7F800000) == 0x7F800000


def _key(z):
    """int64 key of a float32, ordered like the floats."""
    bits = T.reinterpret("int32", z)
    return T.Cast("int64", T.if_then_else(bits >= 0, bits, T.bitwise_xor(bits, 0x7FFFFFFF)))


# ---- kernel sections ------------------------------------------------------------------------
# Reductions: butterfly shuffles in each warp (every lane ends with the warp's value), each
# warp's value to shared memory (all lanes store the same value: no branch), barrier, every
# thread folds the NW warp values itself, barrier. No barrier sits under a condition (TVM's
# ThreadSync refuses that), and block-uniform branches are loops of 0 or 1 trips.


@T.macro(hygienic=False)
def _row_max(G):
    """max and argmax (lowest index among ties): fs[0], fs[1]; a non-finite logit enters as
    (+inf, index -1), which wins every comparison below."""
    fs[0] = T.float32(-math.inf)
    fs[1] = T.float32(G.V)  # index as float32 (exact below 2**24)
    for j in range(G.STRIDES):
        if j * G.NT + tx < G.V:
            z = T.Cast("float32", logits[b, j * G.NT + tx])
            if _nonfinite(z):
                fs[0] = T.float32(math.inf)
                fs[1] = T.float32(-1)
            elif fs[1] == T.float32(G.V) or z > fs[0]:
                fs[0] = z
                fs[1] = T.Cast("float32", j * G.NT + tx)
    for k in range(G.LOGW):
        fs[2] = _xor(fs[0], 1 << k)
        fs[3] = _xor(fs[1], 1 << k)
        if fs[2] > fs[0] or (fs[2] == fs[0] and fs[3] < fs[1]):
            fs[0] = fs[2]
            fs[1] = fs[3]
    red[warp] = fs[0]
    red[G.NW + warp] = fs[1]
    T.evaluate(_sync(G))
    for w in range(G.NW):
        fs[2] = red[w]
        fs[3] = red[G.NW + w]
        if fs[2] > fs[0] or (fs[2] == fs[0] and fs[3] < fs[1]):
            fs[0] = fs[2]
            fs[1] = fs[3]
    T.evaluate(_sync(G))


@T.macro(hygienic=False)
def _pass_sums(G, phase):
    """acc[r]: the block's count (phase 0) or mass (phase 1) of the keys >= threshold r of
    the interval [ks[0], ks[1])."""
    for r in range(G.R):
        acc[r] = T.float32(0)
    for j in range(G.STRIDES):
        if j * G.NT + tx < G.V:
            z = T.Cast("float32", logits[b, j * G.NT + tx])
            kz = _key(z)
            w = T.if_then_else(phase == 0, T.float32(1), T.exp((z - fs[0]) * inv_t))
            for r in range(G.R):
                if kz >= ks[0] + (ks[1] - ks[0]) * r // G.R:
                    acc[r] = acc[r] + w
    for k in range(G.LOGW):
        for r in range(G.R):
            acc[r] = acc[r] + _xor(acc[r], 1 << k)
    for r in range(G.R):
        red[r * G.NW + warp] = acc[r]
    T.evaluate(_sync(G))
    for r in range(G.R):
        acc[r] = T.float32(0)
        for w in range(G.NW):
            acc[r] = acc[r] + red[r * G.NW + w]
    T.evaluate(_sync(G))


@T.macro(hygienic=False)
def _narrow(G, phase, it):
    """The interval [ks[0], ks[1]) from acc: lo, the largest threshold that holds; hi, the
    smallest that fails."""
    if phase == 1 and it == 0:
        fs[4] = params[b, 1] * acc[0]  # top_p x mass(top-k set)
    ks[2] = ks[0]
    ks[3] = ks[1]
    for r in range(G.R):
        thr = ks[0] + (ks[1] - ks[0]) * r // G.R
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


@T.macro(hygienic=False)
def _threshold(G):
    """threshold key ks[0]: phase 0 top-k (counts), phase 1 top-p (masses)."""
    ks[0] = T.int64(-(2**31))  # every key >= lo: nothing cut yet
    fs[4] = T.float32(0)  # top-p: the mass to reach
    for phase in range(2):
        active = T.if_then_else(phase == 0, top_k > 0 and top_k < G.V, params[b, 1] < T.float32(1))
        ks[1] = _key(fs[0]) + 1  # no key >= hi
        for it in range(T.if_then_else(active, G.PASSES, 0)):
            # (once lo + 1 == hi every threshold is lo: nothing changes)
            _pass_sums(G, phase)
            _narrow(G, phase, it)


@T.macro(hygienic=False)
def _chunk_prefix(G):
    """pick, part 1: this thread's chunk sum of kept p (fs[2]), its inclusive block prefix
    (fs[3]), the total kept mass (fs[1]) and the target u x total (fs[4])."""
    fs[2] = T.float32(0)
    for j in range(G.CHUNK):
        if tx * G.CHUNK + j < G.V:
            z = T.Cast("float32", logits[b, tx * G.CHUNK + j])
            if _key(z) >= ks[0]:
                fs[2] = fs[2] + T.exp((z - fs[0]) * inv_t)
    fs[3] = fs[2]
    for k in range(G.LOGW):
        fs[5] = _up(fs[3], 1 << k)
        if tx % G.WARP >= (1 << k):
            fs[3] = fs[3] + fs[5]
    red[warp] = _last(G, fs[3])  # the warp's total (its last lane's prefix)
    T.evaluate(_sync(G))
    fs[1] = T.float32(0)  # total kept mass
    for w in range(G.NW):
        if w < warp:
            fs[3] = fs[3] + red[w]
        fs[1] = fs[1] + red[w]
    T.evaluate(_sync(G))
    fs[4] = params[b, 3] * fs[1]  # target: u x total


@T.macro(hygienic=False)
def _owner(G):
    """pick, part 2: acc[0], the first thread whose inclusive prefix passes the target, else
    (rounding) acc[1], the last thread holding mass."""
    acc[0] = T.if_then_else(
        fs[3] > fs[4] and fs[2] > T.float32(0), T.Cast("float32", tx), T.float32(G.NT)
    )
    acc[1] = T.if_then_else(fs[2] > T.float32(0), T.Cast("float32", tx), T.float32(-1))
    for k in range(G.LOGW):
        acc[0] = T.min(acc[0], _xor(acc[0], 1 << k))
        acc[1] = T.max(acc[1], _xor(acc[1], 1 << k))
    red[warp] = acc[0]
    red[G.NW + warp] = acc[1]
    T.evaluate(_sync(G))
    for w in range(G.NW):
        acc[0] = T.min(acc[0], red[w])
        acc[1] = T.max(acc[1], red[G.NW + w])


@T.macro(hygienic=False)
def _scan_chunk(G):
    """pick, part 3 (the owner thread): the token within its chunk, to out[b]."""
    # the target within this chunk: minus the exclusive prefix
    fs[4] = fs[4] - (fs[3] - fs[2])
    fs[2] = T.float32(0)
    ks[2] = T.int64(-1)  # picked
    ks[3] = T.int64(-1)  # last kept
    for j in range(G.CHUNK):
        if tx * G.CHUNK + j < G.V and ks[2] < 0:
            z = T.Cast("float32", logits[b, tx * G.CHUNK + j])
            if _key(z) >= ks[0]:
                ks[3] = T.Cast("int64", tx * G.CHUNK + j)
                fs[2] = fs[2] + T.exp((z - fs[0]) * inv_t)
                if fs[2] > fs[4]:
                    ks[2] = ks[3]
    out[b] = T.Cast("int32", T.if_then_else(ks[2] >= 0, ks[2], ks[3]))


def sample(
    vocab: int, *, dtype: str, target: tvm.target.Target, config: SamplingConfig | None = None
) -> tvm.tirx.PrimFunc:
    """``sample(logits [B, V] dtype, params [B, 4] float32, out [B] int32)``; see the module."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"sampling takes float16 or float32 logits, not {dtype}")
    gpu = is_gpu(target)
    G = _Geometry.of(vocab, config or default_config(target), gpu)

    @T.prim_func
    def kernel(logits_h: T.handle, params_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "sample", "tirx.noalias": True})
        B = T.int64()
        logits = T.match_buffer(logits_h, (B, G.V), dtype)
        params = T.match_buffer(params_h, (B, 4), "float32")
        out = T.match_buffer(out_h, (B,), "int32")
        for b in T.thread_binding(B, "blockIdx.x") if gpu else T.serial(B):
            for tx in T.thread_binding(G.NT, "threadIdx.x") if gpu else T.serial(1):
                red = T.alloc_buffer((G.R * G.NW,), "float32", scope="shared")
                acc = T.alloc_buffer((G.R,), "float32", scope="local")
                fs = T.alloc_buffer((6,), "float32", scope="local")
                ks = T.alloc_buffer((4,), "int64", scope="local")  # lo, hi, new lo, new hi
                warp = tx // G.WARP
                _row_max(G)
                temperature = params[b, 0]
                top_k = T.Cast("int64", params[b, 2])
                greedy = temperature <= T.float32(0) or top_k == 1 or fs[1] < T.float32(0)
                if greedy and tx == 0:
                    out[b] = T.Cast("int32", T.min(T.Cast("int32", fs[1]), G.V - 1))
                for _ in range(T.if_then_else(greedy, 0, 1)):
                    inv_t = T.float32(1) / temperature
                    _threshold(G)
                    # ---- pick: chunk sums of kept p, block prefix scan, the owner's scan
                    _chunk_prefix(G)
                    _owner(G)
                    if T.Cast("float32", tx) == T.if_then_else(
                        acc[0] < T.float32(G.NT), acc[0], acc[1]
                    ):
                        _scan_chunk(G)

    return kernel
