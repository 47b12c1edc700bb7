"""Progress lines of long compile stages, and TVM's own warnings kept off the terminal.

``quiet_tvm`` works on file descriptor 2, so its tests run a child interpreter and read what
reached the child's real stderr.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import time

import pytest
import tvm
from tvm import te

from mla_compiler import cuda_build, nvcc, tvm_log
from mla_compiler.errors import TargetError

TVM_WARNING = (
    b"[20:45:55] /project/src/target/llvm/codegen_cpu.cc:1183: Warning: Unknown pragma pragma_scope"
)
# a real one: relax.op.take legalizes to topi's "fast" take, which warns at the C++ level
TAKE_WARNING = """
def take_warning():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 4), "float32"))
    i = relax.Var("i", relax.TensorType((3,), "int64"))
    with bb.function("main", [x, i]):
        bb.emit_func_output(bb.emit(relax.op.take(x, i, axis=0)))
    relax.transform.LegalizeOps()(bb.get())
"""


def child(code: str, *, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; its stderr is what a user's terminal would show.
    Python's default warning filters apply (CI exports PYTHONWARNINGS=ignore)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_noise_patterns():
    assert tvm_log.is_noise(TVM_WARNING)
    assert tvm_log.is_noise(
        b"[21:04:54] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults "
        b"when there are out-of-bounds indices. Make sure input indices are in bound"
    )
    assert tvm_log.is_noise(b"[21:04:54] /project/src/runtime/module.cc:12: loaded x")  # INFO
    assert not tvm_log.is_noise(b"[21:04:54] /project/src/ir/transform.cc:12: Error: broken")
    assert not tvm_log.is_noise(b"Warning: something of ours")
    assert not tvm_log.is_noise(b"nvcc failed for sm_89:")


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_tvm_hides_tvm_warnings_unless_verbose(verbose):
    proc = child(
        TAKE_WARNING
        + f"""
import os, sys, warnings
from mla_compiler.tvm_log import quiet_tvm
from mla_compiler.kernel_configs import KernelChoice

with quiet_tvm({verbose}) as say:
    take_warning()
    os.write(2, {TVM_WARNING!r} + b"\\n")
    warnings.warn("deprecated in torch", FutureWarning)
    os.write(2, b"a real problem\\n")
    print("from sys.stderr", file=sys.stderr)
    say("[2/3] our progress line")
os.write(2, b"after the block\\n")
"""
    )
    err = proc.stderr
    for line in ("a real problem", "from sys.stderr", "[2/3] our progress line", "after the block"):
        assert line in err
    noise = ("Fast mode segfaults", "Unknown pragma", "deprecated in torch")
    if verbose:
        assert all(n in err for n in noise), err
    else:
        assert not any(n in err for n in noise), err
        lines = err.splitlines()  # order kept
        assert lines.index("a real problem") < lines.index("[2/3] our progress line")


def test_say_and_other_lines_reach_stderr_while_the_block_runs():
    """The parent reads each line while the child is still inside the block (it waits for a
    line on stdin after each): progress is not held back until the block ends."""
    code = """
        import os, sys
        from mla_compiler.tvm_log import quiet_tvm

        with quiet_tvm(False) as say:
            say("progress 1")
            sys.stdin.readline()
            os.write(2, b"[20:45:55] /x/y.cc:1: Warning: hidden\\nnot tvm\\n")
            sys.stdin.readline()
            say("progress 2")
            sys.stdin.readline()
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for expected in ("progress 1", "not tvm", "progress 2"):
            assert proc.stderr.readline().strip() == expected
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read() == ""
    finally:
        proc.kill()


def test_fd2_restored_and_output_kept_after_an_exception():
    proc = child(
        """
        import os, sys
        from mla_compiler.tvm_log import quiet_tvm

        before = os.fstat(2)
        try:
            with quiet_tvm(False):
                os.write(2, b"[20:45:55] /x/y.cc:1: Warning: hidden\\nwhat went wrong\\n")
                raise ValueError("boom")
        except ValueError:
            pass
        after = os.fstat(2)
        assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
        os.write(2, b"direct after\\n")
        with quiet_tvm(False):
            raise RuntimeError("uncaught inside")
        """,
        check=False,
    )
    assert proc.returncode == 1
    err = proc.stderr
    assert "hidden" not in err
    assert err.index("what went wrong") < err.index("direct after")
    assert "RuntimeError: uncaught inside" in err  # the traceback, on the restored stderr


def test_quiet_tvm_verbose_yields_a_printer(capsys):
    with tvm_log.quiet_tvm(True) as say:
        say("hello")
    assert capsys.readouterr().err == "hello\n"


