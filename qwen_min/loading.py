"""Load a Hugging Face Qwen2 checkpoint (config.json + safetensors) into qwen_min's model.

The model's module names are the checkpoint keys, so loading is: build the model on the
meta device (no random init), read every tensor once, check the key set and every shape,
then assign the tensors in place of the meta parameters.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from .fast import use_fast_paths
from .generate import QWEN2_EOS_ID
from .model import Qwen2Config, Qwen2ForCausalLM

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# what a snapshot download fetches: the weights, the configs and the tokenizer, nothing else
SNAPSHOT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "generation_config.json"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or loaded; the message says what to do."""


class ConfigError(ValueError):
    """config.json asks for something this implementation does not do."""


def config_from_dict(d: dict, source: str = "config.json") -> Qwen2Config:
    """Read both config.json forms: the official one (top-level `rope_theta`, `torch_dtype`)
    and transformers ≥ 5 (`rope_parameters`, `dtype`, `layer_types`); reject what plain Qwen2
    (qwen_min.model) does not compute."""

    def reject(field: str, why: str):
        raise ConfigError(f"{source}: {field}: {why}; qwen-min implements plain Qwen2 only")

    if d.get("model_type") != "qwen2":
        reject("model_type", f"expected 'qwen2', got {d.get('model_type')!r}")
    if d.get("use_sliding_window"):
        reject("use_sliding_window", "sliding-window attention is not supported")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        reject("layer_types", f"expected only 'full_attention', got {d['layer_types']}")
    if d.get("hidden_act", "silu") != "silu":
        reject("hidden_act", f"expected 'silu', got {d['hidden_act']!r}")
    if d.get("attention_dropout", 0.0):
        reject("attention_dropout", f"expected 0.0, got {d['attention_dropout']}")
    rope = dict(d.get("rope_parameters") or {})
    rope.update(d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        reject("rope_scaling", f"rope type {rope_type!r} is not implemented (only 'default')")
    kw = {f.name: d[f.name] for f in fields(Qwen2Config) if f.name in d}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kw["torch_dtype"] = d.get("dtype") or d.get("torch_dtype") or "float32"
    cfg = Qwen2Config(**kw)
    if cfg.hidden_size % cfg.num_attention_heads or cfg.n_rep * cfg.num_key_value_heads != (
        cfg.num_attention_heads
    ):
        reject("num_attention_heads", "must divide hidden_size and be a multiple of KV heads")
    if d.get("head_dim") not in (None, cfg.head_dim):
        reject("head_dim", f"expected hidden_size/num_attention_heads = {cfg.head_dim}")
    return cfg


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as it is, or a hub repo id downloaded with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(
            f"{name}: not a checkpoint directory (expected a folder with config.json and "
            "*.safetensors) and not a hub repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=SNAPSHOT_FILES))
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise CheckpointError(
            f"could not download '{name}' from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). "
            "Point at a local copy instead: --model /path/to/folder (a folder with config.json, "
            "*.safetensors and tokenizer.json, e.g. from `huggingface-cli download "
            f"{name}` on a machine with network), or run `make demo` for an offline tiny model."
        ) from None


def load_config(ckpt: Path) -> Qwen2Config:
    path = ckpt / "config.json"
    try:
        return config_from_dict(json.loads(path.read_text()), source=str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({e})") from None
        return [ckpt / f for f in sorted(set(weight_map.values()))]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no *.safetensors weights found")
    return files


def read_state_dict(ckpt: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded checkpoint; a key found twice is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(ckpt):
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key in tensors:
                        raise CheckpointError(f"{file}: tensor '{key}' appears in two files")
                    tensors[key] = f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{file}: unreadable safetensors file, truncated or corrupt ({e}); "
                "download it again"
            ) from None
    return tensors


@contextmanager
def no_embedding_init():
    """Skip nn.Embedding's random init while the model is built on the meta device: the checkpoint
    replaces it anyway, and torch's meta-device `normal_` imports torch._dynamo, which costs
    2–4 s in every process that loads a model (each train/evaluate subprocess of a sweep)."""
    reset = torch.nn.Embedding.reset_parameters
    torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Embedding.reset_parameters = reset


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Qwen2ForCausalLM:
    """Build Qwen2ForCausalLM from a local folder or hub repo id, with strict key/shape checks,
    and with qwen_min.fast's fast paths swapped in."""
    ckpt = resolve_checkpoint(name_or_path)
    cfg = load_config(ckpt)
    with torch.device("meta"), no_embedding_init():
        model = Qwen2ForCausalLM(cfg)
    expected = dict(model.named_parameters())  # shared (tied) parameters are listed once
    tensors = read_state_dict(ckpt, dtype, device)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
    for key, param in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{ckpt}: tensor '{key}' is missing from the checkpoint")
        if tensors[key].shape != param.shape:
            raise CheckpointError(
                f"{ckpt}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected tensor(s) {unexpected[:5]} (not a Qwen2 model?)")
    model.load_state_dict(tensors, strict=False, assign=True)  # checked above, key by key
    model.tie_weights()
    return use_fast_paths(model).eval()


def load_tokenizer(name_or_path: str | Path = DEFAULT_MODEL) -> Tokenizer:
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (no transformers needed),
    checked to be Qwen2's (check_qwen2_tokenizer)."""
    path = resolve_checkpoint(name_or_path) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the checkpoint folder needs tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None
    check_qwen2_tokenizer(tokenizer, path)
    return tokenizer


LLMTIME_PROBE = "1.23,4.56;78.90,0.05;"  # LLMTIME text: one token per character in Qwen2


def check_qwen2_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """CheckpointError unless the tokenizer does what LLMTIME relies on in Qwen2's: one token per
    digit and per '.', ',' and ';' between digits, and <|endoftext|> (the padding and end
    token) at id 151643."""
    n = len(tokenizer.encode(LLMTIME_PROBE, add_special_tokens=False).ids)
    eos = tokenizer.token_to_id("<|endoftext|>")
    if n != len(LLMTIME_PROBE):
        why = f"it writes {LLMTIME_PROBE!r} as {n} tokens, expected {len(LLMTIME_PROBE)}"
    elif eos != QWEN2_EOS_ID:
        why = f"its <|endoftext|> is id {eos}, expected {QWEN2_EOS_ID}"
    else:
        return
    raise CheckpointError(
        f"{path}: not Qwen2's tokenizer ({why}); LLMTIME needs one token per digit and "
        "separator: put the tokenizer.json of Qwen/Qwen2.5-0.5B-Instruct in that folder"
    )
