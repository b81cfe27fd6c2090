"""qwen-min: a compact, from-scratch PyTorch Qwen2.5-0.5B-Instruct."""

from .counting import FlopCounter, count_flops
from .fast import use_fast_paths
from .generate import SamplingOptions, generate
from .loading import CheckpointError, ConfigError, load_config, load_model, load_tokenizer
from .model import KVCache, LoRALinear, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlopCounter",
    "KVCache",
    "LoRALinear",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "SamplingOptions",
    "count_flops",
    "generate",
    "load_config",
    "load_model",
    "load_tokenizer",
    "use_fast_paths",
]
