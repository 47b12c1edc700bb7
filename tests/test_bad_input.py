"""Each bad input exits non-zero with one line that says what is wrong, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli


def _one_line_error(proc, pattern: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.strip().splitlines() if "error" in line.lower()]
    assert len(err) == 1, proc.stderr
    assert err[0] == proc.stderr.strip().splitlines()[-1]
    assert pattern.lower() in err[0].lower(), err[0]


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny"
    run_cli(
        "compile",
        "--preset",
        "tiny",
        "--target",
        "cpu",
        "--output",
        str(out),
        "--max-context",
        "32",
    )
    return out


def _broken_checkpoint(hf_checkpoint, tmp_path, mutate) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint("small-yarn"), dst)
    mutate(dst)
    return str(dst)


def _edit_config(key, value=None, *, drop=False):
    def mutate(dst):
        cfg = json.loads((dst / "config.json").read_text())
        if drop:
            cfg.pop(key)
        else:
            cfg[key] = value
        (dst / "config.json").write_text(json.dumps(cfg))

    return mutate


CASES = {
    "missing-key": (_edit_config("kv_lora_rank", drop=True), "lacks kv_lora_rank"),
    "unknown-topk": (_edit_config("topk_method", "noaux_tc"), "topk_method"),
    "wrong-shape": (_edit_config("v_head_dim", 8), "has shape"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "corrupt-json": (lambda d: (d / "config.json").write_text("{"), "not valid json"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(hf_checkpoint, tmp_path, case):
    mutate, msg = CASES[case]
    path = _broken_checkpoint(hf_checkpoint, tmp_path, mutate)
    proc = run_cli("compile", "--model", path, "--output", str(tmp_path / "o"), check=False)
    _one_line_error(proc, msg)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_empty_and_missing_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(
        run_cli(
            "compile", "--model", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), check=False
        ),
        "no config.json",
    )
    _one_line_error(
        run_cli(
            "compile", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), check=False
        ),
        "does not exist",
    )


def test_unknown_target(tmp_path):
    _one_line_error(
        run_cli("compile", "--target", "sm_77", "-o", str(tmp_path / "o"), check=False),
        "unknown target",
    )


def test_unknown_preset(tmp_path):
    _one_line_error(
        run_cli("compile", "--preset", "huge", "-o", str(tmp_path / "o"), check=False),
        "unknown preset",
    )


def test_token_outside_vocab(tiny_artifact):
    proc = run_cli(
        "run", str(tiny_artifact), "--prompt-ids", "1,512", "--max-new-tokens", "2", check=False
    )
    _one_line_error(proc, "outside the vocabulary")


def test_prompt_longer_than_context(tiny_artifact):
    ids = ",".join(["1"] * 40)
    proc = run_cli(
        "run", str(tiny_artifact), "--prompt-ids", ids, "--max-new-tokens", "2", check=False
    )
    _one_line_error(proc, "max-context")


def test_bad_prompt_ids(tiny_artifact):
    proc = run_cli(
        "run", str(tiny_artifact), "--prompt-ids", "1,x", "--max-new-tokens", "2", check=False
    )
    _one_line_error(proc, "comma-separated")


def test_text_prompt_without_tokenizer(tiny_artifact):
    proc = run_cli(
        "run", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "2", check=False
    )
    _one_line_error(proc, "tokenizer")


def test_artifact_from_other_tvm_version(tiny_artifact, tmp_path):
    dst = tmp_path / "old"
    shutil.copytree(tiny_artifact, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["tvm_version"] = "0.19.0"
    (dst / "metadata.json").write_text(json.dumps(meta))
    proc = run_cli("run", str(dst), "--prompt-ids", "1", "--max-new-tokens", "1", check=False)
    _one_line_error(proc, "built with TVM 0.19.0")


def test_cpu_artifact_refused_on_gpu_request(tiny_artifact):
    proc = run_cli(
        "run",
        str(tiny_artifact),
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "1",
        "--device",
        "cuda",
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_missing_artifact(tmp_path):
    proc = run_cli(
        "run", str(tmp_path / "none"), "--prompt-ids", "1", "--max-new-tokens", "1", check=False
    )
    _one_line_error(proc, "does not exist")


def test_empty_prompt(tiny_artifact):
    proc = run_cli(
        "run", str(tiny_artifact), "--prompt-ids", "", "--max-new-tokens", "2", check=False
    )
    _one_line_error(proc, "empty prompt")


def test_integer_weights_are_refused(hf_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    def mutate(dst):
        state = load_file(str(dst / "model.safetensors"))
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
        save_file(state, str(dst / "model.safetensors"))

    path = _broken_checkpoint(hf_checkpoint, tmp_path, mutate)
    proc = run_cli("compile", "--model", path, "--output", str(tmp_path / "o"), check=False)
    _one_line_error(proc, "must be float16/bfloat16/float32")
