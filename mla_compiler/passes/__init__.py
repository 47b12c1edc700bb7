"""Relax passes of the MLA pipeline, one per file (see mla_compiler.pipeline)."""
