"""Defaults shared by the CLI, the compile API and the runtime (one place for each number)."""

DEFAULT_MAX_CONTEXT = 4096  # tokens of KV cache per sequence an artifact is built for
DEFAULT_UBATCH = 2048  # prompt chunk size (llama.cpp's -ub)
DEFAULT_MAX_NEW_TOKENS = 128  # `run` without --max-new-tokens
