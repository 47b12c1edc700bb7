"""The CLI end to end on the CPU: compile a transformers checkpoint, generate HF's greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

PROMPT_LEN, NEW = 300, 16


@pytest.fixture(scope="module")
def hf_reference(hf_checkpoint):
    path = hf_checkpoint("small-yarn", scale=8.0)
    model = hf_checkpoint.models[("small-yarn", 1, 8.0, 0)][1]
    prompt = torch.randint(3, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model.generate(prompt[None], max_new_tokens=NEW, do_sample=False)
    return path, prompt.tolist(), out[0, PROMPT_LEN:].tolist()


@pytest.mark.parametrize("mla", [0, 2, 3], ids=["mla0", "mla2", "mla3"])
def test_compile_run_matches_hf_greedy(tmp_path, hf_reference, mla):
    path, prompt, expected = hf_reference
    out = tmp_path / f"art{mla}"
    run_cli(
        "compile",
        "--model",
        str(path),
        "--target",
        "cpu",
        "--dtype",
        "float32",
        "--mla",
        str(mla),
        "--output",
        str(out),
        "--max-context",
        "512",
    )
    meta = json.loads((out / "metadata.json").read_text())
    layers, d = 3, meta["model"]["dims"]
    if mla in (2, 3):
        assert (
            meta["kv_cache_bytes_per_token"]
            == layers * (d["kv_lora_rank"] + d["qk_rope_head_dim"]) * 2
        )
    assert meta["mla"] == mla and meta["target"] == "cpu" and meta["tvm_version"]
    proc = run_cli(
        "run",
        str(out),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        str(NEW),
        "--temperature",
        "0",
        "--ubatch",
        "64",
        "--json",
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected


def test_readme_main_job(tmp_path):
    out = tmp_path / "out"
    run_cli("compile", "--target", "cpu", "--output", str(out))
    proc = run_cli("run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json")
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    assert len(tokens) == 8 and all(0 <= t < 512 for t in tokens)


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_compile_cuda_without_gpu(tmp_path, arch):
    out = tmp_path / arch
    run_cli("compile", "--preset", "tiny", "--target", arch, "--output", str(out))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["target"] == arch and (out / "model.so").stat().st_size > 0
