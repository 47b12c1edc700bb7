"""No data loss, no silent wrong answers, no tracebacks: `compile --output` never destroys what is
not an artifact, missing or non-finite weights are refused, broken artifacts give one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import gpu_available, run_cli
from test_bad_input import _one_line_error

from mla_compiler import artifact
from mla_compiler.errors import InputError, NumericsError


def _tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (what must survive untouched)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "tiny"
    run_cli("compile", "--preset", "tiny", "--output", str(out), "--max-context", "40")
    return out


@pytest.fixture
def checkpoint_with_notes(hf_checkpoint, tmp_path) -> Path:
    """A real HF checkpoint directory that also holds an unrelated file of the user's."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint("small-yarn"), ckpt)
    (ckpt / "NOTES.txt").write_text("my notes, not in any backup\n")
    return ckpt


def _copy(src: Path, dst: Path, **meta_changes) -> Path:
    shutil.copytree(src, dst)
    if meta_changes:
        meta = json.loads((dst / artifact.METADATA).read_text())
        meta.update(meta_changes)
        (dst / artifact.METADATA).write_text(json.dumps(meta))
    return dst


# ---- compile --output ---------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_output_onto_the_input_checkpoint_is_refused(checkpoint_with_notes, force):
    before = _tree_digest(checkpoint_with_notes)
    args = ["compile", "--model", str(checkpoint_with_notes), "-o", str(checkpoint_with_notes)]
    proc = run_cli(*args, *(["--force"] if force else []), check=False)
    _one_line_error(proc, "would replace the input")
    assert _tree_digest(checkpoint_with_notes) == before


def test_output_holding_the_input_is_refused(checkpoint_with_notes):
    before = _tree_digest(checkpoint_with_notes.parent)
    args = ["compile", "--model", str(checkpoint_with_notes), "--force"]
    proc = run_cli(*args, "-o", str(checkpoint_with_notes.parent), check=False)
    _one_line_error(proc, "would replace the input")
    assert _tree_digest(checkpoint_with_notes.parent) == before


