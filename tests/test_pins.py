"""The TVM pins: apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post1. Every ffi 0.1.15
release segfaults in Schedule.tensorize, tvm.ir.save_json and meta-schedule database writes;
these tests exercise exactly those paths (a segfault fails the run)."""

from __future__ import annotations

import importlib.metadata as md
import json

import tvm
from tvm.script import tirx as T


def test_pinned_versions():
    assert md.version("apache-tvm") == "0.27.0.post1"
    assert md.version("apache-tvm-ffi") == "0.1.14.post1"


@T.prim_func(s_tir=True)
def _matmul(
    a: T.Buffer((16, 16), "float16"),
    b: T.Buffer((16, 16), "float16"),
    c: T.Buffer((16, 16), "float32"),
):
    for i, j, k in T.grid(16, 16, 16):
        with T.sblock("c"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float32(0)
            c[vi, vj] = c[vi, vj] + T.Cast("float32", a[vi, vk]) * T.Cast("float32", b[vj, vk])


def test_save_json_round_trip():
    text = tvm.ir.save_json(tvm.IRModule({"main": _matmul}))
    assert json.loads(text)
    back = tvm.ir.load_json(text)
    tvm.ir.assert_structural_equal(back["main"], _matmul)


def test_tensorize_mma():
    """The tensor-core GEMM schedule tensorizes its tiles with the mma.sync/ldmatrix intrinsics."""
    from mla_compiler.schedules.gemm import gemm
    from mla_compiler.schedules.target import tvm_target

    func = gemm(None, 256, 256, dtype="float16", target=tvm_target("sm_90a"))
    assert "mma" in func.script()


def test_meta_schedule_json_database(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(
        path_workload=str(tmp_path / "wl.json"), path_tuning_record=str(tmp_path / "rec.json")
    )
    mod = tvm.IRModule({"main": _matmul})
    workload = db.commit_workload(mod)
    sch = tvm.s_tir.Schedule(mod)
    db.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, [1.0e-5], tvm.target.Target({"kind": "llvm"}))
    )
    assert (tmp_path / "rec.json").stat().st_size > 0
    reread = ms.database.JSONDatabase(
        path_workload=str(tmp_path / "wl.json"), path_tuning_record=str(tmp_path / "rec.json")
    )
    assert len(reread.get_all_tuning_records()) == 1
