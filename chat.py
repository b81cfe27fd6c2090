"""Talk to the model: Qwen2.5-Instruct's chat format, the answer streamed, the KV cache kept.

    make chat                                          # interactive (MODEL= as for make train)
    python chat.py --model PATH --prompt "Hi" --greedy  # one answer, then exit
    echo "Hi" | python chat.py --model PATH             # stdin, when it is not a terminal

Interactive: a `>>> ` prompt line, the answer streamed as it is written, the history kept;
`/reset` forgets it, Ctrl-D ends. Piped stdin is read whole, as one message.

Each turn prefills only its new tokens: the cache already holds the conversation so far, the
model's own replies included (the ids it wrote, not their text re-tokenized). When the next turn
would not fit in --max-context (the cache's size), the oldest turns go, the system message
stays, and one line says so; the cache is then rewound to where the conversations differ (just
after the system message) and the rest prefilled again, at its new positions.

Sampling as the model card ships it: temperature, top_p, top_k and repetition_penalty from the
model folder's generation_config.json, else Qwen2.5-0.5B-Instruct's own values (FALLBACK_SAMPLING);
each flag overrides its setting; --greedy picks the most likely token (the repetition penalty
still applies, as in transformers' generate with do_sample=False). The answer stops at
<|im_end|> or <|endoftext|>, or after --max-new-tokens. Decoding runs qwen_min/generate.py's
prefill and decode_step, batch 1; tokens/s go to stderr after each answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qwen_min import CheckpointError, KVCache, load_model, load_tokenizer
from qwen_min.chatml import (
    ASSISTANT_PROMPT,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    IM_END,
    StreamDecoder,
    encode,
    message,
)
from qwen_min.generate import (
    cache_dtype,
    decode_step,
    prefill,
    repetition_penalty,
    sample_tokens,
    stream_keys,
    top_k,
)
from qwen_min.loading import DEFAULT_MODEL, resolve_checkpoint
from qwen_min.runtime import autocast, pick_device, pick_dtype

DEFAULTS = dict(model=DEFAULT_MODEL, prompt=None, system=None, greedy=False, temperature=None,
                top_p=None, top_k=None, repetition_penalty=None, max_new_tokens=512,
                max_context=4096, seed=None, device="auto", dtype="auto")
# without generation_config.json (or a field of it): Qwen2.5-0.5B-Instruct's generation_config.json
FALLBACK_SAMPLING = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)
SMALLEST_QWEN25_HIDDEN = 896  # Qwen2.5-0.5B; anything narrower is a toy (make demo's model)


class ChatError(RuntimeError):
    """A setting or input chat.py cannot use; the message names it and says what to do."""


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    greedy: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.set_defaults(**DEFAULTS)
    p.add_argument("--model", help="local checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--prompt", help="one message: print the answer and exit")
    p.add_argument("--system", help=f"the system message (default: {DEFAULT_SYSTEM!r})")
    p.add_argument("--greedy", action="store_true", help="the most likely token, no sampling")
    p.add_argument("--temperature", type=float, help="overrides generation_config.json's")
    p.add_argument("--top-p", type=float, help="overrides generation_config.json's top_p")
    p.add_argument("--top-k", type=int, help="overrides generation_config.json's (0: off)")
    p.add_argument("--repetition-penalty", type=float, help="overrides generation_config.json's "
                   "(1: off)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: %(default)s)")
    p.add_argument("--max-context", type=int, help="tokens the conversation may hold (the KV "
                   "cache's size); the oldest turns go beyond it (default: %(default)s)")
    p.add_argument("--seed", type=int, help="sampling seed (default: a random one)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto: bf16 where fast")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.max_context < 2:
        p.exit(2, "chat.py: error: --max-new-tokens must be ≥ 1 and --max-context ≥ 2\n")
    return args


def read_generation_config(folder: Path) -> dict:
    """The sampling fields of folder/generation_config.json ({} without the file); do_sample
    false means greedy."""
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"{path}: cannot be read as JSON ({e}); fix or delete it") from None
    if not isinstance(config, dict):
        raise ChatError(f"{path}: expected a JSON object of generation settings, got "
                        f"{type(config).__name__}; fix or delete it")
    found = {k: config[k] for k in FALLBACK_SAMPLING if config.get(k) is not None}
    if config.get("do_sample") is False:
        found["greedy"] = True
    return found


def sampling_settings(args: argparse.Namespace, folder: Path) -> Sampling:
    """Fallback ← generation_config.json ← flags, each setting on its own."""
    flags = {k: getattr(args, k) for k in FALLBACK_SAMPLING if getattr(args, k) is not None}
    from_file = {k: v for k, v in read_generation_config(folder).items() if k not in flags}
    for key, value in from_file.items():
        if key != "greedy" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ChatError(f"{folder / 'generation_config.json'}: {key}: expected a number, "
                            f"got {value!r}; fix it, or override it with "
                            f"--{key.replace('_', '-')}")
    settings = Sampling(**(FALLBACK_SAMPLING | from_file | flags))
    settings = replace(settings, top_k=int(settings.top_k), greedy=settings.greedy or args.greedy)
    if not settings.temperature > 0 or not 0 < settings.top_p <= 1:
        raise ChatError(f"temperature must be > 0 and top_p in (0, 1], got "
                        f"{settings.temperature} and {settings.top_p}; use --greedy for no "
                        "sampling")
    if not settings.repetition_penalty > 0:
        raise ChatError(f"repetition_penalty must be > 0 (1: off), got "
                        f"{settings.repetition_penalty}")
    return settings


class Chat:
    """One conversation in one KV cache (batch 1, `max_context` positions).

    `turns` are the finished exchanges, as ids: the user's message, the assistant's prompt, its
    reply and the <|im_end|>\\n that closes it. `cached` are the ids the cache holds, in order.
    A new turn's ids = system + turns + the new message; the cache is rewound to where they
    stop agreeing with `cached`, and only the rest is prefilled."""

    def __init__(self, model, tokenizer, sampling: Sampling, system: str | None,
                 max_context: int, max_new_tokens: int, seed: int, device: torch.device):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.cache = KVCache(model.cfg, 1, max_context, cache_dtype(model, device), device)
        self.mask = torch.ones(1, max_context, dtype=torch.long, device=device)
        self.system = encode(tokenizer, message("system", DEFAULT_SYSTEM if system is None
                                                else system))
        self.close = encode(tokenizer, f"{IM_END}\n")  # after each reply
        self.stop = {tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)}
        self.turns: list[list[int]] = []
        self.cached: list[int] = []
        self.seed, self.answers = seed, 0
        self.device = device
        self.stats = (0, 0.0, 0, 0.0)  # the last answer: prefilled, seconds, written, seconds

    def reset(self) -> None:
        self.turns = []  # the cache keeps the system message; the next turn rewinds past it

    def fit(self, prompt: list[int]) -> list[int]:
        """The conversation's ids with `prompt` as its last turn, the oldest turns dropped
        until it and a full answer fit in the cache."""
        least = len(self.system) + len(prompt)
        if least >= self.max_context:  # before any turn goes: the history stays as it was
            raise ChatError(f"this message and the system message take {least} tokens, "
                            f"the context holds {self.max_context}: write less, or raise "
                            "--max-context")
        dropped = 0
        while self.turns and (least + sum(map(len, self.turns)) + self.max_new_tokens
                              > self.max_context):
            self.turns.pop(0)
            dropped += 1
        ids = self.system + [t for turn in self.turns for t in turn] + prompt
        if dropped:
            print(f"[the conversation outgrew {self.max_context} tokens: dropped the oldest "
                  f"{dropped} turn{'s' * (dropped > 1)}, kept the system message]",
                  file=sys.stderr)
        return ids

    def choose(self, logits: torch.Tensor, seen: list[int], step: int) -> int:
        """The next token from (1, V) logits: penalty, then argmax or top-k, top-p sampling."""
        s = self.sampling
        scores = repetition_penalty(logits.float(), torch.tensor([seen], device=self.device),
                                    s.repetition_penalty)
        if s.greedy:
            return int(scores.argmax(-1))
        # the answer's number as the "sample" of the noise stream: no two answers alike
        keys = stream_keys(torch.tensor([self.seed]), torch.tensor([self.answers]), step)
        ids = torch.arange(scores.shape[1], device=self.device)
        return int(sample_tokens(top_k(scores, s.top_k), keys.to(self.device), ids,
                                 s.temperature, s.top_p))

    @torch.no_grad()
    def answer(self, text: str) -> Iterator[int]:
        """The reply to `text`, token by token, as the model writes them."""
        prompt = encode(self.tokenizer, message("user", text) + ASSISTANT_PROMPT)
        ids = self.fit(prompt)
        keep = 0  # the cached prefix this conversation still starts with, less ≥ 1 token:
        while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
            keep += 1  # the prefill's last position gives the first answer token's logits
        self.cache.rewind(keep)
        room = min(self.max_new_tokens, self.max_context - len(ids))
        began = time.perf_counter()
        logits = prefill(self.model, torch.tensor([ids[keep:]], device=self.device),
                         self.mask[:, : len(ids)], self.cache, 1)
        self.cached = list(ids)
        prefilled, began, reply = time.perf_counter() - began, time.perf_counter(), []
        for step in range(room):
            token = self.choose(logits, self.cached, step)
            if token in self.stop:
                break
            reply.append(token)
            yield token
            if step + 1 < room:
                last = torch.tensor([token], device=self.device)
                logits = decode_step(self.model, last, self.mask[:, : len(self.cached) + 1],
                                     self.cache)
                self.cached.append(token)
        self.turns.append(prompt + reply + self.close)
        self.answers += 1
        self.stats = (len(ids) - keep, prefilled, len(reply), time.perf_counter() - began)


def say(chat: Chat, text: str, dtype: torch.dtype) -> None:
    """Stream the answer to stdout, whole characters only; its speed to stderr."""
    stream = StreamDecoder(chat.tokenizer)
    with autocast(chat.device, dtype):
        for token in chat.answer(text):
            print(stream.push(token), end="", flush=True)
    print(stream.flush(), flush=True)
    prefilled, prefill_s, written, decode_s = chat.stats
    print(f"[{written} tokens, {written / max(decode_s, 1e-9):.1f} tokens/s; prefill "
          f"{prefilled} tokens in {prefill_s:.2f} s]", file=sys.stderr)


def interact(chat: Chat, dtype: torch.dtype) -> None:
    """The prompt line, until Ctrl-D."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("chat with the model: /reset forgets the conversation, Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip() == "/reset":
            chat.reset()
            print("[conversation forgotten]", file=sys.stderr)
        elif text.strip():
            try:
                say(chat, text, dtype)
            except ChatError as e:  # a message too long for the context: the chat goes on
                print(f"error: {e}", file=sys.stderr)


