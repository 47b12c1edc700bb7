"""CUDA tensor-core body of the prefill kernels (placeholder)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MMAConfig:
    tile_q: int
    tile_kv: int
    warps: int
    stages: int


def fits(config, layout, smem_limit):
    return True


def shared_bytes(config, layout):
    return 0


mma_body = None
