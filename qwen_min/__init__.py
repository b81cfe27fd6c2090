"""qwen-min: a compact, from-scratch PyTorch Qwen2.5-0.5B-Instruct."""

from .generate import generate
from .loading import CheckpointError, load_config, load_model, load_tokenizer
from .model import (
    ConfigError,
    FlopCounter,
    KVCache,
    LoRALinear,
    Qwen2Config,
    Qwen2ForCausalLM,
    count_flops,
    padding_mask_or_none,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlopCounter",
    "KVCache",
    "LoRALinear",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "count_flops",
    "generate",
    "load_config",
    "load_model",
    "load_tokenizer",
    "padding_mask_or_none",
]
