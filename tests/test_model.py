"""qwen_min against transformers' Qwen2 (the oracle), on random-weight checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_min import CheckpointError, ConfigError, generate, load_model, load_tokenizer
from qwen_min.fast import chunked_linear_cross_entropy, sdpa_attention, use_fast_paths
from qwen_min.model import attention, linear_cross_entropy
from tests.conftest import QWEN25_05B


def hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("fast", [True, False])
def test_tiny_logits_match_transformers_fp32(tiny, fast):
    """load_model's fast paths, and the plain path of model.py that the guide traces."""
    hf, path = tiny
    ours = use_fast_paths(load_model(path), fast)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_logits(hf, ids)
        diff = (ours(ids) - want).abs().max().item()
    assert want.std() > 1.0  # logits far from zero, so the bound below means something
    print(f"tiny config max abs logit diff (fast paths {fast}): {diff:.3e}")
    assert diff <= 1e-5, diff


def test_load_model_swaps_in_the_fast_paths_and_they_swap_out(tiny):
    ours = load_model(tiny[1])
    assert {layer.self_attn.attend for layer in ours.model.layers} == {sdpa_attention}
    assert ours.head_loss is chunked_linear_cross_entropy
    use_fast_paths(ours, False)
    assert {layer.self_attn.attend for layer in ours.model.layers} == {attention}
    assert ours.head_loss is linear_cross_entropy


def test_lm_head_is_the_embedding_parameter(tiny):
    ours = load_model(tiny[1])
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_left_padded_batch_matches_transformers(tiny):
    hf, path = tiny
    ours = load_model(path)
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        diff = (ours(ids, mask) - hf_logits(hf, ids, mask))[mask.bool()].abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.slow
def test_full_qwen25_05b_config_logits_match(hf_checkpoint):
    hf, path = hf_checkpoint(std=0.05, **QWEN25_05B)
    ours = load_model(path)
    assert ours.cfg.head_dim == 64 and ours.cfg.n_rep == 7
    ids = torch.randint(0, 151936, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_logits(hf, ids)
        diff = (ours(ids) - want).abs().max().item()
    print(f"0.5B config max abs logit diff: {diff:.3e} (logit std {want.std():.2f})")
    assert diff <= 1e-4, diff


def test_official_config_form_loads_identically(tiny, tmp_path):
    """Qwen2.5-0.5B-Instruct's own config.json form: top-level rope_theta, torch_dtype, ..."""
    hf, path = tiny
    cfg = json.loads((path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("layer_types")
    cfg.pop("dtype")
    cfg |= dict(rope_theta=theta, torch_dtype="bfloat16", use_sliding_window=False,
                sliding_window=32768, max_window_layers=21, rope_scaling=None)
    for f in ("model.safetensors", "tokenizer.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path)
    assert ours.cfg.rope_theta == 1e6 and ours.cfg.torch_dtype == "bfloat16"
    ids = torch.arange(30)[None] % 512
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type: expected 'qwen2', got 'llama'"),
        ({"use_sliding_window": True}, "use_sliding_window: sliding-window attention"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
         "rope_scaling: rope type 'yarn' is not implemented"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types: expected only"),
    ],
)
def test_unsupported_config_is_rejected(tiny, tmp_path, change, message):
    cfg = json.loads((tiny[1] / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_identically(hf_checkpoint, tiny):
    hf, sharded = hf_checkpoint(save_kwargs={"max_shard_size": "100KB"})
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = load_model(sharded).state_dict(), hf.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_kv_cache_decoding_matches_full_pass(tiny):
    from qwen_min import KVCache

    ours = load_model(tiny[1])
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.cfg, 2, 24, torch.float32, "cpu")
        steps = [ours(ids[:, :8], cache=cache)]  # a prefill, then one token at a time
        steps += [ours(ids[:, t : t + 1], cache=cache) for t in range(8, 24)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers_left_padded(tiny):
    hf, path = tiny
    ours = load_model(path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (9, 4, 13)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, T:]
    tokens, logits = generate(ours, ids, 40, attention_mask=mask)
    assert tokens.tolist() == want.tolist()
    assert logits.shape == (3, 40, 512) and logits.argmax(-1).tolist() == tokens.tolist()
    for i, p in enumerate(prompts):  # batched equals unbatched
        alone, alone_logits = generate(ours, p[None], 40)
        assert alone.tolist() == tokens[i : i + 1].tolist()
        assert (alone_logits[0] - logits[i]).abs().max().item() <= 1e-4


def test_generation_stops_early_only_when_asked(tiny):
    ours = load_model(tiny[1])
    ids = torch.tensor([[1, 2, 3]])
    tokens, _ = generate(ours, ids, 12)
    assert tokens.shape == (1, 12)
    first = int(tokens[0, 0])
    stopped, logits = generate(ours, ids, 12, eos_token_id=first)
    assert stopped.tolist() == [[first]] and logits.shape == (1, 1, 512)


def test_tokenizer_real_qwen2_vocabulary(tiny):
    tok = load_tokenizer(tiny[1])
    assert tok.encode("1.23").ids == [16, 13, 17, 18]
    assert tok.encode("1 . 2 3").ids == [16, 659, 220, 17, 220, 18]
    text = "0.25,1.50;0.27,1.47"
    ids = tok.encode(text).ids
    assert len(ids) == len(text)
    table = {str(d): 15 + d for d in range(10)} | {".": 13, ",": 11, ";": 26}
    assert ids == [table[c] for c in text]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert [tok.token_to_id(s) for s in specials] == [151643, 151644, 151645]


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _copy(tiny[1], tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _copy(tiny[1], tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.bias' has shape "
                       r"\(7,\), the config implies \(32,\)"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _copy(tiny[1], tmp_path)
    sd = load_file(tmp_path / "model.safetensors") | {"model.extra.weight": torch.zeros(2)}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model.extra.weight'\]"):
        load_model(tmp_path)


def test_truncated_file_is_named(tiny, tmp_path):
    _copy(tiny[1], tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{f}: unreadable safetensors file, truncated"):
        load_model(tmp_path)


def test_download_failure_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"could not download 'nobody/no-such-model'.*"
                       r"--model /path/to/folder.*make demo"):
        load_model("nobody/no-such-model")


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope")
