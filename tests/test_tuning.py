"""Tuning: config spaces, the records database, plans built here, measured on a GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
from conftest import gpu_available

from mla_compiler import kernel_configs, tuning, tuning_db, tuning_measure
from mla_compiler.compiler import CompileOptions
from mla_compiler.errors import TuningError
from mla_compiler.kernel_configs import KernelChoice
from mla_compiler.model_export.config import preset
from mla_compiler.schedules import attention_decode as ad
from mla_compiler.schedules import attention_prefill as ap
from mla_compiler.schedules import families
from mla_compiler.schedules.families import FAMILIES
from mla_compiler.schedules.target import tvm_target

V2 = preset("deepseek-v2-lite")
TINY = preset("tiny")


# --- config spaces ------------------------------------------------------------------------------

ATTN = ["attn_decode", "attn_prefill_absorbed", "attn_prefill_decompressed"]


def _space(name, arch, model=V2):
    """The tuner's candidate configs of family ``name`` for ``model`` on ``arch``."""
    return [c for c, _ in tuning.tuning_space(FAMILIES[name], model, tvm_target(arch))]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_89"])
@pytest.mark.parametrize("name", ATTN)
def test_space_is_pruned_by_keep(name, arch):
    target = tvm_target(arch)
    space = _space(name, arch)
    assert space, f"{name} has no config on {arch}"
    assert len(set(space)) == len(space)
    for cfg in space:
        if name == "attn_decode":
            assert ad.keep(cfg, target, V2.dims, q_tokens=1)
        else:
            kind = name.rsplit("_", 1)[1]
            assert ap.keep(cfg, target, kind=kind, dims=V2.dims)
    if name == "attn_decode":  # the full product is pruned: smem / thread limits drop configs
        assert len(space) < 3 * 4 * 4
        assert space[0] == ad.default_config(target, V2.dims)


def test_sm_89_space_drops_what_sm_90a_keeps():
    big, small = _space("attn_decode", "sm_90a"), _space("attn_decode", "sm_89")
    assert set(small) < set(big)  # 99 KB of smem on sm_89
    assert not any(c.wgmma for c in _space("attn_prefill_absorbed", "sm_89"))


def test_shapes_and_keys():
    target = tvm_target("sm_90a")
    (cfg, shapes), *_ = tuning.tuning_space(FAMILIES["attn_decode"], V2, target)
    assert [s.ctx for s in shapes] == list(families.DECODE_CONTEXTS)
    assert FAMILIES["attn_decode"].shape_key(shapes[0]) == "h16-r512-p64-b1-ctx4096"
    params = [FAMILIES["attn_decode"].run_params(cfg, s, target) for s in shapes]
    assert all(p["splits"] >= 1 for p in params)
    pre = FAMILIES["attn_prefill_decompressed"]
    keys = [pre.shape_key(s) for s in pre.model_shapes(V2)]
    assert keys == ["h16-k192-v128-n2048", "h16-k192-v128-n8192"]


def test_select_kernels():
    assert [k.name for k in tuning.select_kernels("attn")] == [
        "attn_decode",
        "attn_prefill_absorbed",
        "attn_prefill_decompressed",
    ]
    assert [k.name for k in tuning.select_kernels("attn_decode,attn")][0] == "attn_decode"
    with pytest.raises(TuningError, match="unknown kernel"):
        tuning.select_kernels("attn,conv")
    if not any(k.group == "gemm" for k in FAMILIES.values()):
        assert tuning.skipped_groups("attn,gemm") == ["gemm"]
        with pytest.raises(TuningError, match="no tunable kernel"):
            tuning.select_kernels("gemm")


def test_config_round_trip():
    cfg = ap.candidates("sm_90a", kind="absorbed", dims=V2.dims)[-1]
    back = kernel_configs.config_from_dict("attn_prefill_absorbed", tuning.config_to_dict(cfg))
    assert back == cfg
    with pytest.raises(TuningError, match="another version"):
        kernel_configs.config_from_dict("attn_decode", {"block_n": 64, "bogus": 1})


# --- the database -------------------------------------------------------------------------------


def _rec(us, *, ok=True, cfg=None, shape="s-n1", kernel="attn_decode", err=None):
    config = cfg or {"block_n": 64, "stages": 2, "warps_n": 8, "tensor_cores": True}
    return {"kernel": kernel, "target": "sm_90a", "shape_key": shape, "config": config,
            "median_us": us if ok else None, "ok": ok, "err": err}  # fmt: skip


