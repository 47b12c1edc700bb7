"""FlashMLA prefill kernels: llvm numerics, CUDA static checks (nvcc, SASS), CUDA numerics."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import tvm
from conftest import load_benchmark, nvcc_available

from mla_compiler import reference as ref
from mla_compiler.errors import TargetError
from mla_compiler.model_export.config import MLADims, preset
from mla_compiler.schedules import attention_prefill as ap
from mla_compiler.schedules.target import GPUS, tvm_target

TINY = preset("tiny").dims
V2_LITE = preset("deepseek-v2-lite").dims
SM_SCALE = 0.3


@dataclasses.dataclass(frozen=True)
class Case:
    """One ragged batch: per-sequence new tokens ``t`` and KV rows ``n`` (new rows included)."""

    dims: MLADims
    t: tuple[int, ...]
    n: tuple[int, ...]


CPU_CASES = {
    "tiny-t16-n16": Case(TINY, (16,), (16,)),
    "tiny-t7-n40-offset": Case(TINY, (7,), (40,)),
    "tiny-ragged3": Case(TINY, (5, 1, 9), (12, 1, 30)),
    "tiny-n37-not-tile-multiple": Case(TINY, (3,), (37,)),
    "tiny-t1-decode-like": Case(TINY, (1,), (21,)),
    "tiny-ragged2-t1": Case(TINY, (1, 6), (33, 6)),
    "v2lite-ragged2": Case(V2_LITE, (4, 3), (9, 35)),
    "tiny-3heads": Case(dataclasses.replace(TINY, heads=3), (4, 2), (9, 2)),
}


def _indptr(lens) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)


@functools.cache
def _build(
    kind: str, dims: MLADims, target: str, config=None, *, extend_config=None, short_config=None
):
    factory = ap.absorbed_prefill if kind == "absorbed" else ap.decompressed_prefill
    func = factory(
        dims,
        dtype="float16",
        target=target,
        config=config,
        extend_config=extend_config,
        short_config=short_config,
        sm_scale=SM_SCALE,
    )
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm_target(target))


def _inputs(kind: str, case: Case, gen: torch.Generator, device: str = "cpu"):
    """Random inputs, poisoned outputs and the float64 reference (O, LSE)."""
    d, h = case.dims, case.dims.heads
    t_total, n_total = sum(case.t), sum(case.n)
    qi, ki = _indptr(case.t), _indptr(case.n)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).half().to(device)

    if kind == "absorbed":
        # Two layers of cache with spare rows; the kernel must read layer 1 only.
        q = rnd(t_total, h, d.latent_dim) * 0.5
        kv = rnd(2, n_total + 5, d.latent_dim)
        kv_args = (q, kv)
        o_ref, lse_ref = ref.ragged(
            ref.absorbed_attention, q, (kv[1],), qi, ki, v_dim=d.kv_lora_rank, sm_scale=SM_SCALE
        )
        dv = d.kv_lora_rank
    else:
        q = rnd(t_total, h, d.qk_head_dim)
        k = rnd(n_total, h, d.qk_head_dim)
        v = rnd(n_total, h, d.v_head_dim)
        kv_args = (q, k, v)
        o_ref, lse_ref = ref.ragged(ref.attention, q, (k, v), qi, ki, sm_scale=SM_SCALE)
        dv = d.v_head_dim
    o = torch.full((t_total, h, dv), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((t_total, h), float("nan"), dtype=torch.float32, device=device)
    return kv_args, qi.to(device), ki.to(device), o, lse, (o_ref, lse_ref)


def _check(o, lse, expected, *, atol=4e-3):
    """O within f16 tolerance and LSE tight; the message names both so a GPU failure tells
    a wrong S (LSE off) from a wrong P·V (LSE right, O off)."""
    o_ref, lse_ref = expected
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "outputs left unwritten"
    o_err = (o.double() - o_ref.to(o.device)).abs().max().item()
    lse_err = (lse.double() - lse_ref.to(lse.device)).abs().max().item()
    msg = f"max |dO| = {o_err:.3g}, max |dLSE| = {lse_err:.3g}"
    torch.testing.assert_close(o.double(), o_ref.to(o.device), atol=atol, rtol=1e-2, msg=msg)
    torch.testing.assert_close(lse.double(), lse_ref.to(lse.device), atol=2e-3, rtol=1e-4, msg=msg)


def _run_cpu(kind: str, case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    kv_args, qi, ki, o, lse, expected = _inputs(kind, case, gen)
    lib = _build(kind, case.dims, "cpu")
    args = [tvm.runtime.tensor(x.numpy()) for x in (*kv_args, qi, ki, o, lse)]
    if kind == "absorbed":
        lib["main"](*args[:4], 1, *args[4:])
    else:
        lib["main"](*args)
    out_o = torch.from_numpy(args[-2].numpy())
    out_lse = torch.from_numpy(args[-1].numpy())
    _check(out_o, out_lse, expected)


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_absorbed_llvm_matches_reference(case):
    _run_cpu("absorbed", case, seed=1)


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_decompressed_llvm_matches_reference(case):
    _run_cpu("decompressed", case, seed=2)


def test_absorbed_reads_the_requested_layer():
    """Layer 0 of the cache differs from layer 1: reading it must change O."""
    case = CPU_CASES["tiny-t7-n40-offset"]
    gen = torch.Generator().manual_seed(3)
    (q, kv), qi, ki, o, lse, _ = _inputs("absorbed", case, gen)
    lib = _build("absorbed", case.dims, "cpu")
    args = [tvm.runtime.tensor(x.numpy()) for x in (q, kv, qi, ki, o, lse)]
    lib["main"](*args[:4], 0, *args[4:])
    o_ref, lse_ref = ref.ragged(
        ref.absorbed_attention, q, (kv[0],), qi, ki, v_dim=TINY.kv_lora_rank, sm_scale=SM_SCALE
    )
    _check(torch.from_numpy(args[-2].numpy()), torch.from_numpy(args[-1].numpy()), (o_ref, lse_ref))


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

ARCHS = ("sm_89", "sm_90a")
KINDS = ("absorbed", "decompressed")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_default_config_fits_shared_memory(kind, arch):
    cfg = ap.default_config(arch, kind=kind, dims=V2_LITE)
    assert ap.keep(cfg, arch, kind=kind, dims=V2_LITE)
    assert ap.shared_bytes(cfg, kind=kind, dims=V2_LITE) <= GPUS[arch].max_shared_bytes_per_block


@pytest.mark.parametrize("tokens", [512, 2048, 8192], ids=lambda t: f"chunk{t}")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_extend_config_fills_the_waves_it_can(kind, arch, tokens):
    """The config for chunks after the first is a candidate whose grid fills at least
    FULL_WAVES of the block slots, the first such, or else the fullest one."""
    found = ap.candidates(arch, kind=kind, dims=V2_LITE)
    cfg = ap.extend_config(arch, kind=kind, dims=V2_LITE, tokens=tokens)
    eff = {c: ap.wave_efficiency(c, arch, kind=kind, dims=V2_LITE, tokens=tokens) for c in found}
    assert eff[cfg] >= min(ap.FULL_WAVES, max(eff.values()))
    earlier = found[: found.index(cfg)]
    assert all(eff[c] < ap.FULL_WAVES for c in earlier), "an earlier candidate fills the waves"


@pytest.mark.parametrize(
    ("tokens", "tile_q", "waves"),
    [(2048, 128, 0.97), (1152, 192, 0.73)],
    ids=["chunk2048-default", "chunk1152-192rows"],
)
def test_extend_config_avoids_a_partial_second_wave_on_the_h100(tokens, tile_q, waves):
    # 16 heads, one block per SM: 2048 tokens in 128-row tiles make 256 blocks (2 waves of 132,
    # 97% busy; the default's 192-row tiles 176, 67%); 1152 tokens make 144 (55%), and 192-row
    # tiles 96 blocks in one wave (73%)
    chunk = ap.extend_config("sm_90a", kind="decompressed", dims=V2_LITE, tokens=tokens)
    assert chunk.tile_q == tile_q
    eff = ap.wave_efficiency(chunk, "sm_90a", kind="decompressed", dims=V2_LITE, tokens=tokens)
    assert eff == pytest.approx(waves, abs=0.01)


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_extend_config_adds_a_second_kernel_only_when_it_differs():
    import re

    x = ap.extend_config("sm_90a", kind="decompressed", dims=V2_LITE, tokens=2048)
    default = ap.default_config("sm_90a", kind="decompressed", dims=V2_LITE)
    assert x != default

    def kernels(extend):
        func = ap.decompressed_prefill(
            V2_LITE, target="sm_90a", sm_scale=SM_SCALE, extend_config=extend
        )
        lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target("sm_90a"))
        source = lib.mod.imports[0].inspect_source()
        found = re.findall(r"__launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)", source)
        for _, name, params in found:  # every pointer is a tensor (no host scalar's address)
            pointers = set(re.findall(r"(\w+)_ptr\b", params))
            assert pointers <= {"qf", "kf", "vf", "of", "lsef", "q_indptr", "kv_indptr"}, name
        return {name: threads for threads, name, _ in found}

    # 12 warps and the producer warpgroup (192-row tiles) for the causal first chunk, 8 warps
    # and the producer warp (128-row tiles: 256 blocks, 0.97 of two waves) for the rest
    assert sorted(kernels(x).values()) == ["288", "512"]
    assert list(kernels(default).values()) == ["512"]
    same = ap.extend_config("sm_90a", kind="decompressed", dims=V2_LITE, tokens=1536)
    assert same == default and list(kernels(same).values()) == ["512"]


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_short_config_adds_a_kernel_for_one_wave_prompts():
    """On sm_90a the decompressed default (192-row tiles, one block a SM) runs prompts of up to
    1536 tokens x 16 heads in one wave of 132 SMs; a build with the short config adds its 64-row
    kernel (4 warps + the producer warp) for them."""
    import re

    default = ap.default_config("sm_90a", kind="decompressed", dims=V2_LITE)
    short = ap.short_config("sm_90a", kind="decompressed", dims=V2_LITE)
    assert short.tile_q == 64 < default.tile_q == 192
    assert ap.short_tokens(default, "sm_90a", kind="decompressed", dims=V2_LITE) == 1536
    waves = {  # 1536 tokens: 128 blocks (one wave); 1728: 144 (two)
        t: ap.wave_efficiency(default, "sm_90a", kind="decompressed", dims=V2_LITE, tokens=t)
        for t in (1536, 1728)
    }
    assert waves == {1536: pytest.approx(128 / 132), 1728: pytest.approx(144 / 264)}
    source = _build("decompressed", V2_LITE, "sm_90a", short_config=short)
    found = re.findall(r"__launch_bounds__\((\d+)\)", source.mod.imports[0].inspect_source())
    assert sorted(set(found)) == ["160", "512"]  # 12 warps + the producer warpgroup
    assert ap.short_config("sm_89", kind="decompressed", dims=V2_LITE) is None
    assert ap.short_config("sm_90a", kind="absorbed", dims=V2_LITE) is None


def test_keep_prunes_configs_past_sm89_shared_memory():
    big = ap.PrefillConfig(tile_q=64, tile_kv=64, warps=8, stages=3)  # ~290 KB of shared memory
    assert not ap.keep(big, "sm_89", kind="absorbed", dims=V2_LITE)
    assert not ap.keep(big, "sm_90a", kind="absorbed", dims=V2_LITE)
    mid = ap.PrefillConfig(tile_q=64, tile_kv=16, warps=8, stages=3, split_s=False)  # ~128 KB
    assert ap.keep(mid, "sm_90a", kind="absorbed", dims=V2_LITE)
    assert not ap.keep(mid, "sm_89", kind="absorbed", dims=V2_LITE)


def test_keep_rejects_bad_tile_shapes():
    def keep(kind, *args, **flags):
        return ap.keep(ap.PrefillConfig(*args, **flags), "sm_90a", kind=kind, dims=V2_LITE)

    assert not keep("decompressed", 24, 16, 4, 2)  # tile_q % 16
    assert not keep("decompressed", 64, 16, 4, 1)  # 1 stage
    assert not keep("absorbed", 64, 16, 6, 2)  # warps % rows
    # split S: each of the 2 warps of a row slice gets 8 columns, under one ldmatrix.x4 pair
    assert not keep("absorbed", 64, 16, 8, 2, split_s=True)
    assert keep("absorbed", 64, 16, 8, 2, split_s=False)


def test_keep_takes_two_stage_pipelines_only_with_separate_k_and_v_rows():
    """The pipelined loop needs a third stage unless K and V are separate rows (decompressed),
    which lets K run a tile ahead of V on two stages (the split ring)."""
    from mla_compiler.schedules import attention_prefill_tiles as tiles

    pipe = dict(mma="wgmma_swizzled", p_operand="regs_pipelined")
    two = ap.PrefillConfig(128, 96, 8, 2, **pipe)
    assert ap.keep(two, "sm_90a", kind="decompressed", dims=V2_LITE)
    assert tiles.geometry(two, ap._layout_for("decompressed", V2_LITE)).split_ring
    assert not ap.keep(two, "sm_89", kind="decompressed", dims=V2_LITE)  # no wgmma
    # absorbed: V is the K rows' first 512 columns, no separate V slot to load a tile later
    absorbed = ap.PrefillConfig(64, 64, 4, 2, **pipe)
    assert not tiles.geometry(absorbed, ap._layout_for("absorbed", V2_LITE)).split_ring
    assert not ap.keep(absorbed, "sm_90a", kind="absorbed", dims=V2_LITE)
    three = ap.PrefillConfig(128, 64, 8, 3, **pipe)
    assert not tiles.geometry(three, ap._layout_for("decompressed", V2_LITE)).split_ring
    # both spill under ptxas with the softmax under the P·V (2026-12-04)
    for tile_q, tile_kv, warps in ((128, 128, 8), (192, 64, 12)):
        spills = ap.PrefillConfig(tile_q, tile_kv, warps, 2, **pipe)
        assert not ap.keep(spills, "sm_90a", kind="decompressed", dims=V2_LITE)
        assert ap.keep(
            dataclasses.replace(spills, p_operand="regs"),
            "sm_90a",
            kind="decompressed",
            dims=V2_LITE,
        )


def test_factory_rejects_config_that_does_not_fit():
    with pytest.raises(TargetError, match="does not fit"):
        ap.absorbed_prefill(
            V2_LITE,
            target="sm_89",
            config=ap.PrefillConfig(64, 64, 8, 3),
            sm_scale=SM_SCALE,
        )


def test_cuda_factories_reject_non_f16():
    with pytest.raises(TargetError, match="float16"):
        ap.decompressed_prefill(V2_LITE, dtype="float32", target="sm_90a", sm_scale=SM_SCALE)


def test_llvm_float32_runs():
    """The llvm body is dtype-generic: f32 q/k/v/o against the same reference."""
    case = CPU_CASES["tiny-ragged3"]
    gen = torch.Generator().manual_seed(4)
    (q, k, v), qi, ki, o, lse, expected = _inputs("decompressed", case, gen)
    func = ap.decompressed_prefill(TINY, dtype="float32", target="cpu", sm_scale=SM_SCALE)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target("cpu"))
    args = [tvm.runtime.tensor(x.float().numpy()) for x in (q, k, v)]
    args += [tvm.runtime.tensor(x.numpy()) for x in (qi, ki, o.float(), lse)]
    lib["main"](*args)
    out_o = torch.from_numpy(args[-2].numpy())
    _check(out_o, torch.from_numpy(args[-1].numpy()), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# CUDA static checks: generated source compiles, tensor cores and async copies are in the SASS
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_build_uses_tensor_cores_without_spills(kind, arch):
    from mla_compiler.nvcc import compile_cubin, sass_opcodes

    lib = _build(kind, V2_LITE, arch)
    source = lib.mod.imports[0].inspect_source()
    cubin, resources = compile_cubin(source, arch)
    (res,) = resources.values()
    assert res.spill_bytes == 0, res
    cfg = ap.default_config(arch, kind=kind, dims=V2_LITE)
    smem = res.shared_bytes + ap.shared_bytes(cfg, kind=kind, dims=V2_LITE)
    assert smem <= GPUS[arch].max_shared_bytes_per_block
    (ops,) = sass_opcodes(cubin).values()
    expected = ("HGMMA", "LDGSTS") if cfg.wgmma else ("HMMA", "LDSM", "LDGSTS")
    for opcode in expected:
        assert ops.get(opcode, 0) > 0, f"{opcode} missing from {kind} {arch} SASS"


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_candidate_config_compiles_without_spills(kind, arch):
    from mla_compiler.nvcc import compile_cubin, sass_opcodes

    for config in ap.candidates(arch, kind=kind, dims=V2_LITE):
        lib = _build(kind, V2_LITE, arch, config)
        cubin, resources = compile_cubin(lib.mod.imports[0].inspect_source(), arch)
        (res,) = resources.values()
        assert res.spill_bytes == 0, (config, res)
        (ops,) = sass_opcodes(cubin).values()
        assert ops.get("HGMMA" if config.wgmma else "HMMA", 0) > 0, (config, ops)


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_sm90a_wgmma_variant_uses_warpgroup_mma_without_spills(kind):
    from mla_compiler.nvcc import compile_cubin, sass_opcodes

    (config,) = [c for c in ap.candidates("sm_90a", kind=kind, dims=V2_LITE) if c.wgmma][:1]
    assert not ap.keep(config, "sm_89", kind=kind, dims=V2_LITE), "wgmma is sm_90a only"
    lib = _build(kind, V2_LITE, "sm_90a", config)
    cubin, resources = compile_cubin(lib.mod.imports[0].inspect_source(), "sm_90a")
    (res,) = resources.values()
    assert res.spill_bytes == 0, res
    assert res.shared_bytes + ap.shared_bytes(config, kind=kind, dims=V2_LITE) <= 227 * 1024
    (ops,) = sass_opcodes(cubin).values()
    assert ops.get("HGMMA", 0) > 0 and ops.get("LDGSTS", 0) > 0, ops
    handoff = config.p_regs and config.warps * 16 > config.tile_q  # P goes to warpgroup 1
    if config.p_regs and not handoff:  # P·V reads P from registers: no shared-memory stores
        # (but the pipelined loop's one ordering store of the row sums per step)
        assert ops.get("STS", 0) <= (3 if config.pipelined else 0), ops


def _sm90a_decompressed_cubin(config) -> bytes:
    """The V2-Lite decompressed kernel of ``config`` compiled for sm_90a, checked spill-free."""
    from mla_compiler.nvcc import compile_cubin

    assert ap.keep(config, "sm_90a", kind="decompressed", dims=V2_LITE)
    source = _build("decompressed", V2_LITE, "sm_90a", config).mod.imports[0].inspect_source()
    cubin, resources = compile_cubin(source, "sm_90a")
    assert next(iter(resources.values())).spill_bytes == 0
    return cubin


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_sm90a_tma_config_loads_kv_tiles_by_tma():
    """With ``tma`` the kernel takes K and V as two tensor maps and loads each tile as
    ``dk / 64 + dv / 64`` TMA boxes (prologue and loop), its only cp.async copies Q's."""
    from mla_compiler.nvcc import sass_opcodes

    config = ap.PrefillConfig(
        192, 96, 12, 2, mma="wgmma_swizzled", p_operand="regs", kv_loads="tma"
    )
    source = _build("decompressed", V2_LITE, "sm_90a", config).mod.imports[0].inspect_source()
    assert source.count("const __grid_constant__ CUtensorMap") == 4  # declaration, definition
    (ops,) = sass_opcodes(_sm90a_decompressed_cubin(config)).values()
    boxes = V2_LITE.qk_head_dim // 64 + V2_LITE.v_head_dim // 64
    assert ops.get("UTMALDG", 0) == 2 * boxes, ops
    plain = dataclasses.replace(config, kv_loads="cp_async")
    (ops_plain,) = sass_opcodes(_sm90a_decompressed_cubin(plain)).values()
    assert 0 < ops.get("LDGSTS", 0) < ops_plain["LDGSTS"], (ops, ops_plain)


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_sm90a_producer_warp_replaces_the_per_tile_block_barrier():
    """With ``producer`` the block has one more warp, the consumer warps release each slot on
    an mbarrier (one arrival per warp) and the only CTA-wide barrier is the one after the
    mbarrier init; without it every tile also starts with ``__syncthreads``."""
    config = ap.PrefillConfig(
        128, 128, 8, 2, mma="wgmma_swizzled", p_operand="regs", kv_loads="tma"
    )
    loads = {False: "tma", True: "tma_producer_warp"}
    sources = {
        producer: _build(
            "decompressed", V2_LITE, "sm_90a", dataclasses.replace(config, kv_loads=loads[producer])
        )
        .mod.imports[0]
        .inspect_source()
        for producer in (False, True)
    }
    assert sources[False].count("__syncthreads()") == 2  # after the init; every tile
    assert sources[True].count("__syncthreads()") == 1
    assert "__launch_bounds__(288)" in sources[True]
    assert (
        "mbarrier_arrive_nocount" in sources[True]
        and "mbarrier_arrive_nocount" not in (sources[False])
    )
    _sm90a_decompressed_cubin(dataclasses.replace(config, kv_loads=loads[True]))  # 0 spills


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_sm90a_producer_warpgroup_hands_its_registers_to_the_consumers():
    """The sm_90a decompressed default: 12 consumer warps and a producer warpgroup that drops
    to 24 registers a thread (``setmaxnreg.dec``) while the consumers rise to 160 (``.inc``);
    with a producer warp instead, 13 warps get 128 registers and ``keep`` rejects the tiles."""
    from mla_compiler.nvcc import sass_opcodes

    config = ap.default_config("sm_90a", kind="decompressed", dims=V2_LITE)
    assert (config.tile_q, config.warps, config.setmaxnreg) == (192, 12, True)
    assert not ap.keep(
        dataclasses.replace(config, kv_loads="tma_producer_warp"),
        "sm_90a",
        kind="decompressed",
        dims=V2_LITE,
    )
    source = _build("decompressed", V2_LITE, "sm_90a", config).mod.imports[0].inspect_source()
    assert "__launch_bounds__(512)" in source
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in source
    assert "setmaxnreg.inc.sync.aligned.u32 160;" in source
    (ops,) = sass_opcodes(_sm90a_decompressed_cubin(config)).values()  # 0 spills
    assert ops.get("USETMAXREG", 0) == 2, ops


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_sm90a_pipelined_softmax_runs_under_the_previous_tiles_pv():
    """In the pipelined loop every exponent of a tile's softmax lies between the wait for its
    S (``WARPGROUP.DEPBAR.LE gsb0, 0x1``: the previous tile's P·V still runs) and the wait for
    that P·V (``0x0``). Without the ordering store ptxas hoisted the second wait above them."""
    from mla_compiler.nvcc import sass_instructions

    config = ap.PrefillConfig(128, 96, 8, 2, mma="wgmma_swizzled", p_operand="regs_pipelined")
    (insns,) = sass_instructions(_sm90a_decompressed_cubin(config)).values()
    ops = [i.split()[1] + (" " + i.split()[-1] if "DEPBAR" in i else "") for i in insns]
    starts = [k for k, op in enumerate(ops) if op == "WARPGROUP.DEPBAR.LE 0x1"]
    assert len(starts) >= 2, "no two pipelined steps"  # the loop's pair
    for k in starts:
        end = ops.index("WARPGROUP.DEPBAR.LE 0x0", k)
        exps = ops[k:end].count("MUFU.EX2")
        assert exps >= 96 // 2, f"{exps} exponents under the P·V at {insns[k]}"


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
@pytest.mark.parametrize("s_first", [True, False], ids=["s-first", "copies-first"])
def test_sm90a_s_first_issues_s_before_the_next_tiles_copies(s_first):
    """In the KV loop (after its CTA barrier) the S wgmmas come before the next tile's LDGSTS
    with ``s_first``, after them without."""
    from mla_compiler.nvcc import sass_sequence

    config = ap.PrefillConfig(
        256, 64, 16, 2, mma="wgmma_swizzled", p_operand="regs", s_first=s_first
    )
    (ops,) = sass_sequence(_sm90a_decompressed_cubin(config)).values()
    loop = ops[ops.index("BAR") :]
    first = next(op for op in loop if op in ("HGMMA", "LDGSTS"))
    assert first == ("HGMMA" if s_first else "LDGSTS"), loop[:40]


