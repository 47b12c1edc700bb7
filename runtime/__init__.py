"""Lightweight runtime: loads compiled artifacts with TVM's runtime library only."""
