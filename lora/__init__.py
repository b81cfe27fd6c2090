"""LoRA adapters for qwen_min, saved and loaded in PEFT's file format.

The layer itself is `qwen_min.model.LoRALinear` (LoRA lives in the model code, next to its
FLOP rules). This package puts it on a model (`apply_lora`), decides what trains
(`mark_only_lora_trainable`, `lora_parameters`), merges it for inference, and moves adapters
to and from disk in the layout of PEFT's `save_pretrained` / `PeftModel.from_pretrained`:

    adapter/
      adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 8,
                                   "target_modules": ["q_proj", "v_proj"], ...}
      adapter_model.safetensors   "base_model.model." + our parameter name + ".weight", e.g.
                                  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
      qwen_min.json               this project's metadata (data scaling, training config,
                                  the base model's identity); PEFT ignores it

Our module names are the checkpoint keys, so PEFT's keys are ours with a fixed prefix and
suffix: no key table. An adapter saved here loads in PEFT on transformers' Qwen2, and one
saved by PEFT for Qwen2 loads here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from qwen_min.model import Linear, LoRALinear
from qwen_min.runtime import atomic_write_bytes, atomic_write_text

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "qwen_min.json"
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → our Qwen2ForCausalLM
# the base tensors fingerprinted: never LoRA targets, so a merged adapter leaves them as they are
IDENTITY_TENSORS = ("model.embed_tokens.weight", "model.norm.weight")
FINGERPRINT_VALUES = 4096  # evenly spaced values of each, enough to tell two trainings apart

# adapter_config.json fields that we read, or that do not change what the adapter computes
# (bookkeeping, initialisation schemes). Any other field must be unset, false or empty.
HARMLESS_FIELDS = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
}


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded into this model; the message says why."""


