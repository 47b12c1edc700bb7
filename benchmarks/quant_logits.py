"""Logits of a quantized artifact against our PyTorch model in float32 on the same blocks decoded
by gguf-py (issue #28), on the machine that runs it:

    python -m benchmarks.quant_logits ARTIFACT [--prompt 300] [--steps 8] [--out result.json]

The artifact's weights (stored, or a seeded preset's drawn and quantized at load) are decoded
with ``gguf.quants.dequantize`` into ``DeepseekV2`` (float32, on the GPU when there is one). The
prompt runs in ubatch chunks, then greedy decode steps feed both the same tokens. Reports the
relative error of the logits and how often the argmax agrees; exit 1 past ``--max-rel``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GPU_TOKENS = 300


def reference_model(path: Path, meta: dict, device: str):
    """DeepseekV2 in float32 with the artifact's weights, quantized ones decoded by gguf-py."""
    import gguf
    import torch
    from safetensors.numpy import load_file

    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.modeling import DeepseekV2
    from mla_compiler.runtime import engine as E

    names = meta["param_names"]
    if (path / "weights.safetensors").exists():
        stored = load_file(str(path / "weights.safetensors"))
        arrays = [stored[n] for n in names]
    else:
        arrays = E.seeded_blocks(meta)  # the same draws the engine uploads
    with torch.device(device):  # initialised there (buffers too), then overwritten
        model = DeepseekV2(ModelConfig.from_dict(meta["model"])).float().eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in zip(names, arrays, strict=True):
            qtype = meta["weight_formats"].get(name)
            if qtype is not None:
                kind = gguf.GGMLQuantizationType[qtype.upper()]
                a = gguf.quants.dequantize(a, kind)
            p = params[name]
            p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)).view(p.shape))
    return model


def compare(path: Path, *, prompt: int, steps: int) -> dict:
    import torch

    from mla_compiler import artifact
    from mla_compiler.model_export.modeling import single_sequence_inputs
    from mla_compiler.runtime.engine import Engine

    meta = artifact.read_metadata(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, meta["model"]["vocab_size"], prompt).tolist()
    eng = Engine.load(path, max_context=prompt + steps + 8)
    got = [eng.prefill(ids, all_logits=True)]
    model = reference_model(path, meta, device)
    with torch.no_grad():
        cache = model.new_cache(prompt + steps + 8, torch.float32).to(device)
        inputs = {
            k: v.to(device) if hasattr(v, "to") else v
            for k, v in single_sequence_inputs(ids, start=0, logits="all").items()
        }
        logits, cache = model(**inputs, cache=cache)
        want = [logits.float().cpu().numpy()]
        tok, seq = int(want[0][-1].argmax()), len(ids)
        for _ in range(steps):  # both fed the reference's greedy tokens
            got.append(eng.decode(tok)[None])
            step = {
                k: v.to(device) if hasattr(v, "to") else v
                for k, v in single_sequence_inputs([tok], start=seq).items()
            }
            out, cache = model(**step, cache=cache)
            want.append(out.float().cpu().numpy())
            tok, seq = int(want[-1][-1].argmax()), seq + 1
    g, w = np.concatenate(got).astype(np.float64), np.concatenate(want).astype(np.float64)
    rel = float(np.linalg.norm(g - w) / np.linalg.norm(w))
    agree = float((g.argmax(-1) == w.argmax(-1)).mean())
    return {
        "artifact": str(path),
        "target": meta["target"],
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "quant": meta["weights"].get("quant"),
        "rows": int(g.shape[0]),
        "rel_err": rel,
        "argmax_agreement": agree,
        "finite": bool(np.isfinite(g).all()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt", type=int, default=GPU_TOKENS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-rel", type=float, default=2e-2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    res = compare(args.artifact, prompt=args.prompt, steps=args.steps)
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0 if res["finite"] and res["rel_err"] <= args.max_rel else 1


if __name__ == "__main__":
    from benchmarks.package_shim import use_checkout_package

    use_checkout_package()
    sys.exit(main())
