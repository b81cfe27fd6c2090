"""lora/: the LoRA layer, training freeze, merge, and PEFT-format adapters.

PEFT on transformers' Qwen2 is the oracle: an adapter saved here must give the same logits
there, and one saved there the same logits here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora import (
    TARGETS,
    AdapterError,
    adapter_spec,
    apply_lora,
    base_model_identity,
    base_model_mismatch,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    read_adapter_metadata,
    save_adapter,
    unmerge_lora,
)
from qwen_min import Qwen2Config, Qwen2ForCausalLM, load_model
from qwen_min.model import Linear, LoRALinear

IDS = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(7))
# small models for the error tests: only shapes matter there, so no checkpoint files
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def small_model(**overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**(SMALL | overrides))).eval()


def randomize(named_params, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero A and B, so the adapter visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(named_params):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def message(excinfo) -> str:
    return str(excinfo.value)


# ----------------------------------------------------------------------------- apply / train


def test_trainable_count_rank8_qv_on_qwen25_05b_config():
    cfg = Qwen2Config()  # the 0.5B defaults, built on the meta device: nothing is allocated
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    n = apply_lora(model, rank=8)
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    assert n == cfg.num_hidden_layers * 8 * ((d + d) + (d + kv)) == 540_672
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 24 * 2 * 2


def test_all_seven_projections_can_carry_lora():
    model = small_model()
    n = apply_lora(model, rank=2, targets=TARGETS)
    d, kv, f = 32, 2 * 8, 48  # hidden, KV width (2 heads × 8), intermediate
    per_layer = (d + d) + (d + kv) + (d + kv) + (d + d) + 2 * (d + f) + (f + d)
    assert n == 2 * 2 * per_layer
    assert adapter_spec(lora_layers(model)).targets == TARGETS


def test_fresh_adapter_gives_exactly_the_base_logits(tiny):
    model = load_model(tiny[1])
    base = logits(model)
    apply_lora(model, rank=8, targets=TARGETS)
    assert torch.equal(logits(model), base)


def test_lora_keeps_base_keys_and_training_mode(tiny):
    model = load_model(tiny[1])  # eval mode
    keys = set(model.state_dict())
    apply_lora(model, rank=4, dropout=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.training and not layer.lora_dropout.training  # dropout stays off in eval
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict()) and new == set(lora_parameters(model))
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.abs().sum() == 0


def test_one_adam_step_changes_only_lora(tiny):
    model = load_model(tiny[1])
    apply_lora(model, rank=8)
    # B starts at zero, so A's gradient would be zero too: give B values first
    randomize((n, p) for n, p in lora_parameters(model).items() if n.endswith("lora_B"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # all of them: freezing must hold
    model.train()
    model.loss(IDS, IDS).backward()
    lora = lora_parameters(model)
    for name, p in model.named_parameters():
        if name in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in lora), name


def test_apply_lora_rejects_unknown_targets_and_a_second_adapter():
    model = small_model()
    with pytest.raises(ValueError) as e:
        apply_lora(model, targets=("q_proj", "lm_head"))
    assert message(e) == (
        "LoRA targets ['q_proj', 'lm_head']: expected one or more of ['q_proj', 'k_proj', "
        "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']"
    )
    apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError) as e:
        apply_lora(model)
    assert message(e) == (
        "the model already has a LoRA adapter (r = 4, alpha = 8 on q_proj, v_proj); "
        "apply_lora once per model: load a fresh model for a different adapter"
    )


# ----------------------------------------------------------------------------- merge


def test_merged_layer_is_the_same_function_in_fp64():
    layer = LoRALinear(Linear(64, 48, bias=True, flop_name="q_proj").double(), rank=4, alpha=16)
    randomize(layer.named_parameters())
    w0, x = layer.weight.detach().clone(), torch.randn(5, 64, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and (layer.weight - w0).abs().max() > 0.1
    assert (layer(x) - unmerged).abs().max() <= 1e-12
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_merged_layer_is_w0_plus_alpha_over_r_times_b_a():
    """The formula written out here, not through the layer's own `scaling`: r = 4, alpha = 16,
    so ΔW = 4·B·A; the unmerged forward is x·(W₀ + 4·B·A)ᵀ + b too."""
    layer = LoRALinear(Linear(64, 48, bias=True, flop_name="q_proj").double(), rank=4, alpha=16)
    randomize(layer.named_parameters())
    w0, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()  # fp32 factors
    want_w = w0 + 4.0 * (B @ A)  # (48, 4)(4, 64)
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
    assert (layer.weight - want_w).abs().max().item() <= 1e-13  # measured: 0.0
    # measured: 4.4e-15, outputs up to 12
    assert (unmerged - (x @ want_w.T + b)).abs().max().item() <= 1e-13


def test_bf16_layer_trains_fp32_factors_and_unmerges_exactly():
    # W₀ + ΔW rounds to bf16, so subtracting ΔW again could not give W₀ back: unmerge restores it
    layer = LoRALinear(Linear(64, 48, bias=True, flop_name="q_proj").bfloat16(), rank=4, alpha=4)
    randomize((n, p) for n, p in layer.named_parameters() if n == "lora_B")
    w0 = layer.weight.detach().clone()
    layer(torch.randn(5, 64, dtype=torch.bfloat16)).float().sum().backward()
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


# fp32 logits differ only by rounding: ΔW = B·A sums in another order than (x·Aᵀ)·Bᵀ, and this
# random, large-weight net amplifies that to ~2e-5; a wrong merge (scale, transpose) is off by O(1)
def test_merge_matches_unmerged_and_unmerge_restores_base_bit_for_bit(tiny):
    model = load_model(tiny[1])
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=16, targets=TARGETS)
    randomize(lora_parameters(model).items())
    unmerged = logits(model)
    merge_lora(model)
    merged = logits(model)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(weight, base_weights["model.layers.1.mlp.down_proj.weight"])
    diff = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged max abs logit diff: {diff:.3e} (logit std {unmerged.std():.2f})")
    assert diff <= 1e-4, diff
    unmerge_lora(model)
    for name, p in model.named_parameters():
        if name in base_weights:
            assert torch.equal(p, base_weights[name]), name
    assert torch.equal(logits(model), unmerged)


def test_saving_a_merged_model_saves_the_unmerged_factors(tiny, tmp_path):
    model = load_model(tiny[1])
    apply_lora(model, rank=4, targets=("q_proj", "o_proj", "up_proj"))
    randomize(lora_parameters(model).items())
    want = logits(model)
    merge_lora(model)
    save_adapter(model, tmp_path, str(tiny[1]))
    fresh = load_model(tiny[1])
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), want)


# ----------------------------------------------------------------------------- PEFT oracle


def test_ours_to_peft_same_logits(tiny, tmp_path):
    from peft import PeftModel

    hf, path = tiny
    ours = load_model(path)
    apply_lora(ours, rank=4, alpha=16)  # scale 4: a wrong alpha/r shows
    randomize(lora_parameters(ours).items())
    out = save_adapter(ours, tmp_path / "adapter", str(path), {"scaler": {"alpha": 2.5}})
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert peft_model.peft_config["default"].r == 4
    want, base = logits(peft_model), logits(hf)
    diff = (logits(ours) - want).abs().max().item()
    print(f"ours → PEFT max abs logit diff: {diff:.3e} "
          f"(adapter moves logits by {(want - base).abs().max():.2f})")
    assert (want - base).abs().max() > 1.0  # the adapter matters, so the bound means something
    assert diff <= 1e-5, diff


def test_peft_to_ours_same_logits(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, path = tiny
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(reversed(TARGETS)),
                        lora_dropout=0.05, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    randomize((n, p) for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.save_pretrained(tmp_path)
    ours = load_model(path)
    assert load_adapter(ours, tmp_path) == {}  # PEFT writes no qwen_min.json
    assert adapter_spec(lora_layers(ours)) == (4, 8, TARGETS, 0.05)
    want, base = logits(peft_model), logits(hf)
    diff = (logits(ours) - want).abs().max().item()
    print(f"PEFT → ours max abs logit diff: {diff:.3e} "
          f"(adapter moves logits by {(want - base).abs().max():.2f})")
    assert (want - base).abs().max() > 1.0
    assert diff <= 1e-5, diff


# ----------------------------------------------------------------------------- files


def test_adapter_folder_contents_and_metadata_round_trip(tmp_path):
    model = small_model()
    apply_lora(model, rank=4, alpha=6.5, targets=("v_proj", "down_proj"), dropout=0.1)
    meta = {"scaler": {"alpha": 3.2, "decimals": 2}, "data_sha256": "ab" * 32}
    save_adapter(model, tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "qwen_min.json"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules",
                                   "lora_dropout", "bias", "fan_in_fan_out",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 6.5,
        "target_modules": ["v_proj", "down_proj"], "lora_dropout": 0.1, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}
    recorded = meta | {"base_model": base_model_identity(model, "Qwen/Qwen2.5-0.5B-Instruct")}
    assert read_adapter_metadata(tmp_path) == recorded
    fresh = small_model()
    assert load_adapter(fresh, tmp_path) == recorded
    assert adapter_spec(lora_layers(fresh)) == (4, 6.5, ("v_proj", "down_proj"), 0.1)
    for name, p in lora_parameters(fresh).items():
        assert torch.equal(p, lora_parameters(model)[name]), name


def test_bad_metadata_leaves_the_saved_adapter_untouched(tmp_path):
    model = small_model()
    apply_lora(model)
    save_adapter(model, tmp_path, "base", {"step": 1})
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.fill_(1.0)
    with pytest.raises(TypeError):
        save_adapter(model, tmp_path, "base", {"step": object()})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # and no temp files


def test_the_base_model_identity_tells_bases_of_one_shape_apart():
    """qwen_min.json records the base: the same weights in bf16 or merged with the adapter
    are the same base; other weights of the same shape, or another config, are not."""
    model = small_model()
    recorded = base_model_identity(model, "base")
    assert recorded["name_or_path"] == "base"
    assert [len(recorded[k]) for k in ("config_sha256", "weights_sha256")] == [64, 64]
    apply_lora(model, rank=2, targets=("q_proj", "gate_proj"))
    randomize(lora_parameters(model).items())
    merge_lora(model)
    assert base_model_mismatch(model, recorded) is None
    assert base_model_mismatch(small_model().to(torch.bfloat16), recorded) is None
    other = small_model()
    with torch.no_grad():
        other.model.embed_tokens.weight[5, 3] += 0.5  # one value among the fingerprinted ones
    assert base_model_mismatch(other, recorded) == (
        "its weights differ from those recorded (weights_sha256)")
    assert base_model_mismatch(small_model(rms_norm_eps=1e-5), recorded) == (
        "its config.json differs from the one recorded (config_sha256)")


# ----------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    """An adapter (r=4, alpha=8, q/v) from the small 2-layer model, in tmp_path/adapter."""
    model = small_model()
    apply_lora(model, rank=4, alpha=8)
    return save_adapter(model, tmp_path / "adapter", "base")


def load_error(model, folder) -> str:
    """The AdapterError's message; the failed load must leave the model exactly as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as e:
        load_adapter(model, folder)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    return message(e)


