"""Absorbed-MLA decode (split-KV + merge) vs the float64 reference; CUDA static checks; GPU runs."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import tvm
import tvm.sym
from conftest import load_benchmark, nvcc_available

from mla_compiler import reference
from mla_compiler.model_export.config import preset
from mla_compiler.schedules import attention_decode as dec
from mla_compiler.schedules.attention_decode_tiles import stages_q_in_ring
from mla_compiler.schedules.target import GPUS, tvm_target

TINY = preset("tiny").dims
LITE = preset("deepseek-v2-lite").dims  # 576-wide rows, V = first 512 columns, 16 heads
DIMS = {"tiny": TINY, "lite": LITE}


@functools.cache
def _module(
    dims_name: str, q_tokens: int, target_name: str, config: dec.DecodeConfig | None = None
):
    """(built module, the config it was built with)."""
    dims = DIMS[dims_name]
    target = tvm_target(target_name)
    kernels = dec.absorbed_decode(
        dims,
        target=target,
        config=config,
        sm_scale=dims.qk_head_dim**-0.5,
        q_tokens=q_tokens,
    )
    return dec.build(kernels, target), kernels.config


def _tvm(x: torch.Tensor):
    return tvm.runtime.from_dlpack(x)


def _used(n: int, num_splits: int, config: dec.DecodeConfig) -> int:
    return dec.effective_splits(
        n, num_splits, block_n=config.block_n, min_split_rows=config.min_split_rows
    )


def _run_and_check(
    built, dims, *, lens, q_tokens, num_splits, layers=2, layer=1, device="cpu"
) -> list[int]:
    """Run split + merge on a ragged batch in a multi-layer cache; compare O and LSE.

    Workspace and outputs start NaN: the used splits' partials must merge to the reference,
    the unused ones must stay untouched. Returns the splits each sequence used.
    """
    mod, config = built
    gen = torch.Generator().manual_seed(sum(lens) * 7 + q_tokens * 131 + num_splits)
    b, h = len(lens), dims.heads
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    rows = int(indptr[-1]) + 5  # spare rows past the last sequence: never read
    q = torch.randn(b, q_tokens, h, dims.latent_dim, generator=gen).half()
    kv = torch.randn(layers, rows, dims.latent_dim, generator=gen).half()
    kv[:, int(indptr[-1]) :] = float("nan")
    ws = dec.workspace_shapes(dims, batch=b, q_tokens=q_tokens, num_splits=num_splits)
    o_part = torch.full(ws["o_part"], float("nan"))  # [S, B, Q, H, 512]
    lse_part = torch.full(ws["lse_part"], float("nan"))  # [S, B, Q, H]
    o = torch.full((b, q_tokens, h, dims.kv_lora_rank), float("nan")).half()
    lse = torch.full((b, q_tokens, h), float("nan"))
    args = [x.to(device) for x in (q, kv, indptr, o_part, lse_part, o, lse)]
    q, kv, indptr, o_part, lse_part, o, lse = args
    split_args = [_tvm(x) for x in (q, kv, indptr)] + [layer]
    split_args += [_tvm(x) for x in (o_part, lse_part, o, lse)]
    mod["decode_split"](*split_args)
    mod["decode_merge"](_tvm(o_part), _tvm(lse_part), _tvm(indptr), _tvm(o), _tvm(lse))
    if device != "cpu":
        torch.cuda.synchronize()
    scale = dims.qk_head_dim**-0.5
    used = [_used(n, num_splits, config) for n in lens]
    for i, u in enumerate(used):
        k0, k1 = int(indptr[i]), int(indptr[i + 1])
        ref_o, ref_lse = reference.absorbed_attention(
            q[i], kv[layer, k0:k1], v_dim=dims.kv_lora_rank, sm_scale=scale
        )
        torch.testing.assert_close(o[i].double(), ref_o, atol=4e-3, rtol=1e-2)
        torch.testing.assert_close(lse[i].double(), ref_lse, atol=2e-3, rtol=1e-4)
        assert o_part[u:, i].isnan().all() and lse_part[u:, i].isnan().all(), "unused written"
        if u == 1:  # the split wrote O and LSE itself (its o_part row is scratch)
            continue
        # the used partials alone merge to the same answer (reference.merge_states semantics)
        m_o, m_lse = reference.merge_states(o_part[:u, i], lse_part[:u, i])
        torch.testing.assert_close(m_lse, ref_lse, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(m_o, ref_o, atol=4e-3, rtol=1e-2)
        assert not o_part[:u, i].isnan().any() and not lse_part[:u, i].isnan().any()
        # every used split has rows: the last query token (it sees them all) has a finite LSE
        assert torch.isfinite(lse_part[:u, i, -1]).all(), lse_part[:u, i, -1]
    return used


def _cpu(block_n: int, min_split_rows: int) -> dec.DecodeConfig:
    return dataclasses.replace(dec.CPU_CONFIG, block_n=block_n, min_split_rows=min_split_rows)


# id -> (dims, lens, q_tokens, num_splits, block_n, min_split_rows)
CPU_CASES = {
    "tiny-ctx70-not-tile-multiple-q1-s2": ("tiny", [70], 1, 2, 16, 16),
    "tiny-short-ctx-huge-s64-q1": ("tiny", [70], 1, 64, 16, 32),
    "tiny-ragged-b4-different-used-q2-s8": ("tiny", [70, 5, 130, 300], 2, 8, 16, 32),
    "tiny-min-rows-not-tile-multiple-q1-s16": ("tiny", [100, 49], 1, 16, 16, 40),
    "tiny-ctx-equals-q-q2-s3": ("tiny", [2, 9], 2, 3, 16, 16),
    "tiny-default-min-rows-q1-s86": ("tiny", [600, 129], 1, 86, 64, dec.MIN_SPLIT_ROWS),
    "lite-ctx97-q1-s2": ("lite", [97], 1, 2, 64, 64),
    "lite-ragged-b3-q2-s3": ("lite", [40, 3, 77], 2, 3, 16, 16),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_llvm_matches_reference(case):
    dims_name, lens, q_tokens, num_splits, block_n, min_rows = CPU_CASES[case]
    built = _module(dims_name, q_tokens, "cpu", _cpu(block_n, min_rows))
    used = _run_and_check(
        built, DIMS[dims_name], lens=lens, q_tokens=q_tokens, num_splits=num_splits
    )
    assert max(used) > 1 or case.startswith("tiny-ctx-equals-q"), used  # partials merged
    if "huge-s" in case:
        assert max(used) < num_splits // 4  # most compiled splits unused
    if "different-used" in case:
        assert len(set(used)) >= 3 and max(used) == num_splits  # one is capped at S


@pytest.mark.parametrize("block_n,min_rows", [(16, 16), (16, 40), (64, 128), (32, 128)])
def test_effective_splits_partition(block_n, min_rows):
    """Used splits: at most S, ceil(tiles / per-split tiles) of them, contiguous, non-empty,
    whole tiles, balanced to one tile; the TIR form of the formula gives the same numbers."""
    n_var, s_var, k_var = (tvm.tirx.Var(x, "int32") for x in "nsk")
    tir_used = dec.effective_splits(n_var, s_var, block_n=block_n, min_split_rows=min_rows)
    tir_lo, tir_hi = dec.split_range(n_var, k_var, s_var, block_n=block_n)

    def tir(expr, **values):
        ana = tvm.sym.Analyzer()
        for v in (n_var, s_var, k_var):
            ana.bind(v, values[v.name])
        return int(ana.simplify(expr))

    per = -(-min_rows // block_n)
    for n in (1, 5, block_n, block_n + 1, 600, 4097):
        for s in (1, 3, 86):
            used = dec.effective_splits(n, s, block_n=block_n, min_split_rows=min_rows)
            assert used == tir(tir_used, n=n, s=s, k=0)
            assert used == min(s, -(-n // (per * block_n)))
            ranges = [dec.split_range(n, k, used, block_n=block_n) for k in range(used)]
            for k, r in enumerate(ranges):
                assert r == (tir(tir_lo, n=n, s=used, k=k), tir(tir_hi, n=n, s=used, k=k))
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            assert all(lo % block_n == 0 and hi > lo for lo, hi in ranges)
            tiles = [-(-(hi - lo) // block_n) for lo, hi in ranges]
            assert max(tiles) - min(tiles) <= 1
            assert used == s or max(tiles) <= per  # uncapped: at most per tiles each
            assert used == 1 or sum(tiles) > (used - 1) * per  # no split count to spare
    assert dec.effective_splits(0, 86, block_n=block_n, min_split_rows=min_rows) == 1


def test_choose_splits_fills_the_gpu():
    sms = GPUS["sm_90a"].sm_count
    s = dec.choose_splits(1, 32768, sms)
    assert sms // 2 <= s <= 2 * sms  # one sequence spreads over most SMs
    # more bandwidth per SM assumed -> fewer splits (fewer f32 partials), never more
    assert dec.choose_splits(1, 32768, sms, sm_bandwidth_ratio=3.0) <= s
    assert dec.choose_splits(128, 4096, sms) <= 2  # a big batch needs (almost) no split
    assert dec.choose_splits(1, 100, sms) <= 2  # never more splits than 64-row tiles
    assert dec.choose_splits(1, 0, sms) == 1
    for ctx in (600, 4096):  # never more splits than the context would use (by min rows)
        assert dec.choose_splits(1, ctx, sms) <= -(-ctx // dec.MIN_SPLIT_ROWS)


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
@pytest.mark.parametrize("q_tokens", [1, 2, 4], ids=lambda q: f"q{q}")
def test_default_config_fits(arch, q_tokens):
    target = tvm_target(arch)
    cfg = dec.default_config(target, LITE, q_tokens=q_tokens)
    if arch == "sm_89" and q_tokens == 4:  # Q needs 75 KB of the 99: simple-kernel fallback
        assert not cfg.tensor_cores
        return
    assert cfg.tensor_cores
    assert dec.keep(cfg, target, LITE, q_tokens=q_tokens)
    smem = dec.shared_bytes(cfg, LITE, q_tokens=q_tokens)
    assert smem <= GPUS[arch].max_shared_bytes_per_block
    assert cfg.stages >= 2 or q_tokens > 1  # Q=1 always gets a real pipeline


def test_ctas_per_sm():
    sm90, sm89 = tvm_target("sm_90a"), tvm_target("sm_89")
    assert dec.ctas_per_sm(dec.DecodeConfig(64, 2, 4), sm90, LITE, q_tokens=1) == 1
    assert dec.ctas_per_sm(dec.DecodeConfig(32, 2, 2), sm90, LITE, q_tokens=1) == 2
    assert dec.ctas_per_sm(dec.DecodeConfig(32, 2, 2), sm89, LITE, q_tokens=1) == 1
    two = dec.splits_for(
        dec.DecodeConfig(32, 2, 2), sm90, LITE, q_tokens=1, batch=1, max_context=65536
    )
    assert two > GPUS["sm_90a"].sm_count  # two CTAs per SM: more splits fill the GPU


def test_keep_tma_only_where_the_gpu_has_it():
    """TMA configs: sm_90a yes (tuning candidates there), sm_89 no (Ada has no cp.async.bulk)."""
    cfg = dec.DecodeConfig(block_n=64, stages=2, warps_n=4, tma=True)
    assert dec.keep(cfg, tvm_target("sm_90a"), LITE, q_tokens=1)
    assert not dec.keep(cfg, tvm_target("sm_89"), LITE, q_tokens=1)
    assert not any(c.tma for c in dec.candidate_configs(tvm_target("sm_89"), LITE, q_tokens=1))
    assert any(c.tma for c in dec.candidate_configs(tvm_target("sm_90a"), LITE, q_tokens=1))
    odd = dec.DecodeConfig(
        block_n=16, stages=2, warps_n=2, tma=True
    )  # a lane copies whole 32-row groups
    assert not dec.keep(odd, tvm_target("sm_90a"), LITE, q_tokens=1)


def test_keep_rejects_oversized():
    big = dec.DecodeConfig(block_n=128, stages=4, warps_n=4)
    assert not dec.keep(big, tvm_target("sm_90a"), LITE, q_tokens=1)
    assert not dec.keep(dec.DecodeConfig(), tvm_target("cpu"), LITE, q_tokens=1)


# id -> (arch, query tokens, ring): "default-cp.async" / "default-tma" build the default and
# expect that ring; "tma" / "q-regs" / "q-staged" build the first TMA / q_regs / q_regs with
# Q staged in the ring candidate
STATIC_CASES = {
    "sm_89-q1": ("sm_89", 1, "default-cp.async"),
    "sm_89-q2": ("sm_89", 2, "default-cp.async"),
    "sm_90a-q1": ("sm_90a", 1, "default-cp.async"),
    "sm_90a-q2": ("sm_90a", 2, "default-cp.async"),
    "sm_90a-q4": ("sm_90a", 4, "default-tma"),  # Q takes 75 KB of smem: a 32-row TMA ring fits
    "sm_90a-tma-q1": ("sm_90a", 1, "tma"),
    "sm_90a-tma-q2": ("sm_90a", 2, "tma"),
    "sm_89-q-regs-q1": ("sm_89", 1, "q-regs"),  # the register budget keep() allows: no spills
    "sm_90a-q-staged-q1": ("sm_90a", 1, "q-staged"),  # 3 stages: Q staged in the ring
}


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("case", list(STATIC_CASES), ids=list(STATIC_CASES))
def test_cuda_static(case):
    """Builds for the arch, 0 spills, and the SASS has HMMA, LDSM and LDGSTS (Q; the cache
    tiles too without TMA), plus the bulk copies and mbarrier waits of a TMA ring."""
    from mla_compiler import nvcc

    arch, q_tokens, ring = STATIC_CASES[case]
    config = None
    found = dec.candidate_configs(tvm_target(arch), LITE, q_tokens=q_tokens)
    if ring == "tma":
        config = next(c for c in found if c.tma)
    elif ring == "q-regs":
        config = next(c for c in found if c.q_regs)
    elif ring == "q-staged":
        config = next(c for c in found if stages_q_in_ring(c))
    mod, config = _module("lite", q_tokens, arch, config)
    assert config.tma == (ring in ("tma", "default-tma")), config
    flags = getattr(nvcc, "TVM_NVCC_FLAGS", ())  # the flags of TVM's own JIT build, where known
    cubin, res = nvcc.compile_cubin(mod.mod.imports[0].inspect_source(), arch, extra_flags=flags)
    split = next(r for name, r in res.items() if "decode_split" in name)
    assert split.spill_bytes == 0, split
    ops = next(c for name, c in nvcc.sass_opcodes(cubin).items() if "decode_split" in name)
    # Q·Kᵀ: 36 k-steps x (score n8 tiles per warp) + P·V k-steps x (output n8 tiles per warp)
    assert ops.get("HMMA", 0) >= 36 + 16, ops
    assert ops.get("LDSM", 0) >= 36, ops
    assert ops.get("LDGSTS", 0) >= 5, ops  # per thread: Q (+ tile) chunks / threads, unrolled
    if config.tma:  # warp 0: block_n / 32 row copies per lane, per prologue / refill site
        assert ops.get("UBLKCP", 0) >= 2 * config.block_n // 32, ops
        assert ops.get("SYNCS", 0) >= 1, ops  # mbarrier init / expect_tx / try_wait
    else:
        assert ops.get("UBLKCP", 0) == 0, ops
    merge = next(r for name, r in res.items() if "decode_merge" in name)
    assert merge.spill_bytes == 0, merge


@pytest.mark.parametrize("arch", ["sm_89", "sm_90a"])
def test_programmatic_launch_only_on_sm90(arch):
    """sm_90a's default: both kernels carry the PDL launch tag (before the dynamic shared
    memory tag), the split waits for its predecessor before its first global load and the
    merge before its first partial load, both let the next kernel launch after their last
    store; sm_89 has no griddepcontrol: neither."""
    from mla_compiler.cuda_build import launch_tags
    from mla_compiler.schedules.grid_dependency import PDL_TAG

    mod, config = _module("lite", 1, arch)
    assert config.pdl == (arch == "sm_90a")
    tags = launch_tags(mod.mod)
    assert set(tags) == {"decode_split_kernel", "decode_merge_kernel"}, tags
    for name, kernel_tags in tags.items():
        assert (PDL_TAG in kernel_tags) == config.pdl, (name, kernel_tags)
        assert kernel_tags[-1] == "tirx.use_dyn_shared_memory" or name == "decode_merge_kernel"
    src = mod.mod.imports[0].inspect_source()
    for kernel, first_read, last_store in (
        ("decode_split_kernel", "kv_indptr_ptr", "lse_part_ptr["),
        ("decode_merge_kernel", "o_part_ptr", "lse_ptr["),
    ):
        body = src[src.rindex(kernel + "(") :]  # the definition
        body = body[body.index("{") : body.index("\n}\n")]
        wait = body.find("tvm_builtin_ptx_griddepcontrol_wait();")
        trigger = body.find("tvm_builtin_ptx_griddepcontrol_launch_dependents();")
        assert (wait >= 0) == config.pdl and (trigger >= 0) == config.pdl, kernel
        if config.pdl:  # wait before the first read, trigger after the last store
            assert 0 <= wait < body.index(first_read), kernel
            assert trigger > body.rindex(last_store), kernel


def _gpu_arch() -> str | None:
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


# id -> (lens, q_tokens, max_context the splits are chosen for: None = max(lens))
GPU_CASES = {
    "b1-ctx1000-q1": ([1000], 1, None),
    "b1-ctx600-splits-of-16k-q1": ([600], 1, 16384),  # the model: workspace for max_context
    "b3-ragged-q1": ([4097, 17, 2500], 1, None),
    "b3-ragged-q2": ([4097, 17, 2500], 2, None),
    "b1-ctx32k-q1": ([32768], 1, None),
    "b2-ctx128k-q1": ([131072, 65537], 1, None),
    "b1-ctx128k-q2": ([131072], 2, None),
    "b2-ragged-q4": ([5000, 300], 4, None),
    "b32-ctx4k-q1": ([4096] * 32, 1, None),
}


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_arch() is None, reason="needs a CUDA GPU and TVM with CUDA")
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
@pytest.mark.parametrize("splits", ["chosen", "many"])
def test_gpu_matches_reference(case, splits):
    arch = _gpu_arch()
    lens, q_tokens, max_context = GPU_CASES[case]
    built = _module("lite", q_tokens, arch)
    target, cfg = tvm_target(arch), built[1]
    num_splits = dec.splits_for(
        cfg,
        target,
        LITE,
        q_tokens=q_tokens,
        batch=len(lens),
        max_context=max_context or max(lens),
        sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    if splits == "many":  # more splits than the short sequences use
        num_splits = max(num_splits, math.ceil(max(lens) / cfg.block_n) // 2 + 3)
    _run_and_check(built, LITE, lens=lens, q_tokens=q_tokens, num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_arch() is None, reason="needs a CUDA GPU and TVM with CUDA")
@pytest.mark.parametrize(
    "cfg", ["simple", "cp-async-w4", "q-staged", "alt1", "alt2", "alt3", "alt4"]
)
def test_gpu_other_configs(cfg):
    """The simple CUDA fallback, a 4-warp cp.async ring (sm_89's kind of config), a q_regs ring
    with Q staged in its last slot and the next tensor-core configs (on sm_90a: TMA rings)
    agree with the reference."""
    arch = _gpu_arch()
    if cfg == "simple":
        config = dec.DecodeConfig(tensor_cores=False)
    elif cfg == "cp-async-w4":
        config = dec.DecodeConfig(block_n=64, stages=2, warps_n=4)
    elif cfg == "q-staged":
        found = dec.candidate_configs(tvm_target(arch), LITE, q_tokens=1)
        config = next((c for c in found if stages_q_in_ring(c)), None)
        if config is None:
            pytest.skip(f"no 3-stage q_regs config fits {arch}")
    else:
        config = dec.candidate_configs(tvm_target(arch), LITE, q_tokens=1)[int(cfg[-1])]
    built = _module("lite", 1, arch, config)
    _run_and_check(built, LITE, lens=[3000, 130], q_tokens=1, num_splits=5, device="cuda")


# id -> (lens, splits): one wave of split CTAs, and several (more CTAs than SMs)
PDL_CHAINS = {"b1-ctx16k-s128": ([16384], 128), "b32-ctx3000-s12": ([3000] * 32, 12)}


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_arch() is None, reason="needs a CUDA GPU and TVM with CUDA")
@pytest.mark.parametrize("case", list(PDL_CHAINS), ids=list(PDL_CHAINS))
def test_gpu_back_to_back_layers(case):
    """Eight layers' split and merge queued without a sync, each layer's Q and each sequence's
    newest cache row written by PyTorch kernels just before its split (a decode step's
    pattern): with programmatic dependent launch (sm_90 default) a kernel that read its inputs
    before its predecessor finished would show here as a wrong layer."""
    arch = _gpu_arch()
    lens, num_splits = PDL_CHAINS[case]
    mod, config = _module("lite", 1, arch)
    dims, layers, b = LITE, 8, len(lens)
    gen = torch.Generator().manual_seed(11)
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    kv = torch.randn(layers, int(indptr[-1]), dims.latent_dim, generator=gen).half().cuda()
    q_src = torch.randn(layers, b, 1, 16, dims.latent_dim, generator=gen).half().cuda()
    newest = (indptr[1:] - 1).long().cuda()  # each sequence's last row: this step's token
    row_src = kv[:, newest].clone()  # [layers, B, 576]
    kv[:, newest] = float("nan")  # until written just before the layer's split
    indptr = indptr.cuda()
    ws = dec.workspace_shapes(dims, batch=b, q_tokens=1, num_splits=num_splits)
    o_part = torch.full(ws["o_part"], float("nan"), device="cuda")  # shared by all layers
    lse_part = torch.full(ws["lse_part"], float("nan"), device="cuda")
    o = torch.full((layers, b, 1, 16, dims.kv_lora_rank), float("nan"), device="cuda").half()
    lse = torch.full((layers, b, 1, 16), float("nan"), device="cuda")
    q = torch.empty_like(q_src)
    torch.cuda.synchronize()
    for layer in range(layers):
        torch.mul(q_src[layer], 1.0, out=q[layer])  # [B, 1, H, 576]: written just before
        kv[layer].index_copy_(0, newest, row_src[layer])  # the new cache rows, the same
        part = [_tvm(o_part), _tvm(lse_part)]
        mod["decode_split"](_tvm(q[layer]), _tvm(kv), _tvm(indptr), layer, *part,
                            _tvm(o[layer]), _tvm(lse[layer]))  # fmt: skip
        mod["decode_merge"](*part, _tvm(indptr), _tvm(o[layer]), _tvm(lse[layer]))
    torch.cuda.synchronize()
    scale = dims.qk_head_dim**-0.5
    for layer in range(layers):
        for i in range(b):
            k0, k1 = int(indptr[i]), int(indptr[i + 1])
            ref_o, ref_lse = reference.absorbed_attention(
                q_src[layer, i], kv[layer, k0:k1], v_dim=dims.kv_lora_rank, sm_scale=scale
            )
            assert not kv[layer, k0:k1].isnan().any()
            torch.testing.assert_close(o[layer, i].double(), ref_o, atol=4e-3, rtol=1e-2)
            torch.testing.assert_close(lse[layer, i].double(), ref_lse, atol=2e-3, rtol=1e-4)


def test_bench_graph_mode_bookkeeping():
    """The graph mode's per-layer calls on CPU (llvm): call l reads layer l (checked against
    the float64 reference per layer), the byte count is one layer's rows + Q + O, every
    benchmark shape's graph replay reads at least 4x the L2, timed split counts are used ones."""
    bench = load_benchmark("bench_decode")
    dims, layers, batch, ctx = TINY, 3, 2, 70
    q, kv, indptr = bench.make_inputs(dims, batch, ctx, layers=layers, device="cpu")
    assert len(q) == layers and q[0].shape == (batch, 1, dims.heads, dims.latent_dim)
    assert kv.shape == (layers, batch * ctx, dims.latent_dim)  # [NL, B*ctx, 576]
    config = _cpu(16, 32)
    built = _module("tiny", 1, "cpu", config)
    calls, o, lse = bench.ours(built[0], dims, q, kv, indptr, splits=5)
    assert len(calls) == layers and all(x.isnan().all() for x in o)
    nbytes = bench.call_bytes(dims, batch=batch, ctx=ctx, heads=dims.heads)
    assert nbytes == kv[0].nbytes + q[0].nbytes + o[0].nbytes
    for call in calls:
        call()
    for layer in range(layers):
        bench.verify(dims, q, kv, indptr, o, lse, layer=layer, sm_scale=dims.qk_head_dim**-0.5)
    assert not torch.equal(o[0], o[1])  # distinct layers really read
    l2 = 50 * 2**20  # H100
    for b, n, _ in bench.SHAPES:
        nl = bench.graph_layers(LITE, batch=b, ctx=n, min_layers=27, l2_bytes=l2)
        assert nl >= 27 and nl * b * n * LITE.latent_dim * 2 >= 4 * l2
    counts = bench.split_counts(86, 600, dec.DecodeConfig(block_n=64))
    assert counts == [10]  # 43, 86 and 172 compiled splits all use 10 (one tile each) at 600
    assert bench.parse_shapes("1x16384,32x4096") == [(1, 16384), (32, 4096)]
    for arch in ("sm_89", "sm_90a"):  # every candidate has a label (JSON key), none shared
        found = dec.candidate_configs(tvm_target(arch), LITE, q_tokens=1)
        assert len({bench.config_name(c) for c in found}) == len(found) > 1
    for bad in ("1x", "1x2x3", "0x4096", "big"):
        with pytest.raises(SystemExit, match="BATCHxCTX"):
            bench.parse_shapes(bad)


