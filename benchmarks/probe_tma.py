"""Probe: one TMA tile load (``cp.async.bulk.tensor``) through a host-encoded tensor map, the
building block a TMA producer for the prefill kernels needs. Builds here (CPU) and on the GPU
machine; ``--run`` launches it there and checks the 64 x 64 boxes against numpy.

Status (2026-12-04, H200, full bundle): both swizzle modes match. The first version faulted
with ``cudaErrorMisalignedAddress``: its mbarrier was a static shared buffer, which shifted the
dynamic buffer holding the boxes off the 128-byte alignment TMA needs (the compiler had also
shrunk the 1 KB pad meant to prevent that to 8 bytes). The barrier now sits after the boxes.

    python -m benchmarks.probe_tma --swizzle 3 [--run]
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm
from tvm.script import tirx as T

from mla_compiler.schedules.target import tvm_target

R, C, BOX = 256, 192, 64  # global [R, C] f16, boxes of BOX x BOX
COPY = "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"


def tile_load(swizzle: int) -> tvm.tirx.PrimFunc:
    """``out[rows of block b]`` = the shared-memory image of that block's C / BOX boxes."""
    boxes = C // BOX

    @T.prim_func
    def k(a: T.Buffer((R, C), "float16"), out: T.Buffer((R, C), "float16")):
        T.func_attr({"global_symbol": "k", "tirx.noalias": True})
        tmap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
        T.tensormap_encode_tiled(
            tmap, a.data, C, R, C * 2, BOX, BOX, 1, 1,
            descriptor_dtype="float16", rank=2, interleave=0, swizzle=swizzle,
            l2_promotion=2, oob_fill=0, force_cu_dtype=-1,
        )  # fmt: skip
        bx = T.launch_thread("blockIdx.x", R // BOX)
        tx = T.launch_thread("threadIdx.x", 128)
        # the boxes, then the mbarrier (8 B): a static buffer before the dynamic one would
        # shift the boxes off the 128-byte (1024 with the swizzle) alignment TMA needs
        smem = T.alloc_buffer((boxes * BOX * BOX + 4,), "float16", scope="shared.dyn")
        bar = T.meta_var(smem.ptr_to([boxes * BOX * BOX]))
        if tx == 0:
            T.ptx.mbarrier.init.shared.b64(bar, T.uint32(1))
        T.ptx["fence.proxy.async.shared::cta"]()
        T.tvm_storage_sync("shared")
        if tx == 0:
            T.ptx.mbarrier.arrive.expect_tx.shared.b64(bar, T.uint32(C * BOX * 2))
            for j in T.unroll(boxes):
                T.evaluate(
                    T.ptx[COPY](
                        smem.ptr_to([j * BOX * BOX]),
                        T.address_of(tmap),
                        j * BOX,
                        bx * BOX,
                        bar,
                    )  # fmt: skip
                )
        T.cuda.mbarrier_wait(bar, 0)
        for i in T.serial(boxes * BOX * BOX // 128):
            e = T.meta_var(i * 128 + tx)
            out[bx * BOX + e % (BOX * BOX) // BOX, e // (BOX * BOX) * BOX + e % BOX] = smem[e]

    return k


def expected(a: np.ndarray, swizzle: int) -> np.ndarray:
    """Where the boxes land: 16-byte chunk ``c // 8`` of row ``r`` moves to ``c // 8 ^ r % 8``
    with the 128-byte swizzle (``swizzle=3``), stays without it (0)."""
    out = np.empty_like(a)
    r, c = np.indices(a.shape)
    chunk = (c % BOX) // 8 ^ (r % 8) if swizzle == 3 else (c % BOX) // 8
    out[r, c // BOX * BOX + chunk * 8 + c % 8] = a
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swizzle", type=int, default=3, choices=(0, 3))
    parser.add_argument("--run", action="store_true", help="launch on the local GPU")
    args = parser.parse_args()
    mod = tvm.compile(tvm.IRModule({"k": tile_load(args.swizzle)}), target=tvm_target("sm_90a"))
    source = mod.mod.imports[0].inspect_source()
    print(next(line for line in source.splitlines() if "__global__" in line))
    if not args.run:
        return
    dev = tvm.cuda(0)
    a = np.random.default_rng(0).standard_normal((R, C)).astype("float16")
    out = tvm.runtime.tensor(np.full((R, C), np.nan, "float16"), dev)
    mod["k"](tvm.runtime.tensor(a, dev), out)
    print("matches:", bool(np.array_equal(out.numpy(), expected(a, args.swizzle))))


if __name__ == "__main__":
    main()
