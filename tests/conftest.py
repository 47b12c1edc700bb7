"""Shared fixtures: HF checkpoints written by transformers, compiled tiny artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Test the installed package, editable or not: `python -m pytest` (and `python -c` / `-m` in a
# subprocess) put the working directory first on sys.path, where the checkout's mla_compiler/
# folder, without pyproject's package-dir mapping (schedules/ -> mla_compiler.schedules), would
# shadow a plain install. An editable install finds this checkout without that entry.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
os.environ.setdefault("PYTHONSAFEPATH", "1")  # the subprocesses (Python >= 3.11)

# Small DeepSeek-V2 configs (name -> HF config.json overrides) covering the family's features.
HF_CONFIGS = {
    "lite2": dict(  # V2-Lite's real shapes, 2 layers (dense first layer, then MoE)
        vocab_size=1024,
        hidden_size=2048,
        num_hidden_layers=2,
        num_attention_heads=16,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        max_position_embeddings=163840,
    ),
    # K of 256 (hidden) and of 32 x 3 / 64 (experts' down, o_proj, kv_b): Q4_K_M mixes every
    # type on it (Q4_K, Q6_K, Q5_0 and Q8_0 fallbacks, f32)
    "quant": dict(
        vocab_size=256,
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=512,
        moe_intermediate_size=96,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "small-yarn": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=8.0,
            original_max_position_embeddings=64,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=0.8,
        ),
        max_position_embeddings=512,
    ),
    "qlora-grouped": dict(  # full V2's q_lora path and group-limited routing
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        max_position_embeddings=512,
    ),
}


def hf_config_dict(name: str) -> dict:
    cfg = dict(
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg.update(HF_CONFIGS[name])
    return cfg


def make_hf_model(name: str, *, seed: int = 0, scale: float = 1.0):
    """A random transformers DeepseekV2ForCausalLM; ``scale`` sharpens logits for greedy tests."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**hf_config_dict(name))).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in n or "lm_head" in n:
                p.mul_(scale)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Write HF checkpoints on demand: ``hf_checkpoint(name, shards=1, scale=1.0)`` -> dir
    (removed at the end of the session)."""
    cache: dict = {}

    def get(name: str, *, shards: int = 1, scale: float = 1.0, seed: int = 0) -> Path:
        key = (name, shards, scale, seed)
        if key not in cache:
            model = make_hf_model(name, seed=seed, scale=scale)
            out = tmp_path_factory.mktemp(f"hf-{name}")
            if shards > 1:
                total = sum(p.numel() * 4 for p in model.parameters())
                model.save_pretrained(out, max_shard_size=max(total // shards, 1 << 16))
            else:
                model.save_pretrained(out)
            cache[key] = (out, model)
        return cache[key][0]

    get.models = cache
    yield get
    # pytest keeps the temp dirs of the last 3 runs: lite2's checkpoint alone is 2.6 GB (f32)
    for out, _ in cache.values():
        shutil.rmtree(out, ignore_errors=True)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``mla-compiler`` in a subprocess (as a user would)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "mla_compiler.cli", *args], capture_output=True, text=True, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mla-compiler {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def nvcc_available() -> bool:
    """nvcc and cuobjdump are installed: CUDA code can be compiled and its SASS read here."""
    from mla_compiler.nvcc import find_tool

    try:
        find_tool("nvcc")
        find_tool("cuobjdump")
    except Exception:  # noqa: BLE001
        return False
    return True


def require_nvcc():
    """``mla_compiler.nvcc`` for static CUDA checks; skips the test where the tools are missing."""
    if not nvcc_available():
        pytest.skip("nvcc / cuobjdump not installed")
    from mla_compiler import nvcc

    return nvcc


def gpu_available() -> bool:
    try:
        import tvm

        return torch.cuda.is_available() and tvm.cuda(0).exist
    except Exception:  # noqa: BLE001
        return False


__all__ = [
    "hf_config_dict",
    "make_hf_model",
    "run_cli",
    "gpu_available",
]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package: loaded by path). Its
    sibling scripts (``import bench_decode``) are found on sys.path while it loads; only the
    scripts' ``__main__`` blocks touch the import system themselves."""
    import importlib.util

    folder = str(ROOT / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)  # this entry only: a change of the script's own stays visible
    return module