def test_merge_split_lanes_int_and_tir_agree():
    """The merge's run-time lane count (a TIR select chain on the workspace's S) equals the
    Python formula: the smallest power of two <= 32 whose 4-way unroll covers S."""
    analyzer = tvm.sym.Analyzer()
    for s in range(1, 300):
        lanes = dec.merge_split_lanes(s)
        assert lanes == min(32, 1 << max(0, math.ceil(math.log2(math.ceil(s / 4))))), s
        assert int(analyzer.simplify(dec.merge_split_lanes(tvm.tirx.IntImm("int32", s)))) == lanes


def test_split_arithmetic_has_one_home_and_no_cycle():
    """``decode_splits`` holds the split arithmetic; ``attention_decode`` re-exports the same
    objects and the split kernel module imports them from there, not from ``attention_decode``
    (no import cycle, no local import to break one)."""
    import ast
    import inspect

    from mla_compiler.schedules import attention_decode_mma, decode_splits

    for name in ("MIN_SPLIT_ROWS", "effective_splits", "split_range", "choose_splits"):
        assert getattr(dec, name) is getattr(decode_splits, name), name
    assert dec.merge_split_lanes is decode_splits.merge_split_lanes
    for module in (attention_decode_mma, decode_splits):
        imported = {
            node.module
            for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, ast.ImportFrom)
        }
        assert "mla_compiler.schedules.attention_decode" not in imported, module.__name__
