"""GPU check of a random-weight artifact against our PyTorch model in float32 with the same
seeded weights (e.g. the ``deepseek-v2-lite-2l`` preset: every real V2-Lite shape, two layers).

Script: a 300-token prompt in 128-token chunks (prefill kernels over a growing cache, all
logits), 8 decode steps (decode function), one two-sequence step (prefill function over two
slots). Each part's logits are compared with the reference: relative Frobenius error and argmax
agreement. Exit status 1 when a part is off.

    python -m benchmarks.check_torch ARTIFACT [--json FILE] [--max-rel 0.02] [--min-argmax 0.95]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

PROMPT = [(i * 7919) % 50000 + 3 for i in range(300)]
FORCED = [11, 22, 33, 44, 55, 66, 77, 88]
SECOND = PROMPT[:50]


def reference_logits(meta: dict, sequences: list[list[int]]) -> list[np.ndarray]:
    """Float32 logits of every token of each sequence (each from an empty cache)."""
    import torch

    from mla_compiler.model_export.config import ModelConfig
    from mla_compiler.model_export.modeling import (
        DeepseekV2,
        rope_tables,
        single_sequence_inputs,
    )
    from mla_compiler.runtime.engine import random_weight_tensors

    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    state = {k: v.float() for k, v in random_weight_tensors(meta, "cuda").items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_tables(cfg)[0]  # a buffer, still on 'meta'
    model = model.to("cuda").float().eval()
    outs = []
    with torch.no_grad():
        for seq in sequences:
            inp = {
                k: v.cuda() for k, v in single_sequence_inputs(seq, start=0, logits="all").items()
            }
            cache = model.new_cache(len(seq), torch.float32).cuda()
            logits, _ = model(**inp, cache=cache)
            outs.append(logits.float().cpu().numpy())
    del model, state
    torch.cuda.empty_cache()
    return outs


def engine_logits(path: str) -> dict[str, np.ndarray]:
    from mla_compiler.runtime.engine import Engine

    eng = Engine.load(path, max_context=512, slots=2)
    eng.ubatch = 128
    out = {"prefill": eng.prefill(PROMPT, all_logits=True)}  # [300, V]
    out["decode"] = np.stack([eng.decode(t) for t in FORCED])  # [8, V]
    eng.prefill(SECOND, seq=1)
    out["batch"] = eng.decode_batch({0: 5, 1: 6})  # [2, V]
    del eng
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--json")
    ap.add_argument("--max-rel", type=float, default=0.02)
    ap.add_argument("--min-argmax", type=float, default=0.95)
    args = ap.parse_args()

    from mla_compiler import artifact

    meta = artifact.read_metadata(args.artifact)
    got = engine_logits(args.artifact)
    full, second = reference_logits(meta, [PROMPT + FORCED + [5], SECOND + [6]])
    want = {
        "prefill": full[: len(PROMPT)],
        "decode": full[len(PROMPT) : len(PROMPT) + len(FORCED)],
        "batch": np.stack([full[-1], second[-1]]),
    }
    report, ok = {}, True
    for part, ref in want.items():
        a = got[part].astype(np.float64)
        rel = float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
        agree = float(np.mean(a.argmax(-1) == ref.argmax(-1)))
        finite = bool(np.isfinite(a).all())
        good = finite and rel <= args.max_rel and agree >= args.min_argmax
        ok &= good
        report[part] = {"rel_err": rel, "argmax_agree": agree, "finite": finite, "ok": good}
        print(f"{part:8s} rel err {rel:.2e}  argmax agree {agree:.3f}  {'ok' if good else 'BAD'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"artifact": args.artifact, "parts": report, "ok": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
