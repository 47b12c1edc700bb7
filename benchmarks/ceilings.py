"""The GPU's measured ceilings, the denominators of the kernel tables: DRAM copy and read
bandwidth and the f16 tensor-core GEMM rate, through PyTorch on random data.

    python -m benchmarks.ceilings --out ceilings.json

- ``copy_gbps``: a 2 GiB device-to-device copy, bytes read + written (median time);
- ``read_gbps``: ``torch.sum`` over 2 GiB of f16 (bytes read);
- ``gemm_f16_tflops``: cuBLAS f16 8192^3 (2 m n k FLOPs).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import timing


def measure() -> dict:
    n = 2**30  # f16 elements: 2 GiB
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_ms = timing.do_bench_ms(lambda: dst.copy_(src))
    read_ms = timing.do_bench_ms(lambda: src.sum(dtype=torch.float32))
    src = dst = None  # free 4 GiB before the GEMM
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.float16)
    b = torch.randn(m, m, device="cuda", dtype=torch.float16)
    gemm_ms = timing.do_bench_ms(lambda: a @ b)
    return {
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "copy_gbps": 2 * 2 * n / copy_ms / 1e6,
        "read_gbps": 2 * n / read_ms / 1e6,
        "gemm_f16_tflops": 2 * m**3 / gemm_ms / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    res = measure()
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