class LoraSpec(NamedTuple):
    """What an adapter is: the same r, alpha and dropout on `targets` in every layer."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # in TARGETS order
    dropout: float


# ----------------------------------------------------------------------------- apply / train


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
) -> int:
    """Replace `targets` in every layer by LoRALinear, freeze the rest; return #trainable.

    alpha defaults to `rank`, a scale alpha/r of 1, as in the coursework's LoRA skeleton: the
    update B·A is then added as it is, and changing r alone does not rescale it. (PEFT's
    default is lora_alpha = 8 whatever r.) The value is saved, so any alpha round-trips.
    Rank 8 on q_proj/v_proj of Qwen2.5-0.5B trains 24·8·((896+896) + (896+128)) = 540,672.
    """
    targets = _check_targets(targets)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if layers := lora_layers(model):
        raise ValueError(
            f"the model already has a LoRA adapter ({_describe(adapter_spec(layers))}); "
            "apply_lora once per model: load a fresh model for a different adapter"
        )
    alpha = rank if alpha is None else alpha
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if attr in targets and isinstance(module, Linear):
            setattr(model.get_submodule(parent), attr, LoRALinear(module, rank, alpha, dropout))
    return mark_only_lora_trainable(model)


def mark_only_lora_trainable(model: nn.Module) -> int:
    """requires_grad on the LoRA A/B tensors only; return how many numbers train."""
    lora = set(lora_parameters(model).values())
    for p in model.parameters():
        p.requires_grad_(p in lora)
    return sum(p.numel() for p in lora)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's tensors by name ('model.layers.0.self_attn.q_proj.lora_A', ...), nothing
    else: what the optimizer updates and what save_adapter writes."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every ΔW into its base weight: inference then costs what the base model costs."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore the base weights exactly (training needs the adapter unmerged)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def adapter_spec(layers: dict[str, LoRALinear]) -> LoraSpec:
    """The LoraSpec of an applied adapter; one r/alpha/dropout everywhere, as PEFT saves it."""
    dropouts = {m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
                for m in layers.values()}
    ranks, alphas = {m.rank for m in layers.values()}, {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1 or len(dropouts) > 1:
        raise ValueError(f"LoRA layers differ in rank {ranks}, alpha {alphas} or dropout "
                         f"{dropouts}; an adapter file holds one of each (use apply_lora)")
    names = {name.rpartition(".")[2] for name in layers}
    return LoraSpec(ranks.pop(), alphas.pop(), tuple(t for t in TARGETS if t in names),
                    dropouts.pop())


# ----------------------------------------------------------------------------- base model


def base_model_identity(model: nn.Module, name_or_path: str) -> dict:
    """What an adapter was trained on: the base's name, a SHA-256 of its config (without
    torch_dtype, a storage choice) and one of a few thousand of its weights, rounded to bf16
    first, so that the same base loaded in bf16 or fp32 has the same fingerprint. Two bases of
    one shape (Qwen2.5-0.5B and its Instruct version) share the config, not the weights."""
    config = {k: v for k, v in asdict(model.cfg).items() if k != "torch_dtype"}
    weights = hashlib.sha256()
    parameters = dict(model.named_parameters())
    for name in IDENTITY_TENSORS:
        flat = parameters[name].detach().flatten()
        some = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]
        weights.update(some.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {
        "name_or_path": str(name_or_path),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def base_model_mismatch(model: nn.Module, recorded: dict) -> str | None:
    """How `model` differs from the base identity an adapter recorded (base_model_identity),
    as a clause for a message; None when it is the same base."""
    mine = base_model_identity(model, "")
    if recorded.get("config_sha256") != mine["config_sha256"]:
        return "its config.json differs from the one recorded (config_sha256)"
    if recorded.get("weights_sha256") != mine["weights_sha256"]:
        return "its weights differ from those recorded (weights_sha256)"
    return None


# ----------------------------------------------------------------------------- save


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str,
    metadata: dict | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and qwen_min.json (`metadata`, {}
    when None, plus "base_model": base_model_identity) to `out_dir`, each file atomically. A
    merged model saves the same A and B: they are separate tensors, merge only changes the
    base weights. base_model_name_or_path goes to adapter_config.json too, where PEFT's
    PeftModel.from_pretrained looks for the base."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter to save; call apply_lora first")
    spec = adapter_spec(layers)
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": alpha,
        "target_modules": list(spec.targets), "lora_dropout": spec.dropout, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
    }
    tensors = {PEFT_PREFIX + name + ".weight": p.detach().to("cpu", copy=True).contiguous()
               for name, p in lora_parameters(model).items()}
    # serialise before writing anything: metadata that is not JSON leaves the folder as it was
    config_text = json.dumps(config, indent=2) + "\n"
    identity = base_model_identity(model, base_model_name_or_path)
    metadata_text = json.dumps((metadata or {}) | {"base_model": identity}, indent=2) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, {"format": "pt"}))
    atomic_write_text(out / METADATA_FILE, metadata_text)
    atomic_write_text(out / CONFIG_FILE, config_text)
    return out


# ----------------------------------------------------------------------------- load


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Load a PEFT-format LoRA adapter into `model` and return its qwen_min.json metadata
    ({} when absent, e.g. an adapter from PEFT).

    A model without an adapter gets one with the file's r/alpha/targets/dropout; a model
    that has one (e.g. from apply_lora) must match it in r, alpha and targets. Every check
    runs before the model is touched, so a bad folder raises AdapterError and changes nothing.
    """
    folder = Path(adapter_dir)
    metadata = read_adapter_metadata(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    spec = read_adapter_config(config_path)
    tensors = _read_tensors(weights_path)

    if layers := lora_layers(model):
        have = adapter_spec(layers)
        for field, want, got in (("r", spec.rank, have.rank), ("lora_alpha", spec.alpha,
                                 have.alpha), ("target_modules", spec.targets, have.targets)):
            if want != got:
                raise AdapterError(
                    f"{config_path}: {field} is {_show(want)} but the model's LoRA adapter has "
                    f"{_show(got)}; load it into a model without an adapter (load_adapter "
                    "then applies the file's own)"
                )
        if any(m.merged for m in layers.values()):
            raise AdapterError(f"{folder}: the model's LoRA adapter is merged; call "
                               "unmerge_lora(model) before loading another one")

    expected = {}  # PEFT key → shape, from the model's own projection sizes
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in spec.targets and isinstance(m, Linear):
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (spec.rank, m.in_features)
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, spec.rank)
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterError(
                f"{weights_path}: tensor '{key}' is missing; {CONFIG_FILE} targets "
                f"{_show(spec.targets)} in every layer of this model ({len(expected)} tensors)"
            )
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(
                f"{weights_path}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                f"expected {shape} (r = {spec.rank} on this model's layer); "
                "was the adapter trained on another model or edited?"
            )
    if unexpected := sorted(set(tensors) - set(expected)):
        raise AdapterError(
            f"{weights_path}: unexpected tensor(s) {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}; this model with {CONFIG_FILE}'s "
            f"target_modules expects {len(expected)} tensors (an adapter for another model?)"
        )

    if not layers:
        apply_lora(model, spec.rank, spec.alpha, spec.targets, spec.dropout)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.copy_(tensors[PEFT_PREFIX + name + ".weight"])
    return metadata


def read_adapter_config(path: str | Path) -> LoraSpec:
    """adapter_config.json → LoraSpec, refusing anything but plain LoRA on Qwen2 projections."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(_missing(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

    def reject(field: str, why: str):
        raise AdapterError(f"{path}: '{field}' {why}")

    if cfg.get("peft_type") != "LORA":
        reject("peft_type", f"is {cfg.get('peft_type')!r}, expected 'LORA' (only LoRA adapters "
                            "load into qwen-min)")
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        reject("task_type", f"is {cfg['task_type']!r}, expected 'CAUSAL_LM'")
    if cfg.get("bias", "none") != "none":
        reject("bias", f"is {cfg['bias']!r}; only 'none' is supported (no trained biases)")
    for field, value in cfg.items():
        if field not in HARMLESS_FIELDS and value:
            reject(field, f"is {value!r}; qwen-min loads plain LoRA only, so it must be unset, "
                          "false or empty (save the adapter without this option)")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)  # 8: PEFT's default lora_alpha
    dropout, targets = cfg.get("lora_dropout", 0.0), cfg.get("target_modules")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        reject("r", f"is {rank!r}, expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        reject("lora_alpha", f"is {alpha!r}, expected a number")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        reject("lora_dropout", f"is {dropout!r}, expected a number in [0, 1)")
    if not isinstance(targets, list) or not targets or not set(targets) <= set(TARGETS):
        reject("target_modules", f"is {targets!r}, expected a list of names from {list(TARGETS)}")
    return LoraSpec(rank, alpha, tuple(t for t in TARGETS if t in targets), float(dropout))


def read_adapter_metadata(adapter_dir: str | Path) -> dict:
    """qwen_min.json of an adapter folder as a dict; {} when the folder has none (PEFT's)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder (expected {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE} inside)")
    path = folder / METADATA_FILE
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise AdapterError(_missing(path))
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None


# ----------------------------------------------------------------------------- helpers


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"LoRA targets {list(names)}: expected one or more of {list(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def _missing(path: Path) -> str:
    return (f"{path}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(from save_adapter or PEFT's save_pretrained)")


def _show(value) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value)


def _describe(spec: LoraSpec) -> str:
    return f"r = {spec.rank}, alpha = {spec.alpha} on {_show(spec.targets)}"


__all__ = [
    "AdapterError", "LoraSpec", "TARGETS", "adapter_spec", "apply_lora", "base_model_identity",
    "base_model_mismatch", "load_adapter",
    "lora_layers", "lora_parameters", "mark_only_lora_trainable", "merge_lora",
    "read_adapter_config", "read_adapter_metadata", "save_adapter", "unmerge_lora",
]