def edit_config(folder, **fields) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def test_load_rank_and_target_mismatch(saved):
    model = small_model()
    apply_lora(model, rank=8, alpha=8)
    assert load_error(model, saved) == (
        f"{saved}/adapter_config.json: r is 4 but the model's LoRA adapter has 8; load it into "
        "a model without an adapter (load_adapter then applies the file's own)"
    )
    model = small_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj"))
    assert load_error(model, saved) == (
        f"{saved}/adapter_config.json: target_modules is q_proj, v_proj but the model's LoRA "
        "adapter has q_proj, k_proj; load it into a model without an adapter (load_adapter then "
        "applies the file's own)"
    )


def test_load_shape_mismatch(saved):
    model = small_model(hidden_size=64)  # an adapter trained on another model size
    assert load_error(model, saved) == (
        f"{saved}/adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn."
        "q_proj.lora_A.weight' has shape (4, 32), expected (4, 64) (r = 4 on this model's "
        "layer); was the adapter trained on another model or edited?"
    )
    edit_config(saved, r=8)  # the config no longer describes the tensors
    assert load_error(small_model(), saved) == (
        f"{saved}/adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn."
        "q_proj.lora_A.weight' has shape (4, 32), expected (8, 32) (r = 8 on this model's "
        "layer); was the adapter trained on another model or edited?"
    )


