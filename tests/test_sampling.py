"""Device sampling (schedules.sampling) vs the float64 model of its rule (reference.sample)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm

from mla_compiler import reference
from mla_compiler.schedules import sampling
from mla_compiler.schedules.target import tvm_target

POISON = -7


@functools.cache
def _kernel(vocab: int, dtype: str, target_name: str = "cpu", threads: int | None = None):
    target = tvm_target(target_name)
    config = sampling.SamplingConfig(threads=threads) if threads else None
    func = sampling.sample(vocab, dtype=dtype, target=target, config=config)
    return tvm.compile(tvm.IRModule({"sample": func}), target=target)["sample"]


def _run(logits: np.ndarray, params: np.ndarray, dtype: str = "float32") -> np.ndarray:
    fn = _kernel(logits.shape[1], dtype)
    out = tvm.runtime.tensor(np.full(logits.shape[0], POISON, np.int32))
    fn(tvm.runtime.tensor(logits.astype(dtype)), tvm.runtime.tensor(params), out)
    return out.numpy()


def _params(b: int, temperature=0.0, top_p=1.0, top_k=0, u=0.5) -> np.ndarray:
    p = np.empty((b, 4), np.float32)
    p[:, 0], p[:, 1], p[:, 2], p[:, 3] = temperature, top_p, top_k, u
    return p


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_greedy_is_argmax_lowest_index(dtype):
    rng = np.random.default_rng()
    x = rng.standard_normal((6, 257)).astype(dtype)
    x[1, [3, 100, 200]] = 50  # ties: the lowest index wins
    x[2, :] = 0  # all equal
    x[3, -1] = 60  # last column
    want = np.argmax(x.astype(np.float32), axis=1)
    assert want[1] == 3 and want[2] == 0
    np.testing.assert_array_equal(_run(x, _params(6, temperature=0.0), dtype), want)
    np.testing.assert_array_equal(  # top_k = 1 at any temperature: argmax
        _run(x, _params(6, temperature=1.5, top_k=1, u=0.99), dtype), want
    )


def test_tiny_top_p_is_argmax():
    rng = np.random.default_rng()
    x = (3 * rng.standard_normal((8, 300))).astype(np.float32)
    got = _run(x, _params(8, temperature=1.0, top_p=1e-6, u=rng.random(8)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=1))


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.3, 0.8, 0), (0.9, 0.9, 40), (2.0, 0.5, 300)],
    ids=["plain", "top_k5", "top_p0.8", "k40_p0.9", "k_ge_vocab"],
)
def test_matches_reference(temperature, top_p, top_k):
    """Each row's pick is the float64 rule's pick, up to float32 rounding of the target: the
    pick is kept and its prefix interval holds u x mass (relative slack 1e-4)."""
    rng = np.random.default_rng()
    b, v = 48, 300
    x = (2 * rng.standard_normal((b, v))).astype(np.float32)
    u = rng.random(b, dtype=np.float32)
    got = _run(x, _params(b, temperature, top_p, top_k, u))
    same = 0
    for i in range(b):
        kept, p = reference.sample_kept(x[i], temperature, top_p, top_k)
        q = np.where(kept, p, 0.0)
        cum = np.cumsum(q)
        target, slack = u[i] * cum[-1], 1e-4 * cum[-1]
        k = got[i]
        assert 0 <= k < v and kept[k], (i, k)
        assert cum[k] - q[k] <= target + slack and cum[k] >= target - slack, (i, k)
        same += k == reference.sample(x[i], temperature, top_p, top_k, u[i])
    assert same >= b - 1


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [(1.0, 1.0, 5), (0.8, 0.7, 0), (1.5, 0.9, 12)],
    ids=["top_k5", "top_p0.7", "k12_p0.9"],
)
def test_distribution(temperature, top_p, top_k):
    """Stratified u over many rows reproduces the kept set's probabilities."""
    rng = np.random.default_rng()
    n, v = 2000, 64
    row = (1.5 * rng.standard_normal(v)).astype(np.float32)
    x = np.broadcast_to(row, (n, v)).copy()
    u = ((np.arange(n) + 0.5) / n).astype(np.float32)
    got = _run(x, _params(n, temperature, top_p, top_k, u))
    kept, p = reference.sample_kept(row, temperature, top_p, top_k)
    prob = np.where(kept, p, 0.0) / p[kept].sum()
    freq = np.bincount(got, minlength=v) / n
    assert not freq[~kept].any()
    np.testing.assert_allclose(freq, prob, atol=2 / n)
    if top_k:
        assert kept.sum() <= top_k


def test_boundary_ties_are_kept():
    """top-k cuts at a value: every logit equal to the k-th largest stays in the set."""
    x = np.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0]], np.float32)
    kept, _ = reference.sample_kept(x[0], 1.0, 1.0, 2)
    np.testing.assert_array_equal(kept, [True, False, True, True, True, False])
    n = 400
    u = ((np.arange(n) + 0.5) / n).astype(np.float32)
    got = _run(np.repeat(x, n, axis=0), _params(n, 1.0, 1.0, 2, u))
    assert set(got.tolist()) == {0, 2, 3, 4}


def test_rejects_bad_configs():
    with pytest.raises(ValueError):
        sampling.sample(100, dtype="int32", target=tvm_target("cpu"))
    with pytest.raises(ValueError):
        sampling.sample(
            100,
            dtype="float32",
            target=tvm_target("cpu"),
            config=sampling.SamplingConfig(threads=3),
        )


def test_cuda_kernel_builds():
    """The GPU kernel compiles with nvcc for sm_90a without spills (no GPU needed)."""
    from mla_compiler import cuda_build, nvcc

    target = tvm_target("sm_90a")
    func = sampling.sample(102400, dtype="float32", target=target)
    with cuda_build.source_only():
        ex = tvm.compile(tvm.IRModule({"sample": func}), target=target)
    source = ex.mod.imports[0].inspect_source()
    assert source.count("__syncthreads") >= 4
    _, report = nvcc.compile_cubin(source, "sm_90a", extra_flags=nvcc.TVM_NVCC_FLAGS)
    (res,) = report.values()
    assert res.spill_bytes == 0


def _gpu_arch() -> str | None:
    try:
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
    except Exception:
        return None
    major, minor = dev.compute_version.split(".")
    return f"sm_{major}{minor}" + ("a" if major == "9" else "")


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_arch() is None, reason="needs a CUDA GPU and TVM with CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_matches_reference(dtype):
    target = tvm_target(_gpu_arch())
    dev = tvm.cuda(0)
    rng = np.random.default_rng()
    b, v = 64, 102400
    x = (2 * rng.standard_normal((b, v))).astype(dtype)
    params = _params(b, 0.8, 0.9, 50, rng.random(b, dtype=np.float32))
    params[:8, 0] = 0  # greedy rows
    fn = tvm.compile(
        tvm.IRModule({"sample": sampling.sample(v, dtype=dtype, target=target)}), target=target
    )["sample"]
    out = tvm.runtime.tensor(np.full(b, POISON, np.int32), dev)
    fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(params, dev), out)
    got = out.numpy()
    want = [
        reference.sample(x[i], *params[i, :2], int(params[i, 2]), params[i, 3]) for i in range(b)
    ]
    assert (got == np.array(want)).sum() >= b - 1
    np.testing.assert_array_equal(got[:8], np.argmax(x[:8].astype(np.float32), axis=1))
