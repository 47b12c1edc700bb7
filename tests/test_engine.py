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
