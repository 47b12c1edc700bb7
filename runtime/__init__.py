"""Lightweight runtime: loads compiled artifacts with TVM's runtime library only.

``from mla_compiler.runtime import Engine`` (imported lazily, so ``loader.use_runtime_only()``
can still run before anything imports tvm).
"""


def __getattr__(name: str):
    if name in ("Engine", "SamplingParams"):
        from mla_compiler.runtime import engine

        return getattr(engine, name)
    raise AttributeError(name)
