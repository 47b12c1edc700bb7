"""Where an artifact's device memory goes: cudaMemGetInfo at each stage of load and a long prompt.

    python -m benchmarks.memory_probe ARTIFACT --max-context 32768 --prompt 32704 \
        [--allocator pooled|naive] [--device-gib 16] --out results.json

``--device-gib N``: first hold all but N GiB of the card with one allocation (the squeeze: does
the model run on an N GiB GPU?); the engine then loads through its memory check as usual.

Stages: the CUDA context, the VM, the weights as loaded, after ``transform_params`` (raw still
held), after dropping the raw weights, the KV cache, after the prompt's chunks, after a decode
step, and after ``vm.builtin.memory_manager.clear`` (what TVM's pooled allocator held on to).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

GiB = 2**30


def used(torch) -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def nbytes(tensors) -> int:
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors)


def probe(
    path: Path, *, max_context: int, prompt: int, allocator: str, device_gib: float | None = None
) -> dict:
    import torch
    import tvm
    from tvm.runtime import vm as tvm_vm

    from mla_compiler import artifact
    from mla_compiler.runtime import engine as E
    from mla_compiler.runtime import loader

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    total = torch.cuda.mem_get_info()[1]
    hold = max(0, total - int(device_gib * GiB)) if device_gib else 0
    held = torch.empty(hold, dtype=torch.uint8, device="cuda") if hold else None  # noqa: F841
    stages = [("context" + (f" + {hold / GiB:.2f} GiB held" if hold else ""), used(torch))]
    mark = lambda name: stages.append((name, used(torch)))  # noqa: E731
    meta = artifact.read_metadata(path)
    dev = tvm.cuda(0)
    from mla_compiler.runtime import memory_plan

    need = memory_plan.plan(meta, max_context=max_context)
    memory_plan.check_fits(need, int(dev.available_global_memory), max_context=max_context)
    vm = tvm_vm.VirtualMachine(loader.load_module(path, dev), dev, memory_cfg=allocator)
    mark("vm")
    raw = E._load_weights(path, meta, dev)
    raw_bytes = nbytes(raw)
    mark("raw weights")
    params = list(vm["transform_params"](raw))
    params_bytes = nbytes(params)
    mark("transform_params")
    del raw
    torch.cuda.empty_cache()
    mark("raw dropped")
    eng = E.Engine(path, meta, vm, dev, params, max_context=max_context)
    cache_bytes = nbytes([eng.cache])
    mark("kv cache")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, meta["model"]["vocab_size"], prompt).tolist()
    t0 = time.perf_counter()
    logits = eng.prefill(ids)
    prefill_s = time.perf_counter() - t0
    assert np.isfinite(logits).all()
    mark(f"prompt {prompt}")
    tokens = [int(np.argmax(logits))]
    for _ in range(16):  # it generates: greedy steps after the long prompt
        step = eng.decode(tokens[-1])
        assert np.isfinite(step).all()
        tokens.append(int(np.argmax(step)))
    mark("16 decode steps")
    tvm.get_global_func("vm.builtin.memory_manager.clear")()
    mark("pool cleared")
    return {
        "allocator": allocator,
        "held_bytes": hold,
        "total_bytes": total,
        "generated": tokens,
        "device": torch.cuda.get_device_name(),
        "max_context": max_context,
        "prompt": prompt,
        "ubatch": eng.ubatch,
        "prefill_s": round(prefill_s, 2),
        "raw_weight_bytes": raw_bytes,
        "param_bytes": params_bytes,
        "kv_cache_bytes": cache_bytes,
        "stages": [{"stage": n, "used_gib": round(b / GiB, 3)} for n, b in stages],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--max-context", type=int, default=32768)
    parser.add_argument("--prompt", type=int, default=32704)
    parser.add_argument("--allocator", choices=("pooled", "naive"), default="pooled")
    parser.add_argument("--device-gib", type=float, help="hold all but this much of the GPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    res = probe(
        args.artifact, max_context=args.max_context, prompt=args.prompt,
        allocator=args.allocator, device_gib=args.device_gib,
    )  # fmt: skip
    for s in res["stages"]:
        print(f"{s['stage']:>20}: {s['used_gib']:7.2f} GiB", file=sys.stderr)
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
