"""Defaults shared by the CLI, the compile API and the runtime (one place for each number)."""

DEFAULT_MAX_CONTEXT = 4096  # tokens of KV cache per sequence an artifact is built for
DEFAULT_UBATCH = 2048  # prompt chunk size (llama.cpp's -ub)
DEFAULT_MAX_NEW_TOKENS = 128  # `run` without --max-new-tokens
# mla 3 prompt chunks whose KV length passes this attend over the latent rows (absorbed), so
# the prompt workspace stops growing with the context (--deep-prefill-from; 0: never)
DEFAULT_DEEP_PREFILL_FROM = 8192