def test_load_missing_and_unexpected_tensors(saved):
    assert load_error(small_model(num_hidden_layers=3), saved) == (
        f"{saved}/adapter_model.safetensors: tensor 'base_model.model.model.layers.2.self_attn."
        "q_proj.lora_A.weight' is missing; adapter_config.json targets q_proj, v_proj in every "
        "layer of this model (12 tensors)"
    )
    assert load_error(small_model(num_hidden_layers=1), saved) == (
        f"{saved}/adapter_model.safetensors: unexpected tensor(s) ['base_model.model.model."
        "layers.1.self_attn.q_proj.lora_A.weight', 'base_model.model.model.layers.1.self_attn."
        "q_proj.lora_B.weight', 'base_model.model.model.layers.1.self_attn.v_proj.lora_A."
        "weight'] ...; this model with adapter_config.json's target_modules expects 4 tensors "
        "(an adapter for another model?)"
    )


def test_load_missing_files(saved, tmp_path):
    assert load_error(small_model(), tmp_path / "nope") == (
        f"{tmp_path}/nope: no such adapter folder (expected adapter_config.json and "
        "adapter_model.safetensors inside)"
    )
    (saved / "adapter_model.safetensors").unlink()
    assert load_error(small_model(), saved) == (
        f"{saved}/adapter_model.safetensors: missing; an adapter folder holds "
        "adapter_config.json and adapter_model.safetensors (from save_adapter or PEFT's "
        "save_pretrained)"
    )
    (saved / "adapter_config.json").unlink()
    assert load_error(small_model(), saved).startswith(f"{saved}/adapter_config.json: missing;")