@pytest.mark.skipif(not nvcc_available(), reason="nvcc / cuobjdump not installed")
def test_sm90a_absorbed_default_hands_p_over_and_copies_rows_unrolled():
    """Warpgroup 0 computes S and hands P over (named barrier 1); the KV copies are unrolled
    per row and 64-column block (one LDGSTS each), not a loop dividing every chunk index."""
    from mla_compiler.nvcc import compile_cubin, sass_opcodes
    from mla_compiler.schedules import attention_prefill_tiles as tiles

    config = ap.default_config("sm_90a", kind="absorbed", dims=V2_LITE)
    g = tiles.geometry(config, ap._layout_for("absorbed", V2_LITE))
    assert g.handoff and g.kv_loaders == 128, config
    source = _build("absorbed", V2_LITE, "sm_90a", config).mod.imports[0].inspect_source()
    assert "bar.arrive" in source and "bar.sync" in source
    cubin, resources = compile_cubin(source, "sm_90a")
    assert next(iter(resources.values())).spill_bytes == 0
    (ops,) = sass_opcodes(cubin).values()
    per_tile = g.dk // 64 * (g.tkv // (g.kv_loaders // 8))  # blocks x rows per loader thread
    assert ops.get("LDGSTS", 0) >= per_tile, ops


# ----------------------------------------------------------------------------------------------
# CUDA numerics (lead's GPU run)
# ----------------------------------------------------------------------------------------------


