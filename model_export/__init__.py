"""PyTorch definition of the DeepSeek-V2 family, weight loading, and export to TVM Relax."""

from mla_compiler.model_export.config import (
    PRESETS,
    MLADims,
    ModelConfig,
    RopeConfig,
    config_from_hf,
    load_config,
    preset,
)

__all__ = [
    "PRESETS",
    "MLADims",
    "ModelConfig",
    "RopeConfig",
    "config_from_hf",
    "load_config",
    "preset",
]
