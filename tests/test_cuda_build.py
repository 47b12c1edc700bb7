"""Build-time CUDA: the exported library carries a fatbin (cubin per arch + PTX), never source.

Runs on a GPU-less machine: nvcc/fatbinary/cuobjdump at build time; the runtime's CUDA loader
is stood in for by a Python function that records what TVM hands it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.s_tir import dlight as dl

from mla_compiler import cuda_build, inspect_artifact, nvcc
from mla_compiler.errors import ArtifactError, TargetError
from mla_compiler.schedules.target import tvm_target

ARCHS = ["sm_89", "sm_90a"]


def gpu_schedule(mod: tvm.IRModule, arch: str) -> tvm.IRModule:
    """Legalize Relax ops and schedule every TIR function with dlight's default GPU rules."""
    mod = relax.transform.LegalizeOps()(mod)
    with tvm_target(arch):
        return dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )(mod)  # fmt: skip


def gemm_bias_prim_func(m: int = 64, n: int = 96, k: int = 128, dtype: str = "float16"):
    """TIR-only ``out = x @ w.T + b`` (f32 accumulation): one kernel with an output buffer."""
    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="w")
    b = te.placeholder((n,), dtype, name="b")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r),
        name="y",
    )  # [m, n] f32
    out = te.compute((m, n), lambda i, j: (y[i, j] + b[j].astype("float32")).astype(dtype))
    return te.create_prim_func([x, w, b, out]).with_attr("global_symbol", "gemm_bias")


