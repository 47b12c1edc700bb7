"""Record or check an artifact's logits on a fixed script of calls (prompt chunks, decode steps,
batched decode over two slots). Run it on the CPU artifact to record, on the GPU to check:

    python -m benchmarks.logits_check record ARTIFACT OUT.npz
    python -m benchmarks.logits_check check ARTIFACT EXPECTED.npz   # exit 1 on mismatch
"""

from __future__ import annotations

import json
import sys

import numpy as np

from mla_compiler.runtime import loader

loader.use_runtime_only()
from mla_compiler.runtime.engine import Engine  # noqa: E402

PROMPT = [(i * 37) % 500 + 3 for i in range(300)]
FORCED = [11, 22, 33, 44, 55, 66, 77, 88]


def script(path: str) -> dict[str, np.ndarray]:
    eng = Engine.load(path, max_context=512, slots=2)
    eng.ubatch = 128
    out = {"prefill": eng.prefill(PROMPT, all_logits=True)}  # 3 chunks, [300, V]
    out["decode"] = np.stack([eng.decode(t) for t in FORCED])  # [8, V] via the decode function
    eng.prefill(PROMPT[:50], seq=1)
    out["batch"] = eng.decode_batch({0: 5, 1: 6})  # [2, V] via the prefill function
    out["slot1"] = eng.decode(7, seq=1)[None]  # slot 1 through the decode function
    return out


def main() -> int:
    mode, path, file = sys.argv[1:4]
    got = script(path)
    if mode == "record":
        np.savez(file, **got)
        return 0
    want = np.load(file)
    report, ok = {}, True
    for k, v in got.items():
        rel = float(np.linalg.norm(v - want[k]) / np.linalg.norm(want[k]))
        agree = float((v.argmax(-1) == want[k].argmax(-1)).mean())
        report[k] = {"rel_err": rel, "argmax_agree": agree, "finite": bool(np.isfinite(v).all())}
        ok &= rel < 3e-2 and bool(np.isfinite(v).all())
    print(json.dumps({"artifact": path, "ok": ok, **report}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
