"""Weights: random initialisation and loading of HF safetensors checkpoints.

Names follow transformers' DeepseekV2 checkpoints (``model.layers.N.self_attn.kv_b_proj.weight``,
routed experts either per expert ``mlp.experts.E.gate_proj.weight`` as the original checkpoints
write them, or stacked ``mlp.experts.gate_up_proj`` as transformers >= 5 holds them).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

from mla_compiler.errors import WeightError
from mla_compiler.model_export.config import ModelConfig
from mla_compiler.model_export.modeling import DeepseekV2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise WeightError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype: str = "float32") -> DeepseekV2:
    """A model with seeded random weights (normal std 0.02; norms near 1, never all equal)."""
    gen = torch.Generator().manual_seed(seed)
    model = DeepseekV2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(torch_dtype(dtype)).eval()


def seeded_weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One weight of a quantized preset, float32 on the CPU, drawn from its own generator
    (``seed`` and the name): any process draws any tensor alone, in any order, the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=gen)
    return 1.0 + 0.1 * values if "norm" in name else 0.02 * values


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each parameter of our model for ``cfg`` -> its shape, in the model's parameter order."""
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def rope_permutation(dr: int) -> torch.Tensor:
    """Index that reorders interleaved rope dims (x0,x1,x2,..) to half-split (x0,x2,..,x1,x3,..)."""
    return torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])


def permute_rope_rows(cfg: ModelConfig, name: str, w: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows of q_proj/q_b_proj and kv_a_proj_with_mqa that feed RoPE."""
    d = cfg.dims
    perm = rope_permutation(d.qk_rope_head_dim)
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        w = w.view(d.heads, d.qk_head_dim, -1).clone()
        w[:, d.qk_nope_head_dim :] = w[:, d.qk_nope_head_dim :][:, perm]
        return w.view(d.heads * d.qk_head_dim, -1)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        w = w.clone()
        w[d.kv_lora_rank :] = w[d.kv_lora_rank :][perm]
        return w
    return w


def _open_checkpoint(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{index} is corrupt ({e}): re-download the checkpoint") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise WeightError(
                    f"shard {f.name} listed in {index.name} is missing from {model_dir}: "
                    "download every shard"
                )
        return files
    if single.exists():
        try:
            with safe_open(str(single), "pt") as f:
                return dict.fromkeys(f.keys(), single)
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise WeightError(f"{single} is not a readable safetensors file ({e})") from None
    raise WeightError(
        f"{model_dir} has no model.safetensors or model.safetensors.index.json: "
        "pass a HF checkpoint saved with safetensors"
    )


_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _ours(name: str) -> str:
    """Our parameter name of a (non per-expert) checkpoint tensor."""
    ours = name.removeprefix("model.")
    ours = ours.replace("mlp.experts.gate_up_proj", "mlp.experts_gate_up")
    return ours.replace("mlp.experts.down_proj", "mlp.experts_down")


def _check_shapes(
    cfg: ModelConfig, raw: dict[str, torch.Tensor], model_dir: Path
) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the config expects has the shape it implies, checked before any
    reshaping (rope permutation, expert stacking): the first mismatch in parameter order is
    named with both shapes. Tensors the config does not expect are left to ``load_hf_model``.
    Returns ``expected_shapes(cfg)``."""
    want = expected_shapes(cfg)
    order = {name: i for i, name in enumerate(want)}
    found = []
    for name, t in raw.items():
        if m := _EXPERT.search(name):
            layer, part = m.group(1), m.group(3)
            stacked = f"layers.{layer}.mlp.experts_{'down' if part == 'down' else 'gate_up'}"
            if stacked not in want:
                continue
            _, rows, cols = want[stacked]
            shape = (rows, cols) if part == "down" else (rows // 2, cols)
        elif (stacked := _ours(name)) in want:
            shape = want[stacked]
        else:
            continue
        if tuple(t.shape) != shape:
            found.append((order[stacked], name, tuple(t.shape), shape))
    if found:
        _, name, got, shape = min(found)
        raise WeightError(
            f"{name} has shape {got} in {model_dir.name}, config.json implies {shape}: the "
            "weights and config.json disagree; re-download the checkpoint or fix config.json"
        )
    return want


def load_hf_state(cfg: ModelConfig, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read a HF checkpoint into our parameter names (experts stacked, rope rows permuted)."""
    from safetensors import safe_open

    files = _open_checkpoint(Path(model_dir))
    raw: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), "pt") as h:
                for n in names:
                    raw[n] = h.get_tensor(n)
        except WeightError:
            raise
        except Exception as e:
            raise WeightError(
                f"cannot read {f.name} ({e}): the file is truncated or corrupt"
            ) from None

    want = _check_shapes(cfg, raw, Path(model_dir))
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in raw.items():
        if m := _EXPERT.search(name):
            experts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t
            continue
        ours = _ours(name)
        # tensors the config does not expect stay as they are: load_hf_model names them
        state[ours] = permute_rope_rows(cfg, ours, t) if ours in want else t
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:
        if f"layers.{layer}.mlp.experts_gate_up" not in want:
            raise WeightError(
                f"checkpoint {model_dir} has routed experts in layer {layer}, a dense layer for "
                f"config.json (n_routed_experts={cfg.n_routed_experts}, first_k_dense_replace="
                f"{cfg.first_k_dense_replace}): config.json and the weights disagree"
            )
        ids = sorted(e for lay, e in experts if lay == layer)
        if ids != list(range(cfg.n_routed_experts)):
            raise WeightError(
                f"layer {layer} has experts {ids[:3]}..{ids[-3:]} but config says "
                f"n_routed_experts={cfg.n_routed_experts}: config and weights disagree"
            )
        parts = [experts[(layer, e)] for e in ids]
        for e, p in zip(ids, parts, strict=True):
            if set(p) != {"gate", "up", "down"}:
                raise WeightError(
                    f"layer {layer} expert {e} lacks { ({'gate', 'up', 'down'} - set(p)) }"
                )
        state[f"layers.{layer}.mlp.experts_gate_up"] = torch.stack(
            [torch.cat([p["gate"], p["up"]]) for p in parts]
        )
        state[f"layers.{layer}.mlp.experts_down"] = torch.stack([p["down"] for p in parts])
    if "lm_head.weight" not in state and cfg.tie_word_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    return state


def load_hf_model(cfg: ModelConfig, model_dir: str | Path, *, dtype: str = "float32") -> DeepseekV2:
    """Our model with a HF checkpoint's weights; names each missing, extra or misshaped tensor."""
    state = load_hf_state(cfg, model_dir)
    model = DeepseekV2(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise WeightError(
            f"checkpoint {model_dir} lacks {', '.join(missing[:3])}{more}: "
            "config.json and the weights disagree, or a shard is incomplete"
        )
    extra = sorted(k for k in set(state) - set(expected) if "rotary_emb" not in k)
    if extra:
        raise WeightError(
            f"checkpoint {model_dir} has tensors the config does not expect: {', '.join(extra[:3])}"
            " — config.json and the weights disagree"
        )
    with torch.no_grad():
        for name, p in expected.items():
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightError(
                    f"{name} has shape {tuple(t.shape)}, config expects {tuple(p.shape)}: "
                    "config.json and the weights disagree"
                )
            if not t.is_floating_point():
                raise WeightError(
                    f"{name} has dtype {t.dtype}: weights must be float16/bfloat16/float32"
                )
            p.copy_(t.to(torch.float32))
    return model.to(torch_dtype(dtype)).eval()