def _cfg(block_n, stages=2, warps_n=4):
    return {"block_n": block_n, "stages": stages, "warps_n": warps_n, "tensor_cores": True}


def test_append_is_one_synced_line(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    db = tmp_path / "db"
    tuning_db.append(db, _rec(10.0))
    tuning_db.append(db, _rec(5.0, cfg=_cfg(32)))
    lines = (db / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(synced) == 2
    rec = json.loads(lines[0])
    assert rec["v"] == 1 and rec["timestamp"].endswith("Z") and rec["median_us"] == 10.0


def test_corrupt_line_is_skipped_with_warning(tmp_path):
    db = tmp_path / "db"
    tuning_db.append(db, _rec(10.0))
    with open(db / "records.jsonl", "a") as f:
        f.write('{"kernel": "attn_decode", "targ')  # a writer killed mid-line
    tuning_db.append(db, _rec(7.0, cfg=_cfg(32)))  # starts on a fresh line
    with (db / "records.jsonl").open("a") as f:
        f.write('["not", "a", "record"]\n')
    with pytest.warns(tuning_db.CorruptRecordWarning) as caught:
        recs = tuning_db.read(db)
    assert [r["median_us"] for r in recs] == [10.0, 7.0]
    lines = [re.search(r"records\.jsonl:(\d+): corrupt", str(w.message)) for w in caught]
    assert [m[1] for m in lines if m] == ["2", "4"]


def test_best_config_picks_fastest_ok(tmp_path):
    db = tmp_path / "db"
    key = "h16-r512-p64-b1-ctx4096"
    tuning_db.append(db, _rec(30.0, cfg=_cfg(64, 2, 8), shape=key))
    tuning_db.append(db, _rec(None, ok=False, cfg=_cfg(32, 3, 2), shape=key, err="check: O"))
    tuning_db.append(db, _rec(12.5, cfg=_cfg(32, 2, 4), shape=key))
    tuning_db.append(db, _rec(1.0, cfg=_cfg(128, 2, 4), shape="h16-r512-p64-b1-ctx16384"))
    with open(db / "records.jsonl", "a") as f:  # an error record claiming a time never wins
        f.write(json.dumps({**_rec(0.1, cfg=_cfg(32, 4, 4), shape=key), "ok": False}) + "\n")
    cfg, rec = kernel_configs.best_config(db, "attn_decode", "sm_90a", key)
    assert cfg == ad.DecodeConfig(block_n=32, stages=2, warps_n=4) and rec["median_us"] == 12.5
    assert kernel_configs.best_config(db, "attn_decode", "sm_89", key) is None
    assert kernel_configs.best_config(db, "attn_prefill_absorbed", "sm_90a", key) is None
    # the compiler's view: exact key, else the nearest tuned size, else the default with a note
    notes = []
    default = ad.DecodeConfig()
    assert kernel_configs.config_for(db, "attn_decode", "sm_90a", key, default) == cfg
    near = kernel_configs.config_for(
        db, "attn_decode", "sm_90a", "h16-r512-p64-b1-ctx12000", default, log=notes.append
    )
    assert near == ad.DecodeConfig(block_n=128, stages=2, warps_n=4) and "16384" in notes[-1]
    other = kernel_configs.config_for(
        db, "attn_decode", "sm_90a", "h4-r64-p32-b1-ctx4096", default, log=notes.append
    )
    assert other is default and "default" in notes[-1]
    assert kernel_configs.config_for(None, "attn_decode", "sm_90a", key, default) is default


def test_unreadable_db_dir_raises(tmp_path):
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    with pytest.raises(TuningError, match="not a directory"):
        tuning_db.read(not_dir)
    with pytest.raises(TuningError, match="does not exist"):
        kernel_configs.best_config(tmp_path / "missing", "attn_decode", "sm_90a", "k")
    if os.getuid() != 0:  # root reads anything
        db = tmp_path / "db"
        tuning_db.append(db, _rec(1.0))
        (db / "records.jsonl").chmod(0)
        with pytest.raises(TuningError, match="not readable"):
            tuning_db.read(db)


def _fake_plan(tmp_path, n_cands=3):
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    cands = []
    for i in range(n_cands):
        cands.append({
            "id": f"attn_decode-{i:03d}", "kernel": "attn_decode", "config": _cfg(32 * (i + 1)),
            "artifact": f"attn_decode-{i:03d}", "build_error": "TargetError: x" if i == 2 else None,
            "shapes": [{"key": f"k-ctx{c}", "params": {"ctx": c}} for c in (4096, 16384)],
        })  # fmt: skip
    plan = {"format": tuning_measure.PLAN_FORMAT, "tvm_version": "0", "target": "sm_90a",
            "model": {"name": "m", "dims": {}, "sm_scale": 0.1}, "candidates": cands}  # fmt: skip
    tuning_measure.write_json(plan_dir / "plan.json", plan)
    return plan_dir


def test_measure_resumes_and_records_failures(tmp_path):
    plan_dir, db = _fake_plan(tmp_path), tmp_path / "db"
    calls = []

    def runner(plan, cand, shape):
        calls.append((cand["id"], shape["key"]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed after two measurements
        return {"median_us": 10.0 + len(calls)}

    with pytest.raises(KeyboardInterrupt):
        tuning_measure.measure(plan_dir, db, runner=runner, progress=False)
    assert len(tuning_db.read(db)) == 2  # what was measured before the kill is kept
    calls.clear()
    counts = tuning_measure.measure(plan_dir, db, runner=lambda p, c, s: runner(p, c, s) or {},
                                    progress=False)  # fmt: skip
    assert calls == [("attn_decode-001", "k-ctx4096"), ("attn_decode-001", "k-ctx16384")]
    assert counts["skipped"] == 2 and counts["measured"] == 4 and counts["failed"] == 2
    recs = tuning_db.read(db)
    assert len(recs) == 6
    build_failed = [r for r in recs if r["candidate"] == "attn_decode-002"]
    assert all(not r["ok"] and r["err"].startswith("build: TargetError") for r in build_failed)
    calls.clear()
    again = tuning_measure.measure(plan_dir, db, runner=runner, progress=False)
    assert calls == [] and again["skipped"] == 6 and len(tuning_db.read(db)) == 6
    _, best = kernel_configs.best_config(db, "attn_decode", "sm_90a", "k-ctx4096")
    assert best["median_us"] == 11.0
    rows = {r["shape_key"]: r for r in tuning.summary(db, target="sm_90a")}
    assert rows["k-ctx4096"]["measured"] == 3 and rows["k-ctx4096"]["failed"] == 1
    assert rows["k-ctx4096"]["default"]["candidate"] == "attn_decode-000"
    assert "| attn_decode | k-ctx16384 |" in tuning.format_summary(list(rows.values()))


def test_measure_budget_leaves_the_rest(tmp_path):
    plan_dir, db = _fake_plan(tmp_path), tmp_path / "db"
    counts = tuning_measure.measure(plan_dir, db, runner=lambda p, c, s: {"median_us": 1.0},
                                    budget_s=-1, progress=False)  # fmt: skip
    assert counts["left"] == 6 and not tuning_db.records_path(db).exists()


def test_bad_plan_raises(tmp_path):
    with pytest.raises(TuningError, match="no tuning plan"):
        tuning_measure.read_plan(tmp_path)
    (tmp_path / "plan.json").write_text("{")
    with pytest.raises(TuningError, match="unreadable"):
        tuning_measure.read_plan(tmp_path)


def test_measuring_side_needs_the_runtime_only():
    import subprocess
    import sys

    code = (
        "from mla_compiler.runtime import loader; loader.use_runtime_only()\n"
        "import sys, mla_compiler.tuning_measure as m; m.tvm_version()\n"
        "bad = [k for k in sys.modules if k.startswith('mla_compiler.schedules')]\n"
        "assert not loader.compiler_loaded() and not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- building a plan ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """Two decode candidates of the tiny preset built for sm_90a (nvcc, no GPU)."""
    out = tmp_path_factory.mktemp("plan")
    return tuning.build_candidates(TINY, "sm_90a", "attn_decode", out, limit=2, progress=False)


def test_build_plan_writes_artifacts(tiny_plan):
    from mla_compiler.runtime import loader

    plan = tuning.read_plan(tiny_plan)
    assert plan["target"] == "sm_90a" and plan["model"]["dims"]["heads"] == TINY.dims.heads
    assert [c["id"] for c in plan["candidates"]] == ["attn_decode-000", "attn_decode-001"]
    space = ad.candidate_configs(tvm_target("sm_90a"), TINY.dims, q_tokens=1)
    for cand, cfg in zip(plan["candidates"], space, strict=False):
        assert cand["build_error"] is None, cand["build_error"]
        assert kernel_configs.config_from_dict("attn_decode", cand["config"]) == cfg
        directory, manifest = loader.read_manifest(tiny_plan / cand["artifact"])
        assert manifest["images"] == ["sm_90a"] and manifest["targets"] == ["sm_90a"]
        lib = (directory / manifest["library"]).read_bytes()
        assert lib[:4] == b"\x7fELF" and b"decode_split" in lib and b"decode_merge" in lib
        assert cand["resources"]["decode_split_kernel"]["spill_bytes"] == 0
        assert [s["params"]["ctx"] for s in cand["shapes"]] == list(families.DECODE_CONTEXTS)


@pytest.mark.skipif(gpu_available(), reason="checks what a dying worker leaves (no GPU here)")
def test_worker_that_dies_is_recorded_as_failed(tiny_plan, tmp_path):
    db = tmp_path / "db"
    counts = tuning_measure.measure(tiny_plan, db, progress=False)  # workers find no GPU
    recs = tuning_db.read(db)
    assert counts["measured"] == 6 and counts["failed"] == 6 and len(recs) == 6
    assert all(r["err"].startswith("run: worker exited with") for r in recs)
    assert tuning_measure.measure(tiny_plan, db, progress=False)["skipped"] == 6


def test_rebuild_reuses_built_candidates(tiny_plan, capsys):
    before = (tiny_plan / "attn_decode-000" / "kernel.so").stat().st_mtime_ns
    tuning.build_candidates(TINY, "sm_90a", "attn_decode", tiny_plan, limit=2)
    assert "2 candidates already built" in capsys.readouterr().err
    assert (tiny_plan / "attn_decode-000" / "kernel.so").stat().st_mtime_ns == before
    assert len(tuning.read_plan(tiny_plan)["candidates"]) == 2


def test_build_records_a_config_that_does_not_build(tmp_path, monkeypatch):
    (real, *_) = tuning.plan_candidates(TINY, "sm_90a", [FAMILIES["attn_decode"]], limit=1)
    bad = {**real, "config": _cfg(48, 9, 4)}
    job = {"candidate": bad, "target": "sm_90a", "model": TINY.to_dict(), "out": str(tmp_path)}
    cand = tuning._build_one(job)  # the worker function, in this process
    assert cand["artifact"] is None and "does not fit" in cand["build_error"]
    assert not (tmp_path / "attn_decode-000").exists()


def test_cli_tune_build_only_then_measure_needs_gpu(tmp_path):
    from conftest import run_cli

    out = tmp_path / "plan"
    db = str(tmp_path / "db")
    proc = run_cli(
        *("tune", "--preset", "tiny", "--target", "sm_90a", "--db", db, "--limit", "1"),
        *("--kernels", "attn_decode,gemm", "--build-only", str(out)),
    )
    assert "2 candidates, 0 failed" in proc.stdout  # one attn_decode, one gemm_prefill config
    assert (out / "attn_decode-000" / "kernel.so").is_file()
    assert (out / "gemm_prefill-000" / "kernel.so").is_file()
    bad = run_cli("tune", "--db", str(tmp_path / "file"), "--measure", str(tmp_path / "x"),
                  check=False)  # fmt: skip
    assert bad.returncode == 2 and "no tuning plan" in bad.stderr
    nodb = run_cli(
        *("compile", "--preset", "tiny", "-o", str(tmp_path / "art")),
        *("--tuning-db", str(tmp_path / "nope")),
        check=False,
    )
    assert nodb.returncode == 2 and "does not exist" in nodb.stderr


# --- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")
def test_gpu_measure_tiny_plan(tiny_plan, tmp_path):
    db = tmp_path / "db"
    counts = tuning_measure.measure(tiny_plan, db, progress=False)
    recs = tuning_db.read(db)
    assert counts["measured"] == 6 and len(recs) == 6
    bad = [r for r in recs if not r["ok"]]
    assert not bad, bad
    assert all(r["median_us"] > 0 and r["arch"].startswith("sm_") for r in recs)
    cfg, rec = kernel_configs.best_config(
        db,
        "attn_decode",
        "sm_90a",
        "h4-r64-p32-b1-ctx4096",  # TINY's dims
    )
    assert cfg in ad.candidate_configs(tvm_target("sm_90a"), TINY.dims, q_tokens=1)[:2]
    assert tuning_measure.measure(tiny_plan, db, progress=False)["skipped"] == 6


# --- the runners' checks, with the llvm kernels on the CPU --------------------------------------

CPU_CASES = {
    "attn_decode": ({"batch": 2, "ctx": 100, "splits": 3}, ad.CPU_CONFIG),
    "attn_prefill_absorbed": ({"n": 160}, ap.PrefillCpuConfig()),
    "attn_prefill_decompressed": ({"n": 160}, ap.PrefillCpuConfig()),
}


@pytest.fixture(scope="module")
def cpu_modules(tmp_path_factory):
    """The three kernels of the tiny preset built for llvm and loaded like a plan's artifacts."""
    from mla_compiler import cuda_build
    from mla_compiler.runtime import loader

    out, mods = tmp_path_factory.mktemp("cpu"), {}
    for name, (_, cfg) in CPU_CASES.items():
        family = FAMILIES[name]
        mod = tuning.build_module(family, cfg, family.model_shapes(TINY)[:1], tvm_target("cpu"))
        cuda_build.build(mod, ["cpu"], output=out / name, name=tuning.LIBRARY)
        mods[name] = loader.load_module(out / name, "cpu")
    return mods


@pytest.fixture
def on_cpu(monkeypatch):
    timed = []

    def time_calls(calls, *, reps):
        for call in calls:
            call()
        timed.append(len(calls))
        return 1.0

    monkeypatch.setattr(tuning_measure, "DEVICE", "cpu")
    monkeypatch.setattr(tuning_measure, "input_sets", lambda set_bytes: 2)
    monkeypatch.setattr(tuning_measure, "time_calls", time_calls)
    return timed


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_runner_checks_against_reference(name, cpu_modules, on_cpu):
    plan = {"model": {"dims": dataclasses.asdict(TINY.dims), "sm_scale": TINY.softmax_scale}}
    params = CPU_CASES[name][0]
    res = tuning_measure.RUNNERS[name](cpu_modules[name], plan, params, 5)
    assert res["median_us"] == 1.0 and res["max_abs_err"] < 1e-2 and on_cpu == [2]
    wrong = {"model": {**plan["model"], "sm_scale": 1.5 * TINY.softmax_scale}}
    with pytest.raises(tuning_measure.CheckError, match="differs from the reference"):
        tuning_measure.RUNNERS[name](cpu_modules[name], wrong, params, 5)
    assert on_cpu == [2]  # a wrong kernel is never timed


def test_compiler_view_of_the_kernel_choice(tmp_path):
    """``KernelChoice`` + ``decode_config`` / ``prefill_config``: what kernels.py calls."""
    db, target = tmp_path / "db", tvm_target("sm_90a")
    tuned = ad.DecodeConfig(block_n=32, stages=2, warps_n=4)
    scale = V2.softmax_scale
    key = FAMILIES["attn_decode"].shape_key(families.DecodeShape(V2.dims, 16384, scale))
    tuning_db.append(db, _rec(5.0, cfg=tuning.config_to_dict(tuned), shape=key))
    pre = ap.candidates(target, kind="absorbed", dims=V2.dims)[-1]
    pre_key = FAMILIES["attn_prefill_absorbed"].shape_key(
        families.PrefillShape(V2.dims, 512, scale)
    )
    tuning_db.append(
        db, _rec(9.0, cfg=tuning.config_to_dict(pre), shape=pre_key, kernel="attn_prefill_absorbed")
    )
    default = ad.default_config(target, V2.dims)
    plain = KernelChoice(max_context=16384)
    assert kernel_configs.decode_config(plain, target, V2.dims, sm_scale=scale) == default  # no db
    notes = []
    choice = KernelChoice(str(db), ubatch=512, max_context=16384, log=notes.append)
    assert kernel_configs.decode_config(choice, target, V2.dims, sm_scale=scale) == tuned
    longer = dataclasses.replace(choice, max_context=32768)
    assert kernel_configs.decode_config(longer, target, V2.dims, sm_scale=scale) == tuned  # nearest
    assert (
        kernel_configs.prefill_config(choice, "attn_absorbed", target, V2.dims, sm_scale=scale)
        == pre
    )
    fallback = kernel_configs.prefill_config(
        choice, "attn_decompressed", target, V2.dims, sm_scale=scale
    )
    assert fallback == ap.default_config(target, kind="decompressed", dims=V2.dims)
    assert any("tuned for 16384" in n for n in notes) and "default config" in notes[-1]
    assert (
        kernel_configs.prefill_config(plain, "attn_absorbed", target, V2.dims, sm_scale=scale)
        != pre
    )
    options = CompileOptions(tuning_db=str(tmp_path / "nope"))
    with pytest.raises(TuningError, match="does not exist"):
        KernelChoice.from_options(options)


def test_gemm_kernel_shapes_and_compiler_view(tmp_path):
    """gemm_prefill: V2-Lite's dense products are its shapes; under ``using_db`` the GEMM
    choice picks the wgmma config recorded fastest for a shape, others keep the default."""
    from mla_compiler.schedules import gemm as G
    from mla_compiler.schedules import gemm_wgmma as W

    target = tvm_target("sm_90a")
    kernel = FAMILIES["gemm_prefill"]
    assert kernel.group == "gemm" and tuning.select_kernels("gemm") == [kernel]
    keys = [kernel.shape_key(s) for s in kernel.model_shapes(V2)]
    assert "n2816-k2048-silu_mul-t2048" in keys and "n64-k2048-plain-f32-t2048" in keys
    assert len(keys) == len(set(keys)) == len(families.dense_products(V2)) == 9
    assert tuning.tuning_space(kernel, V2, tvm_target("sm_89")) == []  # no wgmma there

    db = tmp_path / "db"
    tuned = W.WgmmaConfig(64, 256, 64, 4, overlap=True)
    key = kernel.shape_key(families.GemmShape(3072, 2048, None, None, 2048))
    tuning_db.append(
        db, _rec(3.0, cfg=tuning.config_to_dict(tuned), shape=key, kernel="gemm_prefill")
    )

    def config_of(n, choice=None):
        choice = choice or KernelChoice()
        return kernel_configs.dense_gemm_config(
            choice, None, n, 2048, target=target, epilogue=None, out_dtype=None
        )

    default, other = config_of(3072), config_of(2048)
    assert default == G.wgmma_default(None, 3072, 2048, target=target, epilogue=None, batch=None)
    with_db = KernelChoice(str(db))
    assert config_of(3072, with_db) == tuned
    assert config_of(2048, with_db) == other  # no record for this shape: the default tile
    assert "wgmma" in G.gemm(None, 3072, 2048, target=target, config=tuned).script()
    assert default != tuned


def test_moe_kernel_registered_and_looked_up(tmp_path):
    """moe_grouped: one shape per prompt chunk (gate+up and down measured together: they share
    the row blocks), looked up by LowerMoE through ``kernel_configs.moe_config``."""
    from mla_compiler.schedules import gemm_wgmma as W

    target = tvm_target("sm_90a")
    kernel = FAMILIES["moe_grouped"]
    assert tuning.select_kernels("moe") == [kernel] and tuning.skipped_groups("gemm,moe") == []
    (shape,) = kernel.model_shapes(V2)
    key = kernel.shape_key(shape)
    assert key == "e64-k6-d2048-i1408-t2048"
    assert kernel.run_params(W.CONFIGS[0], shape, target)["block_m"] == 128
    mod = tuning.build_module(kernel, W.CONFIGS[2], [shape], target)
    assert {gv.name_hint for gv in mod.get_global_vars()} == {"moe_gate_up", "moe_down"}
    db = tmp_path / "db"
    tuned = W.WgmmaConfig(64, 256, 64, 4, overlap=True)
    rec = _rec(2.0, cfg=tuning.config_to_dict(tuned), shape=key, kernel="moe_grouped")
    tuning_db.append(db, rec)
    model_shape = dict(hidden=2048, inter=1408, num_experts=64, top_k=6)
    plain, with_db = KernelChoice(), KernelChoice(str(db))
    assert kernel_configs.moe_config(plain, target, **model_shape) == W.MOE_CONFIG
    assert kernel_configs.moe_config(with_db, target, **model_shape) == tuned
    assert kernel_configs.moe_config(with_db, tvm_target("sm_89"), **model_shape) is None
