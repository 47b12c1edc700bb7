"""The package's import graph (issue #27): no cycle, and nothing imported upward.

The graph covers every module of the installed layout (pyproject's package-dir mapping:
``schedules/`` is ``mla_compiler.schedules`` ...) and every import of a package module in it:
module level or inside a function (a lazy import is still a dependency), absolute or relative.
It is read with ``ast`` by ``tools/design_metrics.py`` (which prints the design metrics too).
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The lower layers and what each may import from the package beyond itself. Everything else of
# ``mla_compiler`` (cli, compiler, pipeline, passes, tuning*, kernels, cuda_build, nvcc, ...) is
# the compiler side, above them.
LOWER_LAYERS = {
    "mla_compiler.model_export": {"mla_compiler.errors"},
    "mla_compiler.schedules": {
        "mla_compiler.errors",
        "mla_compiler.model_export.config",  # MLADims: the attention kernels' dimensions
    },
    "mla_compiler.runtime": {
        "mla_compiler.errors",
        "mla_compiler.artifact",  # the artifact's files and metadata.json
        "mla_compiler.model_export.config",  # ModelConfig of metadata.json; bench's HF baseline
        "mla_compiler.model_export.modeling",  # weights of seeded presets too large to store
        "mla_compiler.model_export.weights",  # ... drawn a tensor at a time (quantized presets)
        "mla_compiler.model_export.quantize",  # ... and quantized at load
    },
}
SHARED = {"mla_compiler", "mla_compiler.errors", "mla_compiler.artifact"}  # below every layer
# The runtime runs without the compiler: importing it never loads tvm (loader.use_runtime_only
# must come first), however deep the module-level import chain.
RUNTIME_EAGER_FORBIDDEN = {"tvm", "tvm_ffi"}


def _load_metrics():
    spec = importlib.util.spec_from_file_location(
        "design_metrics", ROOT / "tools" / "design_metrics.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dm = _load_metrics()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.fixture(scope="module")
def graph():
    return dm.import_graph(ROOT)


def test_the_graph_covers_the_installed_layout(graph):
    for module in (
        "mla_compiler.cli",
        "mla_compiler.passes.lower_moe",
        "mla_compiler.schedules.gemm",
        "mla_compiler.runtime.serve",
        "mla_compiler.model_export.config",
    ):
        assert module in graph, module
    assert graph["mla_compiler.runtime.serve"], "serve imports nothing of the package?"


def test_no_import_cycle(graph):
    found = dm.cycles(graph)
    assert not found, f"{len(found)} import cycle(s) in the package:\n" + "\n".join(
        dm.format_cycle(graph, c, ROOT) for c in found
    )


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_nothing_imported_upward(graph, layer):
    """Each lower layer imports only itself and its allow-list, directly ..."""
    bad = [
        f"{imp.path.relative_to(ROOT)}:{imp.line}: {imp.source} imports {imp.target}"
        for module, edges in sorted(graph.items())
        if _in(module, layer)
        for imp in edges.values()
        if not _in(imp.target, layer) and imp.target not in LOWER_LAYERS[layer]
    ]
    assert not bad, f"{layer} may import {sorted(LOWER_LAYERS[layer])} only:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_no_compiler_module_reached_from_lower_layers(graph, layer):
    """... and reaches no compiler-side module through the modules it may import."""
    compiler_side = {m for m in graph if not any(_in(m, p) for p in LOWER_LAYERS)} - SHARED
    reached = dm.closure(graph, [m for m in graph if _in(m, layer)])
    bad = [" -> ".join(chain) for m, chain in sorted(reached.items()) if m in compiler_side]
    assert not bad, f"{layer} reaches the compiler side:\n" + "\n".join(bad)


def test_runtime_import_loads_no_tvm(graph):
    """Importing any runtime module (module-level imports, followed through the package) does
    not import tvm: the runtime-only TVM library stays selectable."""
    known = dm.package_modules(ROOT)
    reached = dm.closure(graph, [m for m in graph if _in(m, "mla_compiler.runtime")], eager=True)
    bad = [
        f"{imp.path.relative_to(ROOT)}:{imp.line}: {imp.target} (via {' -> '.join(reached[m])})"
        for m in sorted(reached)
        for imp in dm.module_imports(m, known[m], known, external=True)
        if imp.target in RUNTIME_EAGER_FORBIDDEN and not imp.lazy
    ]
    assert not bad, "module-level tvm import on the runtime's import path:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_cyclic_imports(tmp_path):
    """The graph code on a made-up tree laid out like this one (package-dir mapping)."""
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.setuptools]
            package-dir = { "mla_compiler" = "mla_compiler", "mla_compiler.sched" = "sched" }
            packages = ["mla_compiler", "mla_compiler.sub", "mla_compiler.sched"]
            """
        )
    )
    files = {
        "mla_compiler/__init__.py": "",
        "mla_compiler/a.py": "from mla_compiler.sched import gemm\nimport os\n",
        "mla_compiler/b.py": "def f():\n    import mla_compiler.a as A\n    import tvm\n",
        "mla_compiler/c.py": "import importlib\nimportlib.import_module('mla_compiler.sub.x')\n",
        "mla_compiler/sub/__init__.py": "from .x import thing\n",
        "mla_compiler/sub/x.py": "from .. import c\nfrom ..sched.gemm import G\n",
        "sched/__init__.py": "",
        "sched/gemm.py": "from . import target\ndef g():\n    from mla_compiler import b\n",
        "sched/target.py": "from mla_compiler.sched import nothing_here\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = dm.import_graph(tmp_path)
    edges = {m: sorted(e) for m, e in g.items()}
    assert edges == {
        "mla_compiler": [],
        "mla_compiler.a": ["mla_compiler.sched.gemm"],
        "mla_compiler.b": ["mla_compiler.a"],
        "mla_compiler.c": ["mla_compiler.sub.x"],
        "mla_compiler.sub": ["mla_compiler.sub.x"],
        "mla_compiler.sub.x": ["mla_compiler.c", "mla_compiler.sched.gemm"],
        "mla_compiler.sched": [],
        "mla_compiler.sched.gemm": ["mla_compiler.b", "mla_compiler.sched.target"],
        "mla_compiler.sched.target": ["mla_compiler.sched"],
    }
    assert g["mla_compiler.b"]["mla_compiler.a"].lazy
    assert not g["mla_compiler.a"]["mla_compiler.sched.gemm"].lazy
    found = sorted(dm.cycles(g))
    assert found == [
        ["mla_compiler.a", "mla_compiler.sched.gemm", "mla_compiler.b", "mla_compiler.a"],
        ["mla_compiler.c", "mla_compiler.sub.x", "mla_compiler.c"],
    ]
    text = dm.format_cycle(g, found[0], tmp_path)
    assert "mla_compiler.b (sched/gemm.py:3, lazy)" in text
    assert list(dm.closure(g, ["mla_compiler.b"], eager=True)) == ["mla_compiler.b"]
    assert "mla_compiler.sched.target" in dm.closure(g, ["mla_compiler.b"])
    known = dm.package_modules(tmp_path)
    ext = dm.module_imports("mla_compiler.b", known["mla_compiler.b"], known, external=True)
    assert [(i.target, i.lazy) for i in ext] == [("mla_compiler.a", True), ("tvm", True)]
