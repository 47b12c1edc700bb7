"""Engine: runtime-only loading, generation API, sampling."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mla_compiler.compiler import CompileOptions, compile_model
from mla_compiler.errors import InputError
from mla_compiler.runtime.engine import Engine, SamplingParams, sample


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "tiny"
    compile_model(
        output=path, preset_name="tiny", options=CompileOptions(max_context=64), log=lambda _m: None
    )
    return path


def test_engine_runs_without_the_compiler_library(artifact):
    code = textwrap.dedent(f"""
        from mla_compiler.runtime import loader
        loader.use_runtime_only()
        from mla_compiler.runtime.engine import Engine
        eng = Engine.load({str(artifact)!r})
        toks = eng.generate([1, 2, 3], max_new_tokens=4)
        import sys
        print(len(toks), loader.compiler_loaded(), "mla_compiler.compiler" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "False", "False"]


def test_stream_equals_generate_and_stops(artifact):
    eng = Engine.load(artifact)
    greedy = eng.generate([5, 6, 7], max_new_tokens=6)
    assert list(eng.stream([5, 6, 7], max_new_tokens=6)) == greedy
    stop = greedy[2]
    first = greedy.index(stop)
    assert eng.generate([5, 6, 7], max_new_tokens=6, stop_ids=(stop,)) == greedy[: first + 1]


def test_seeded_sampling_is_reproducible(artifact):
    eng = Engine.load(artifact)
    a = eng.generate([9, 8], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    b = eng.generate([9, 8], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and all(0 <= t < eng.vocab_size for t in a)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=100), "max-context"),
    ],
)
def test_bad_sampling_params(artifact, kw, msg):
    eng = Engine.load(artifact)
    args = dict(max_new_tokens=2) | kw
    with pytest.raises(InputError, match=msg):
        eng.generate([1, 2], **args)


def test_sample_respects_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 1.0, 0.5, -3.0])
    picks = {sample(logits, SamplingParams(1.0, 1.0, 2), rng) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample(logits, SamplingParams(1.0, 0.5, 0), rng) for _ in range(200)}
    assert picks == {0}
    assert sample(logits, SamplingParams(0.0), rng) == 0


def test_batched_decode_equals_one_at_a_time(artifact):
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44], [7]]
    single = Engine.load(artifact)
    expected = [single.generate(p, max_new_tokens=5) for p in prompts]
    batched = Engine.load(artifact, slots=3)
    assert batched.generate_batch(prompts, max_new_tokens=5) == expected
    # and sequence slots other than 0 decode through the one-token function too
    batched.reset()
    batched.prefill(prompts[1], seq=2)
    logits = batched.decode(expected[1][0], seq=2)
    assert int(np.argmax(logits)) == expected[1][1]


def test_device_sampling_matches_host(artifact):
    """The artifact's ``sample`` function (llvm build of schedules.sampling) picks the same
    greedy tokens as host sampling; seeded sampling through it repeats itself; CPU engines
    sample on the host unless asked."""
    host = Engine.load(artifact, slots=2)
    dev = Engine.load(artifact, slots=2, sampling="device")
    assert (host.sampler, dev.sampler) == ("host", "device")
    prompt = [3, 1, 4, 1, 5]
    assert dev.generate(prompt, max_new_tokens=10) == host.generate(prompt, max_new_tokens=10)
    prompts = [prompt, [2, 7]]
    assert dev.generate_batch(prompts, max_new_tokens=5) == host.generate_batch(
        prompts, max_new_tokens=5
    )
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a, b = dev.generate(prompt, **kw), dev.generate(prompt, **kw)
    assert a == b and all(0 <= t < dev.vocab_size for t in a)
    assert dev.generate(prompt, max_new_tokens=6, temperature=1.0, top_k=1) == host.generate(
        prompt, max_new_tokens=6
    )


def test_step_times_and_one_upload(artifact):
    eng = Engine.load(artifact, sampling="device")
    eng.step_times = []
    eng.generate([1, 2, 3], max_new_tokens=4)
    decode = [t for t in eng.step_times if t["decode"]]
    assert len(eng.step_times) == 4 and len(decode) == 3
    assert all(t["total"] >= t["call"] > 0 and "sample" in t for t in eng.step_times)
    # the inputs are views of one staging buffer, at 64-byte aligned places
    arrays = [np.arange(3, dtype=np.int64), np.arange(5, dtype=np.int32), np.ones((1, 4), "f4")]
    views = eng.staging.upload(arrays)
    for a, v in zip(arrays, views, strict=True):
        np.testing.assert_array_equal(v.numpy(), a)


def test_sampling_mode_is_checked(artifact):
    import types

    import tvm

    from mla_compiler.runtime.engine import _choose_sampler

    with pytest.raises(InputError, match="sampling"):
        Engine.load(artifact, sampling="gpu")
    old = types.SimpleNamespace(module=types.SimpleNamespace(implements_function=lambda _n: False))
    new = types.SimpleNamespace(module=types.SimpleNamespace(implements_function=lambda _n: True))
    assert _choose_sampler("auto", old, tvm.cuda(0)) == "host"  # artifact without `sample`
    assert _choose_sampler("auto", new, tvm.cuda(0)) == "device"
    assert _choose_sampler("auto", new, tvm.cpu()) == "host"
    with pytest.raises(InputError, match="no `sample`"):
        _choose_sampler("device", old, tvm.cuda(0))


def test_bench_records_decode_host_time(artifact):
    from mla_compiler.runtime.bench import bench_engine

    eng = Engine.load(artifact, sampling="device")
    (tg,) = bench_engine(eng, prompts=[], gen=4, reps=1)
    host = tg.to_dict()["decode_host"]
    assert host["sampler"] == "device" and host["steps"] == 4
    assert 0 < host["issue_ms"] <= host["host_ms"] <= host["step_ms"]