def test_output_dot_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    for extra in ([], ["--force"]):
        proc = subprocess.run(
            [sys.executable, "-m", "mla_compiler.cli", "compile", "-o", ".", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        _one_line_error(proc, "current directory")
    assert (tmp_path / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_output_onto_other_data_needs_force(tmp_path, kind):
    target = tmp_path / "data"
    if kind == "directory":
        target.mkdir()
        (target / "NOTES.txt").write_text("notes")
    else:
        target.write_text("a file")
    before = _tree_digest(tmp_path)
    proc = run_cli("compile", "--preset", "tiny", "-o", str(target), check=False)
    _one_line_error(proc, "--force")
    assert _tree_digest(tmp_path) == before


def test_check_output_accepts_new_empty_and_artifact_paths(tmp_path, tiny):
    assert artifact.check_output(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    artifact.check_output(tmp_path / "empty")
    artifact.check_output(tiny)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(InputError, match="not an mla-compiler artifact"):
        artifact.check_output(tmp_path / "other")
    artifact.check_output(tmp_path / "other", force=True)
    (tmp_path / "link").symlink_to(tmp_path / "other")  # a link to data is data
    with pytest.raises(InputError):
        artifact.check_output(tmp_path / "link")


def test_force_replaces_a_directory_and_a_link_loses_only_itself(tmp_path):
    """--force replaces the path itself: a symlink at --output goes, its target stays."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "x").write_text("x")
    (tmp_path / "link").symlink_to(real)

    def write(tmp: Path) -> None:
        (tmp / "new").write_text("new")

    for out in (tmp_path / "link", real):
        artifact.write_atomic(out, write, force=True)
        assert (out / "new").read_text() == "new" and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temp left


def test_recompile_replaces_an_artifact(tiny, tmp_path):
    dst = _copy(tiny, tmp_path / "again")
    (dst / "stale.txt").write_text("from the old artifact")
    run_cli("compile", "--preset", "tiny", "-o", str(dst), "--max-context", "24")
    assert artifact.read_metadata(dst)["max_context"] == 24 and not (dst / "stale.txt").exists()


# ---- weights ------------------------------------------------------------------------------


def test_missing_weights_of_a_stored_artifact_are_refused(tiny, tmp_path):
    for name, weights in {
        "random": None,  # the preset's stored weights
        "hf": {"source": "hf", "path": "/models/DeepSeek-V2-Lite"},
    }.items():
        dst = _copy(tiny, tmp_path / name, **({"weights": weights} if weights else {}))
        (dst / artifact.WEIGHTS).unlink()
        proc = run_cli("run", str(dst), "--prompt-ids", "1,2", "-n", "2", check=False)
        _one_line_error(proc, "weights.safetensors missing")


def test_unstored_preset_weights_are_drawn(tiny, tmp_path):
    meta = artifact.read_metadata(tiny)
    dst = _copy(tiny, tmp_path / "drawn", weights={**meta["weights"], "stored": False})
    (dst / artifact.WEIGHTS).unlink()
    out = json.loads(run_cli("run", str(dst), "--prompt-ids", "1,2", "-n", "3", "--json").stdout)
    assert 1 <= len(out["tokens"]) <= 3


def test_non_finite_checkpoint_weight_is_named_at_compile(hf_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(hf_checkpoint("small-yarn"), tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    state[name][2, 5] = float("nan")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, str(ckpt / "model.safetensors"))
    proc = run_cli("compile", "--model", str(ckpt), "-o", str(tmp_path / "o"), check=False)
    _one_line_error(proc, "layers.1.mlp.experts.3.down_proj.weight holds 1 non-finite")
    assert "NaN/Inf" in proc.stderr and not (tmp_path / "o").exists()
    assert torch.isnan(state[name]).sum() == 1


@pytest.fixture(scope="module")
def nan_artifact(tiny, tmp_path_factory) -> Path:
    """The tiny artifact with a NaN in its final norm: every logit is NaN."""
    from safetensors.numpy import load_file, save_file

    dst = _copy(tiny, tmp_path_factory.mktemp("nan") / "nan")
    state = load_file(str(dst / artifact.WEIGHTS))
    state["norm.weight"][3] = np.nan
    save_file(state, str(dst / artifact.WEIGHTS))
    return dst


def test_non_finite_logits_stop_run(nan_artifact):
    proc = run_cli("run", str(nan_artifact), "--prompt-ids", "1,2,3", "-n", "4", check=False)
    _one_line_error(proc, "non-finite logits")


@pytest.mark.parametrize("sampling", ["host", "device"])
def test_non_finite_logits_raise_from_generate(nan_artifact, sampling):
    from mla_compiler.runtime.engine import Engine

    eng = Engine.load(nan_artifact, sampling=sampling)
    for params in ({}, {"temperature": 0.8, "top_k": 5, "seed": 1}):
        with pytest.raises(NumericsError, match="sequence 0 at position 2"):
            eng.generate([1, 2, 3], max_new_tokens=3, **params)
        with pytest.raises(NumericsError, match="sequence 0 at position 1"):
            Engine.load(nan_artifact, slots=2, sampling=sampling).generate_batch(
                [[1, 4], [2, 3]], max_new_tokens=2, **params
            )


def test_non_finite_logits_are_a_500_from_serve(nan_artifact):
    from test_serve import _post

    from mla_compiler.runtime.engine import Engine
    from mla_compiler.runtime.serve import OpenAIServer

    srv = OpenAIServer(Engine.load(nan_artifact), host="127.0.0.1", port=0).start()
    try:
        status, body = _post(srv, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    finally:
        srv.shutdown()
    assert status == 500 and "non-finite logits" in body["error"]["message"], body


# ---- broken artifacts -------------------------------------------------------------------


def test_truncated_library_is_refused(tiny, tmp_path):
    dst = _copy(tiny, tmp_path / "cut")
    lib = dst / artifact.MODULE
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    proc = run_cli("run", str(dst), "--prompt-ids", "1", "-n", "1", check=False)
    _one_line_error(proc, "truncated")


def test_replaced_library_is_refused(tiny, tmp_path):
    dst = _copy(tiny, tmp_path / "swapped")
    lib = dst / artifact.MODULE
    data = bytearray(lib.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    lib.write_bytes(bytes(data))
    proc = run_cli("run", str(dst), "--prompt-ids", "1", "-n", "1", check=False)
    _one_line_error(proc, "sha256 mismatch")


@pytest.mark.parametrize(
    "change",
    [{"model": None}, {"param_names": "x"}, {"mla": True}, {"model": {"dims": {}}}],
    ids=["no-model", "param-names-str", "mla-bool", "model-incomplete"],
)
def test_malformed_metadata_is_one_line(tiny, tmp_path, change):
    dst = _copy(tiny, tmp_path / "meta")
    meta = json.loads((dst / artifact.METADATA).read_text())
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (dst / artifact.METADATA).write_text(json.dumps(meta))
    for cmd in (["run", str(dst), "--prompt-ids", "1"], ["bench", str(dst), "-p", "4", "-n", "1"]):
        _one_line_error(run_cli(*cmd, check=False), "compile the artifact again")


@pytest.mark.skipif(gpu_available(), reason="the message for a machine without a GPU")
def test_gpu_artifact_on_a_cpu_machine_names_the_gpu_side(tiny, tmp_path):
    """An sm_90a artifact (manifest and metadata say so) on this GPU-less machine."""
    dst = _copy(tiny, tmp_path / "sm90a", target="sm_90a")
    manifest = dst / "model.manifest.json"
    data = json.loads(manifest.read_text())
    data.update(targets=["sm_90a"], images=["sm_90a"])
    manifest.write_text(json.dumps(data))
    for device in ([], ["--device", "cpu"]):
        proc = run_cli("run", str(dst), "--prompt-ids", "1", "-n", "1", *device, check=False)
        _one_line_error(proc, "built for GPU (sm_90a)")
        assert "--target cpu" in proc.stderr and "built for cpu" not in proc.stderr


# ---- CLI conventions ----------------------------------------------------------------------


def test_version():
    proc = run_cli("--version")
    assert proc.stdout.startswith("mla-compiler 0.1.0 (TVM 0.27.0.post1"), proc.stdout


def test_every_option_has_help_and_no_markup():
    import argparse

    from mla_compiler import cli

    texts = []
    parser = argparse.ArgumentParser(prog="mla-compiler", description=cli.DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd")
    for add in (cli._add_compile, cli._add_run, cli._add_bench, cli._add_serve, cli._add_tune):
        add(sub)
    for name, p in sub.choices.items():
        texts.append(p.format_help())
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    texts.append(run_cli("--help").stdout)
    for text in texts:
        assert "``" not in text and ":func:" not in text, text


def test_run_defaults_to_tokens_that_fit_the_context(tiny):
    """No --max-new-tokens: up to 128 new tokens, fewer where the context (40) ends first."""
    proc = run_cli("run", str(tiny), "--prompt-ids", ",".join(["3"] * 30), "--json")
    tokens = json.loads(proc.stdout.splitlines()[-1])["tokens"]
    assert 1 <= len(tokens) <= 10
    assert len(tokens) == 10 or tokens[-1] == 2  # the context's end, or the tiny preset's EOS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "0"], "-r must be at least 1"),
        (["-n", "0"], "-n must be at least 1"),
        (["-p", "0,8"], "positive lengths"),
        (["-p", "x"], "positive lengths"),
    ],
    ids=["reps0", "gen0", "prompt0", "prompt-text"],
)
def test_bench_bad_numbers(tiny, args, message):
    _one_line_error(run_cli("bench", str(tiny), *args, check=False), message)


def test_bench_plot_without_matplotlib_fails_before_running(tiny, tmp_path):
    blocker = tmp_path / "site" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "mla_compiler.cli", "bench", str(tiny), "--plot", "b.png"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    _one_line_error(proc, "mla-compiler[bench]")
    assert "pp512" not in proc.stdout and not (tmp_path / "b.png").exists()


@pytest.mark.parametrize(
    "where", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)], ids=["llvm", "cuda"]
)
def test_device_sampler_refuses_non_finite_rows(where):
    """The sampling kernel returns -1 for a row with NaN / +-Inf, whatever the params; finite
    rows in the same batch keep their tokens (reference.sample agrees)."""
    import tvm
    from test_sampling import _gpu_arch

    from mla_compiler import reference
    from mla_compiler.schedules import sampling
    from mla_compiler.schedules.target import tvm_target

    if where == "gpu" and _gpu_arch() is None:
        pytest.skip("needs a CUDA GPU and TVM with CUDA")
    target = tvm_target("cpu" if where == "cpu" else _gpu_arch())
    dev = tvm.cpu() if where == "cpu" else tvm.cuda(0)
    vocab = 300 if where == "cpu" else 102400
    fn = tvm.compile(
        tvm.IRModule({"sample": sampling.sample(vocab, dtype="float32", target=target)}), target
    )["sample"]
    rng = np.random.default_rng()
    x = rng.standard_normal((5, vocab)).astype(np.float32)
    x[1, 7], x[2, vocab - 1], x[3, :] = np.nan, np.inf, np.nan
    x[4, 0] = -np.inf
    for temperature, top_p, top_k in [(0.0, 1.0, 0), (0.9, 0.8, 20), (1.2, 1.0, 0)]:
        params = np.tile(np.float32([temperature, top_p, top_k, 0.4]), (5, 1))
        out = tvm.runtime.tensor(np.full(5, -7, np.int32), dev)
        fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(params, dev), out)
        want = [reference.sample(row, temperature, top_p, top_k, 0.4) for row in x]
        assert want[1:] == [-1, -1, -1, -1] and want[0] >= 0
        assert out.numpy().tolist() == want


def test_bench_json_and_plot(tiny, tmp_path):
    """With matplotlib (the [bench] extra) the plot is a PNG and the JSON holds each test."""
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "b.png", tmp_path / "b.json"
    run_cli(
        "bench", str(tiny), "-p", "6", "-n", "2", "-r", "1", "--json", str(out), "--plot", str(png)
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["test"] for r in json.loads(out.read_text())["results"]] == ["pp6", "tg2"]


def test_artifact_recompiled_in_place_loads_the_new_library(tmp_path):
    """One process loads an artifact, the artifact is recompiled at the same path (another MLA
    mode: another cache layout), the process loads it again: it runs the new library, not the
    one dlopen already holds for that path."""
    from mla_compiler.runtime.engine import Engine

    out = tmp_path / "art"
    for mla in ("3", "0"):
        run_cli("compile", "--preset", "tiny", "-o", str(out), "--max-context", "24", "--mla", mla)
        eng = Engine.load(out)
        assert len(eng.generate([1, 2, 3], max_new_tokens=2)) >= 1