def load(args: argparse.Namespace) -> tuple[Chat, torch.dtype]:
    folder = resolve_checkpoint(args.model)
    sampling = sampling_settings(args, folder)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = load_tokenizer(folder)
    cfg = model.cfg
    if cfg.hidden_size < SMALLEST_QWEN25_HIDDEN:
        print(f"note: {folder} is a tiny model (hidden {cfg.hidden_size}, "
              f"{cfg.num_hidden_layers} layers), not Qwen2.5-0.5B-Instruct: a random-weight model "
              "writes noise, often one token over and over (--temperature 2 --top-k 0 shows more "
              "of it); the format, the streaming and the cache work all the same",
              file=sys.stderr)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()))
    return Chat(model, tokenizer, sampling, args.system, args.max_context,
                args.max_new_tokens, seed, device), dtype


def read_stdin() -> str:
    """Piped input, read whole as one message."""
    try:
        return sys.stdin.buffer.read().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ChatError(f"stdin is not UTF-8 text ({e}); pipe in UTF-8, or use --prompt") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        chat, dtype = load(args)
        if args.prompt is not None:
            say(chat, args.prompt, dtype)
        elif not sys.stdin.isatty():
            say(chat, read_stdin(), dtype)
        else:
            interact(chat, dtype)
    except (CheckpointError, ChatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