def run_python(code: str, *args, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (from a file: TVMScript reads its source); it prints
    one JSON object as its last line."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(textwrap.dedent(code))
    try:
        proc = subprocess.run(
            [sys.executable, script.name, *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=300,
        )
    finally:
        os.unlink(script.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def relax_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("relax_gemm")
    mod = gpu_schedule(cuda_build.smoke_module(), "sm_89")
    return cuda_build.build(mod, ARCHS, output=out, name="gemm")


def test_library_holds_fatbin_not_source(relax_artifact):
    res = relax_artifact
    assert res.targets == ("sm_89", "sm_90a")
    assert res.images == ("sm_89", "sm_90a", "compute_89")  # PTX of the lowest arch
    (dm,) = res.device_modules
    fatbin = dm.fatbin.read_bytes()
    assert nvcc.fatbin_images(fatbin) == list(res.images)
    library = res.library.read_bytes()
    assert fatbin in library
    source = (dm.directory / "kernels.cu").read_text()
    assert "__global__" in source and "__CUDACC_RTC__" in source
    for marker in (b"__global__", b"__CUDACC_RTC__", b"#include"):
        assert marker not in library, marker
    manifest = json.loads(res.manifest.read_text())
    assert manifest["library"] == "gemm.so" and manifest["images"] == list(res.images)


RECORD_CUDA_PAYLOAD = """
    import json, struct, sys
    from mla_compiler.runtime import loader
    loader.use_runtime_only()
    import tvm, tvm_ffi
    seen = []

    @tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda")
    def _record(payload):  # stands in for libtvm_runtime_cuda's loader
        seen.append(bytes(payload))
        return tvm_ffi.system_lib()

    lib = tvm.runtime.load_module(sys.argv[1])
    (payload,) = seen
    fatbin = open(sys.argv[2], "rb").read()
    n = struct.unpack_from("<Q", payload)[0]
    code_len = struct.unpack_from("<Q", payload, len(payload) - len(fatbin) - 8)[0]
    print(json.dumps({
        "root": lib.kind,
        "fmt": payload[8:8 + n].decode(),
        "code_is_fatbin": payload.endswith(fatbin),
        "code_len": code_len,
        "compiler_loaded": loader.compiler_loaded(),
    }))
"""


def test_runtime_only_deserialises_fatbin_module(relax_artifact):
    """TVM's own deserialiser (runtime library only) hands the CUDA loader fmt "fatbin" + the
    fatbin bytes: exactly what cuModuleLoadData gets on a GPU."""
    dm = relax_artifact.device_modules[0]
    got = run_python(RECORD_CUDA_PAYLOAD, relax_artifact.library, dm.fatbin)
    assert got["root"] == "relax.VMExecutable"
    assert got["fmt"] == "fatbin"
    assert got["code_is_fatbin"] and got["code_len"] == dm.fatbin.stat().st_size
    assert got["compiler_loaded"] is False


def test_inspect_lists_kernels_for_both_archs(relax_artifact):
    report = inspect_artifact.inspect(relax_artifact.library.parent)
    kernels = report["kernels"]
    names = {k["name"] for k in kernels}
    assert names and {(k["name"], k["arch"]) for k in kernels} == {
        (n, a) for n in names for a in ARCHS
    }
    for k in kernels:
        assert k["registers"] > 0 and k["spill_bytes"] == 0, k
        assert k["sass"].get("EXIT", 0) >= 1, k
    # the GEMM kernel does its math in half2/float FMAs or tensor cores
    assert any(k["sass"].get(op, 0) > 0 for k in kernels for op in ("HFMA2", "FFMA", "HMMA"))
    # two different machine codes, not one cubin listed twice
    cubins = relax_artifact.device_modules[0].cubins
    assert cubins["sm_89"].read_bytes() != cubins["sm_90a"].read_bytes()
    table = inspect_artifact.format_table(report)
    lines = table.splitlines()
    assert len(lines) == len(kernels) + 2
    assert all(name in table for name in names) and "sm_90a" in table


def test_tir_only_module_arch_specific_has_no_ptx(tmp_path):
    mod = gpu_schedule(tvm.IRModule({"gemm_bias": gemm_bias_prim_func()}), "sm_90a")
    res = cuda_build.build(mod, ["sm_90a"], output=tmp_path)
    assert res.images == ("sm_90a",)  # compute_90a PTX would run nowhere else: not carried
    (dm,) = res.device_modules
    assert dm.ptx == {} and list(dm.kernels["sm_90a"]) == ["gemm_bias_kernel"]
    assert dm.fatbin.read_bytes() in res.library.read_bytes()


def test_export_of_caller_compiled_module(tmp_path):
    """The pipeline's path: tvm.compile under source_only(), then export()."""
    prim = gemm_bias_prim_func(m=16, n=16, k=16)
    mod = gpu_schedule(tvm.IRModule({"gemm_bias": prim}), "sm_89")
    with cuda_build.source_only():
        executable = tvm.compile(mod, target=tvm_target("sm_89"))
    res = cuda_build.export(executable, ["sm_89"], output=tmp_path, name="k")
    assert res.images == ("sm_89", "compute_89") and res.library.name == "k.so"
    with pytest.raises(TargetError, match="exported for target cpu"):
        cuda_build.export(executable, ["cpu"], output=tmp_path / "cpu")


def test_cpu_build_has_no_device_code(tmp_path):
    res = cuda_build.build(cuda_build.smoke_module(), ["cpu"], output=tmp_path)
    assert res.images == () and res.device_modules == ()
    assert inspect_artifact.inspect(tmp_path) == {"kernels": []}


FORCE_SOURCE = """
    import json
    import tvm, tvm_ffi
    from mla_compiler import cuda_build
    from mla_compiler.schedules.target import tvm_target
    from tvm.script import tirx as T
    calls = []

    @tvm_ffi.register_global_func("ffi.Module.create.cuda")
    def _jit(code, fmt, fmap, source):  # what a driver-equipped TVM would do: JIT at build
        calls.append(fmt)
        raise RuntimeError("JIT")

    @T.prim_func
    def add_one(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
        for i in T.thread_binding(256, "threadIdx.x"):
            b[i] = a[i] + T.float32(1)

    mod = tvm.IRModule({"add_one": add_one})
    with cuda_build.source_only():
        tvm.compile(mod, target=tvm_target("sm_89"))
    forced = list(calls)
    try:
        tvm.compile(mod, target=tvm_target("sm_89"))
    except Exception:
        pass
    print(json.dumps({"forced": forced, "unforced": calls}))
"""


def _weights_then_output_module():
    """main(x; w, b) with ``num_input`` = 1: silu(x @ w.T + b) ** 2. The kernels after the
    matmul touch only the weights and statically planned intermediates (capturable); the
    matmul reads the input and the last kernel writes the output (not capturable)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 128), "float16"))
    w = relax.Var("w", relax.TensorType((96, 128), "float16"))
    b = relax.Var("b", relax.TensorType((96,), "float16"))
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            z = bb.emit(relax.op.nn.silu(relax.op.add(y, b)))
            out = bb.emit_output(relax.op.multiply(z, z))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda_graph"])
def test_cuda_graph_option_captures_static_kernels(tmp_path, cuda_graph):
    res = cuda_build.build(
        _weights_then_output_module(), ["sm_90a"], output=tmp_path, cuda_graph=cuda_graph
    )
    library = res.library.read_bytes()
    assert (b"vm.builtin.cuda_graph.run_or_capture" in library) == cuda_graph
    assert (b"main_cuda_graph_capture" in library) == cuda_graph


def test_source_only_keeps_source_where_a_driver_exists():
    got = run_python(FORCE_SOURCE)
    assert got == {"forced": [], "unforced": ["cuda"]}


# --- the import-blob rewrite on synthetic data -------------------------------------------------


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _cuda_payload(fmt: bytes, code: bytes) -> tuple[bytes, bytes]:
    info = _s(b"k0") + struct.pack("<Q", 2) + bytes(8)  # name, 2 arg dtypes
    info += struct.pack("<Q", 2) + _s(b"blockIdx.x") + _s(b"threadIdx.x")  # launch tags
    info += struct.pack("<Q", 2) + bytes(8)  # arg extra tags
    fmap = struct.pack("<Q", 1) + _s(b"k0") + info
    return _s(fmt) + fmap + _s(code), fmap


def _blob(*groups: tuple[bytes, bytes | None]) -> bytes:
    n = len(groups)
    body = struct.pack("<Q", n + 1) + b"".join(struct.pack("<Q", i) for i in range(n + 1))
    body += struct.pack("<Q", n) + b"".join(struct.pack("<Q", i + 1) for i in range(n))
    for kind, payload in groups:
        body += _s(kind) + (b"" if payload is None else _s(payload))
    return struct.pack("<Q", len(body)) + body


def test_rewrite_replaces_only_cuda_payloads():
    vm_payload = bytes(range(40))
    cuda, fmap = _cuda_payload(b"cuda", b"extern __global__ void k0() {}")
    blob = _blob((b"relax.VMExecutable", vm_payload), (b"_lib", None), (b"cuda", cuda))
    assert cuda_build._device_payloads(blob) == ["extern __global__ void k0() {}"]
    fatbin = b"\x50\xed\x55\xba" + bytes(range(256)) * 3
    new = cuda_build._rewrite_payloads(blob, [fatbin])
    groups = list(cuda_build._groups(new))
    assert [g[0] for g in groups] == ["relax.VMExecutable", "_lib", "cuda"]
    assert new[groups[0][1] : groups[0][2]] == vm_payload
    fmt, new_fmap, code = cuda_build._split_cuda_payload(new[groups[2][1] : groups[2][2]])
    assert (fmt, new_fmap, code) == ("fatbin", fmap, fatbin)


def test_rewrite_rejects_compiled_or_corrupt_payloads():
    compiled, _ = _cuda_payload(b"cubin", b"\x7fELF")
    with pytest.raises(TargetError, match="source_only"):
        cuda_build._device_payloads(_blob((b"_lib", None), (b"cuda", compiled)))
    good, _ = _cuda_payload(b"cuda", b"src")
    with pytest.raises(ArtifactError):
        cuda_build._split_cuda_payload(good + b"\x00")
    with pytest.raises(ArtifactError):
        list(cuda_build._groups(_blob((b"cuda", good))[:-3]))


# --- on a GPU: built here, loaded with the runtime library only ---------------------------------


def _gpu_capability() -> tuple[int, int]:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        pytest.skip("needs an NVIDIA GPU")
    try:
        nvcc.find_tool("nvcc")
    except TargetError:
        pytest.skip("needs nvcc to build here (without it: benchmarks/device_smoke.sh)")
    return torch.cuda.get_device_capability()


RUN_TIR_POISONED = """
    import json, sys
    import numpy as np
    from mla_compiler.runtime import loader
    loader.use_runtime_only()
    import tvm
    lib = loader.load_module(sys.argv[1], "cuda")
    io = np.load(sys.argv[2])
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.full(io["expected"].shape, np.nan, "float16"), dev)  # poisoned
    lib["gemm_bias"](*(tvm.runtime.tensor(io[k], dev) for k in ("x", "w", "b")), out)
    err = np.abs(out.numpy().astype(np.float64) - io["expected"])
    print(json.dumps({"max_err": float(np.nan_to_num(err, nan=np.inf).max()),
                      "ok": bool(np.all(err <= 1e-2 + 1e-2 * np.abs(io["expected"]))),
                      "compiler_loaded": loader.compiler_loaded()}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["native_cubin", "ptx_of_older_arch"])
def test_gpu_runs_artifact_runtime_only(tmp_path, which):
    major, minor = _gpu_capability()
    native = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
    if which == "ptx_of_older_arch" and major < 9:
        pytest.skip("needs a GPU newer than sm_8x to exercise the PTX path")
    archs = [native] if which == "native_cubin" else ["sm_80"]
    cuda_build.write_smoke_artifact(tmp_path / "vm", archs)
    row = run_python(
        "import sys; from mla_compiler.runtime import loader; import json;"
        "loader.use_runtime_only(); print(json.dumps(loader.run_smoke(sys.argv[1], 'cuda')))",
        tmp_path / "vm",
    )
    assert row["status"] == "ok", row
    assert row["image"] == (native if which == "native_cubin" else "compute_80")
    assert row["compiler_loaded"] is False

    # TIR-only library, poisoned output buffer, float64 reference
    import torch

    from mla_compiler import reference

    mod = gpu_schedule(tvm.IRModule({"gemm_bias": gemm_bias_prim_func()}), archs[0])
    cuda_build.build(mod, archs, output=tmp_path / "tir")
    rng = np.random.default_rng()
    x = rng.standard_normal((64, 128)).astype("float16")
    w = (rng.standard_normal((96, 128)) / 8).astype("float16")
    b = rng.standard_normal(96).astype("float16")
    expected = reference.gemm(torch.from_numpy(x), torch.from_numpy(w)) + torch.from_numpy(b)
    np.savez(tmp_path / "io.npz", x=x, w=w, b=b, expected=expected.numpy())
    got = run_python(RUN_TIR_POISONED, tmp_path / "tir", tmp_path / "io.npz")
    assert got["ok"] and got["compiler_loaded"] is False, got


@pytest.mark.parametrize(
    "archs,pdl,tagged",
    [(["sm_90a"], True, True), (["sm_90a"], False, False), (["sm_89"], True, False)],
    ids=["sm_90a-pdl", "sm_90a-no-pdl", "sm_89-pdl-ignored"],
)
def test_pdl_option_tags_every_kernel(tmp_path, archs, pdl, tagged):
    """``compile --pdl``: on sm_90+ every kernel of the artifact is launched as a programmatic
    dependent (its tag in the function table, its wait in the source); elsewhere ignored."""
    from mla_compiler.compiler import build_module
    from mla_compiler.schedules.grid_dependency import PDL_TAG

    facts = build_module(_weights_then_output_module(), archs, tmp_path, pdl=pdl)
    assert facts["pdl"] == tagged
    library = (tmp_path / "model.so").read_bytes()
    assert (PDL_TAG.encode() in library) == tagged
    sources = "".join(p.read_text() for p in (tmp_path / "model.cuda").glob("*.cu"))
    kernels = sources.count("__global__") // 2  # declaration + definition
    assert kernels >= 2
    assert sources.count("tvm_builtin_ptx_griddepcontrol_wait();") == (kernels if tagged else 0)