def test_quick_frame_lookups_same_answer():
    ns: dict = {}
    exec(compile("import sys; frame = sys._getframe()", "<ast>", "exec"), ns)
    from mla_compiler.pipeline import quick_frame_lookups

    assert inspect.getmodule(ns["frame"]) is None  # (scans sys.modules, fills the cache)
    before = dict(inspect.modulesbyfile)
    with quick_frame_lookups():
        assert inspect.getmodule(ns["frame"]) is None
    assert inspect.modulesbyfile == before


# --- cuda_build progress ----------------------------------------------------------------------


def add_one():
    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] + 1.0, name="b")
    return tvm.IRModule({"add_one": te.create_prim_func([a, b]).with_attr("global_symbol", "f")})


def test_build_reports_progress_cpu(tmp_path):
    lines: list[str] = []
    cuda_build.build(add_one(), ["cpu"], output=tmp_path, progress=lines.append)
    text = "\n".join(lines)
    assert "build: TIR lowering + codegen of 1 kernels ..." in text
    assert "build: TIR lowering " in text and "host codegen" in text
    assert "export: model.so" in text
    assert all(line.startswith("      ") for line in lines)


def test_progress_instrument_leaves_the_cuda_source_alone():
    mod = cuda_build.smoke_module()
    sources, lines = [], []
    for watched in (False, True):
        timer = cuda_build._CompileTimer(lines.append, mod, gpu=True)
        instruments = [cuda_build._PassProgress(timer)] if watched else []
        with cuda_build.source_only(), tvm.transform.PassContext(instruments=instruments):
            ex = tvm.compile(mod, target=cuda_build.tvm_target("sm_89"))
        sources.append(cuda_build._device_payloads(cuda_build._pack_imports(ex.mod)))
    assert sources[0] == sources[1] and sources[0]
    assert any("dlight scheduling" in line for line in lines)


def test_build_reports_progress_sm_89(tmp_path):
    try:
        nvcc.find_tool("nvcc")
    except TargetError:
        pytest.skip("no nvcc")
    lines: list[str] = []
    cuda_build.build(cuda_build.smoke_module(), ["sm_89"], output=tmp_path, progress=lines.append)
    text = "\n".join(lines)
    for expected in (
        "build: Relax pipeline (1 functions, 0 kernels) ...",
        "build: dlight scheduling ",
        "build: Relax pipeline done ",
        "TIR lowering + codegen of ",
        "CUDA + host codegen",
        "nvcc sm_89: cubin (",
        "nvcc sm_89: cubin done ",
        "nvcc compute_89: PTX done ",
        "export: fatbin (sm_89, compute_89) + model.so",
    ):
        assert expected in text, text
    assert len(lines) <= 12


def test_nvcc_heartbeat(monkeypatch, tmp_path):
    def slow_cubin(source, arch, *, extra_flags=()):
        time.sleep(0.5)
        return b"cubin", {}

    def slow_ptx(source, arch, *, extra_flags=()):
        time.sleep(0.5)
        return "ptx"

    monkeypatch.setattr(nvcc, "compile_cubin", slow_cubin)
    monkeypatch.setattr(nvcc, "compile_ptx", slow_ptx)
    monkeypatch.setattr(nvcc, "make_fatbin", lambda cubins, ptx: b"fatbin")
    monkeypatch.setattr(cuda_build, "HEARTBEAT_S", 0.2)
    lines: list[str] = []
    cuda_build._compile_device_module("// source", ("sm_89",), tmp_path, ptx=True, say=lines.append)
    text = "\n".join(lines)
    assert "nvcc sm_89: cubin (0 KB source) ..." in text
    assert "nvcc sm_89: cubin done " in text and "(0 kernels, 0 bytes spilled)" in text
    assert "nvcc compute_89: PTX done " in text
    assert "nvcc still running: " in text


def test_compile_ir_logs_phases():
    from mla_compiler.compiler import resolve_model
    from mla_compiler.kernel_configs import KernelChoice
    from mla_compiler.pipeline import compile_ir
    from mla_compiler.schedules.target import tvm_target

    _, model, _, _ = resolve_model(model_dir=None, preset_name="tiny", dtype="float32", seed=0)
    lines: list[str] = []
    compile_ir(model, mla=3, target=tvm_target("cpu"), choice=KernelChoice(), log=lines.append)
    assert lines[0].startswith("      ir: torch.export -> Relax (")
    assert "weight transforms" in lines[-1] and lines[-1].endswith(" kernels)")
    assert 2 <= len(lines) <= 8