def _cuda_arch() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        if not tvm.cuda(0).exist:
            return None
    except Exception:
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
    return arch if arch in GPUS else None


GPU_CASES = {
    "t4096-n4096": Case(V2_LITE, (4096,), (4096,)),
    "t64-n32768-offset": Case(V2_LITE, (64,), (32768,)),
    "ragged3": Case(V2_LITE, (100, 1, 1000), (333, 50, 1000)),
    "t1-n2049": Case(V2_LITE, (1,), (2049,)),
    # 24 heads: a 64-row absorbed tile holds 2 2/3 tokens, so tokens straddle blocks
    "heads24-ragged2": Case(dataclasses.replace(V2_LITE, heads=24), (50, 7), (120, 7)),
}


def _run_cuda(
    kind: str, case: Case, arch: str, config=None, *, extend_config=None, short_config=None
):
    gen = torch.Generator().manual_seed(sum(case.t) + len(kind))
    kv_args, qi, ki, o, lse, expected = _inputs(kind, case, gen, device="cuda")
    lib = _build(
        kind, case.dims, arch, config, extend_config=extend_config, short_config=short_config
    )
    args = [tvm.runtime.from_dlpack(x) for x in (*kv_args, qi, ki, o, lse)]
    if kind == "absorbed":
        lib["main"](*args[:4], 1, *args[4:])
    else:
        lib["main"](*args)
    torch.cuda.synchronize()
    _check(o, lse, expected, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_cuda_matches_reference(kind, case):
    arch = _cuda_arch()
    if arch is None:
        pytest.skip("no CUDA device visible to torch and TVM")
    _run_cuda(kind, case, arch)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant", ["plain", "warp", "warpgroup"], ids=["tma", "tma-producer", "tma-producer-maxnreg"]
)
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_cuda_tma_ring_matches_reference(case, variant):
    """The decompressed kernel with KV tiles by TMA: tiles past a sequence's end read the next
    sequence's rows or TMA's zero fill (not clamped rows), n up to 32K, T = 1, 24 heads; with
    a producer warp, the consumer warpgroups synchronised by the ring's mbarriers alone; with a
    producer warpgroup, its registers moved to the consumers by setmaxnreg."""
    arch = _cuda_arch()
    if arch is None or arch != "sm_90a":
        pytest.skip("TMA needs an sm_90a device")
    found = ap.candidates(arch, kind="decompressed", dims=V2_LITE)
    want = {"plain": (False, False), "warp": (True, False), "warpgroup": (True, True)}[variant]
    config = next(c for c in found if c.tma and (c.producer, c.setmaxnreg) == want)
    _run_cuda("decompressed", case, arch, config)


