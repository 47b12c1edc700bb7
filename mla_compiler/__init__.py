"""mla-compiler: compiles DeepSeek-family models (MLA attention + MoE) with Apache TVM."""

__version__ = "0.1.0"