@pytest.mark.parametrize("fields, why", [
    ({"peft_type": "IA3"}, "'peft_type' is 'IA3', expected 'LORA' (only LoRA adapters load "
                           "into qwen-min)"),
    ({"bias": "lora_only"}, "'bias' is 'lora_only'; only 'none' is supported (no trained biases)"),
    ({"target_modules": "q_proj|v_proj"}, "'target_modules' is 'q_proj|v_proj', expected a list "
     "of names from ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
     "'down_proj']"),
    ({"r": 0}, "'r' is 0, expected a positive integer"),
] + [
    ({field: value}, f"'{field}' is {value!r}; qwen-min loads plain LoRA only, so it must be "
                     "unset, false or empty (save the adapter without this option)")
    for field, value in [("use_dora", True), ("fan_in_fan_out", True), ("use_rslora", True),
                         ("rank_pattern", {"q_proj": 2}), ("alpha_pattern", {"v_proj": 4}),
                         ("layers_to_transform", [0]), ("modules_to_save", ["lm_head"])]
])
def test_load_rejects_other_peft_options(saved, fields, why):
    edit_config(saved, **fields)
    model = small_model()
    assert load_error(model, saved) == f"{saved}/adapter_config.json: {why}"
    assert not lora_layers(model)  # nothing was applied


def test_load_into_a_merged_adapter_is_refused(saved):
    model = small_model()
    apply_lora(model, rank=4, alpha=8)
    merge_lora(model)
    assert load_error(model, saved) == (
        f"{saved}: the model's LoRA adapter is merged; call unmerge_lora(model) before loading "
        "another one"
    )