_EXTEND_CASES = ("t4096-n4096", "t64-n32768-offset", "ragged3")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", _EXTEND_CASES)
def test_cuda_with_extend_kernel_matches_reference(kind, name):
    """Both kernels of a two-kernel build: the causal one (T = N) and the extend one (N > T)."""
    arch = _cuda_arch()
    if arch is None:
        pytest.skip("no CUDA device visible to torch and TVM")
    extend = ap.extend_config(arch, kind=kind, dims=V2_LITE, tokens=2048)
    _run_cuda(kind, GPU_CASES[name], arch, extend_config=extend)


_SHORT_CASES = {
    "t512-n512": Case(V2_LITE, (512,), (512,)),  # short kernel
    "ragged-t300-200": Case(V2_LITE, (300, 200), (300, 200)),  # short kernel, two sequences
    "t1-n2049": Case(V2_LITE, (1,), (2049,)),  # short kernel, a prefix
    "t1536-n1536": Case(V2_LITE, (1536,), (1536,)),  # short kernel, its longest prompt
    "t1600-n1600": Case(V2_LITE, (1600,), (1600,)),  # past short_tokens (1536): the default
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", _SHORT_CASES.values(), ids=_SHORT_CASES.keys())
def test_cuda_with_short_kernel_matches_reference(case):
    """A build with the short kernel (64-row tiles for prompts too short to fill the SMs with
    the default's): the host picks it or the default by the prompt length."""
    arch = _cuda_arch()
    if arch is None:
        pytest.skip("no CUDA device visible to torch and TVM")
    short = ap.short_config(arch, kind="decompressed", dims=V2_LITE)
    if short is None:
        pytest.skip(f"no short config on {arch}")
    _run_cuda("decompressed", case, arch, short_config=short)


def _config_id(config) -> str:
    split = config.split_s and config.warps * 16 > config.tile_q  # only when V's columns split
    tags = ("split" if split else "nosplit") + ("-wgmma" if config.wgmma else "")
    tags += ("-swz" if config.swizzle else "") + ("-preg" if config.p_regs else "")
    tags += "-pipe" if config.pipelined else ""
    tags += "-sfirst" if config.s_first else ""
    tags += "-tma" if config.tma else ""
    tags += "-producer" if config.producer else ""
    tags += "-maxnreg" if config.setmaxnreg else ""
    return f"{config.tile_q}x{config.tile_kv}x{config.warps}w{config.stages}s-{tags}"


_ARCH_FOR_PARAMS = _cuda_arch() or "sm_90a"
_CANDIDATES = [
    pytest.param(kind, cfg, id=f"{kind}-{_config_id(cfg)}")
    for kind in KINDS
    for cfg in ap.candidates(_ARCH_FOR_PARAMS, kind=kind, dims=V2_LITE)
]


@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "config"), _CANDIDATES)
def test_cuda_every_candidate_config_matches_reference(kind, config):
    arch = _cuda_arch()
    if arch is None:
        pytest.skip("no CUDA device visible to torch and TVM")
    _run_cuda(kind, Case(V2_LITE, (37, 1, 300), (37, 90, 301)), arch, config)


def test_bench_table_reports_best_of_ours_over_the_fastest_baseline(capsys):
    """benchmarks/bench_attention.py's table: the best of ours (default or any config) over the
    fastest correct baseline of the same (kind, n); '-' where a side has no figure."""
    bench = load_benchmark("bench_attention")

    def row(impl, n, tflops):
        return {"kind": "decompressed", "n": n, "impl": impl, "tflops": tflops, "config": []}

    results = [row("ours", 2048, 290.0), row("ours-config", 2048, 330.0)]
    results += [row("ours-best", 2048, 330.0), row("sdpa-cudnn", 2048, 300.0)]
    results += [row("sdpa-efficient", 2048, 310.0), row("ours", 8192, 480.0)]
    results += [row("sdpa-cudnn", 8192, None)]  # rejected: no figure
    bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert "| decompressed | 2048 | 290.0 | 330.0 | 300.0 | 310.0 | 1.06x sdpa-efficient |" in lines
    assert "| decompressed | 8192 | 480.0 | - | - | - | - |" in lines
