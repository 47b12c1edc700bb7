"""Attention kernels to run under Nsight Compute: each default config once on random inputs.

    ncu --clock-control none --kernel-name regex:'prefill_|decode_' --launch-skip 0 \\
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \\
        python -m benchmarks.ncu_attention [--n 8192] [--decode 1x16384,32x4096]

Kernels (sm_90a defaults, 16 heads, f16): ``prefill_absorbed`` and ``prefill_decompressed``
(one causal sequence of ``--n`` tokens over its own ``--n`` rows), then ``decode_split`` /
``decode_merge`` per ``BxCTX`` of ``--decode`` (splits as the model picks them). Each kernel
runs twice; profile the second launch (``--launch-skip``) to skip module-load effects.
"""

from __future__ import annotations

import argparse

import torch
import tvm

if __name__ == "__main__":  # run from the checkout (maybe uninstalled): import its package
    from benchmarks import package_shim

    package_shim.use_checkout_package()

try:  # as benchmarks.ncu_attention
    from benchmarks import bench_decode as bd
except ImportError:  # by file path, benchmarks/ on sys.path (tests/conftest.load_benchmark)
    import bench_decode as bd

from mla_compiler.model_export.config import MLADims, preset  # noqa: E402
from mla_compiler.schedules import attention_decode as dec  # noqa: E402
from mla_compiler.schedules import attention_prefill as ap  # noqa: E402
from mla_compiler.schedules.target import tvm_target  # noqa: E402


def _t(x: torch.Tensor):
    return tvm.runtime.from_dlpack(x)


def prefill(kind: str, dims: MLADims, arch: str, n: int, sm_scale: float) -> None:
    factory = ap.absorbed_prefill if kind == "absorbed" else ap.decompressed_prefill
    func = factory(dims, dtype="float16", target=arch, sm_scale=sm_scale)
    name = f"prefill_{kind}"
    lib = tvm.compile(
        tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=tvm_target(arch)
    )
    h, f16 = dims.heads, dict(device="cuda", dtype=torch.float16)
    indptr = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    if kind == "absorbed":
        q = torch.randn(n, h, dims.latent_dim, **f16) * 0.5  # [T, H, 576]
        kv = torch.randn(1, n, dims.latent_dim, **f16)  # [L, N, 576]
        o = torch.empty(n, h, dims.kv_lora_rank, **f16)
        args = [_t(q), _t(kv), _t(indptr), _t(indptr), 0]
    else:
        q = torch.randn(n, h, dims.qk_head_dim, **f16)  # [T, H, 192]
        k = torch.randn(n, h, dims.qk_head_dim, **f16)
        v = torch.randn(n, h, dims.v_head_dim, **f16)  # [N, H, 128]
        o = torch.empty(n, h, dims.v_head_dim, **f16)
        args = [_t(q), _t(k), _t(v), _t(indptr), _t(indptr)]
    lse = torch.empty(n, h, device="cuda")
    for _ in range(2):
        lib[name](*args, _t(o), _t(lse))
    torch.cuda.synchronize()


def decode(dims: MLADims, arch: str, batch: int, ctx: int, sm_scale: float) -> None:
    target = tvm_target(arch)
    mod = dec.build(dec.absorbed_decode(dims, target=target, sm_scale=sm_scale), target)
    cfg = dec.default_config(target, dims)
    splits = dec.splits_for(cfg, target, dims, q_tokens=1, batch=batch, max_context=ctx)
    q, kv, indptr = bd.make_inputs(dims, batch, ctx, layers=1)
    calls, _, _ = bd.ours(mod, dims, q, kv, indptr, splits=splits)
    for _ in range(2):
        calls[0]()
    torch.cuda.synchronize()


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--n", type=int, default=8192)
    ap_.add_argument("--decode", default="1x16384,32x4096")
    ap_.add_argument("--kinds", default="absorbed,decompressed")
    args = ap_.parse_args()
    arch = bd.gpu_arch()
    dims = preset("deepseek-v2-lite").dims
    for kind in filter(None, args.kinds.split(",")):
        scale = dims.qk_head_dim**-0.5
        prefill(kind, dims, arch, args.n, scale)
    for shape in filter(None, args.decode.split(",")):
        batch, ctx = (int(x) for x in shape.split("x"))
        decode(dims, arch, batch, ctx, dims.qk_head_dim**-0.5)


if __name__ == "__main__":
    main()
