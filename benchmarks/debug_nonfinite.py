"""Find the first kernel of an artifact whose output is not finite (runs with the VM's
instrumentation hook; runtime-only). Usage: python -m benchmarks.debug_nonfinite ARTIFACT"""

from __future__ import annotations

import sys

import numpy as np

from mla_compiler.runtime import loader

loader.use_runtime_only()
import tvm  # noqa: E402

from mla_compiler.runtime.engine import Engine  # noqa: E402


def main(path: str) -> None:
    eng = Engine.load(path)
    seen = {"first": None, "calls": 0}

    def instrument(func, name, before, ret, *args):
        if before or seen["first"]:
            return
        seen["calls"] += 1
        for i, a in enumerate(args):
            if isinstance(a, tvm.runtime.Tensor) and a.dtype in ("float16", "float32"):
                x = a.numpy()
                if x.size and not np.isfinite(x).all():
                    bad = int((~np.isfinite(x)).sum())
                    seen["first"] = f"{name}: arg {i} shape {x.shape} has {bad}/{x.size} non-finite"
                    print(seen["first"], flush=True)
                    return

    eng.vm.set_instrument(instrument)
    logits = eng.prefill(list(range(3, 43)), all_logits=True)
    print("calls checked:", seen["calls"], "first non-finite:", seen["first"])
    print("logits finite:", np.isfinite(logits).all(), "max |logit|:", np.nanmax(np.abs(logits)))


if __name__ == "__main__":
    main(sys.argv[1])
