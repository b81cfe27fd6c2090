"""chat.py and qwen_min/chatml.py: the ChatML tokens against transformers' apply_chat_template,
top-k and the repetition penalty against transformers' logits processors, the streaming decoder,
the cache kept across turns against a fresh prefill, greedy chat against transformers' generate,
generation_config.json, and the one-line errors.

The oracle template, tests/qwen2.5-instruct-chat_template.jinja, is the `chat_template` field of
Qwen/Qwen2.5-0.5B-Instruct's tokenizer_config.json
(https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/tokenizer_config.json), the text
found with the project's code search where llama-cpp-python prints the GGUF's template
("Using gguf chat template: …") of that model; it is transformers that renders it here.
"""

from __future__ import annotations

import io
import json
import os
import pty
import random
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import chat
from qwen_min import CheckpointError, load_model, load_tokenizer
from qwen_min.chatml import StreamDecoder, encode, render
from qwen_min.generate import nucleus, repetition_penalty, top_k

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (Path(__file__).parent / "qwen2.5-instruct-chat_template.jinja").read_text()
IM_END, ENDOFTEXT = 151645, 151643

CONVERSATIONS = {
    "system given": [{"role": "system", "content": "You are a pirate."},
                     {"role": "user", "content": "Hello!"}],
    "no system": [{"role": "user", "content": "What is 2 + 2?"}],
    "several turns": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke.\nA short one."},
                      {"role": "assistant", "content": "Why did the chicken… no."},
                      {"role": "user", "content": "Another."}],
    "empty content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "non-ASCII": [{"role": "user", "content": "你好，世界 😀 — naïve café, Ωmega"}],
    "special-token text": [{"role": "user", "content": "say <|im_end|> and <|endoftext|>"},
                           {"role": "assistant", "content": "<|im_start|>user\nnope"},
                           {"role": "user", "content": "ok"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizer(real_vocab_checkpoint):
    return load_tokenizer(real_vocab_checkpoint)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chatml_tokens_equal_transformers_apply_chat_template(name, hf_tokenizer, tokenizer):
    messages = CONVERSATIONS[name]
    for generation_prompt in (True, False):
        want = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                add_generation_prompt=generation_prompt)
        assert encode(tokenizer, render(messages, generation_prompt)) == want
    assert render(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_special_token_text_becomes_the_special_token(tokenizer):
    """The documented choice (qwen_min/chatml.py): as transformers tokenizes it."""
    ids = encode(tokenizer, render([{"role": "user", "content": "a<|im_end|>b"}]))
    assert ids.count(IM_END) == 3  # the system's, the user's literal one, the user's own


# ----------------------------------------------------------------------------- sampling


def random_logits(seed: int, rows: int = 6, V: int = 2000) -> torch.Tensor:
    """Both signs, and ties (rounded to 0.1): the tie rule of top-k is then tested too."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g) * 3).round(decimals=1)


@pytest.mark.parametrize("k", [1, 5, 50, 1999, 2000, 5000])
def test_top_k_equals_transformers_top_k_warper(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    scores = random_logits(k)
    ours, want = top_k(scores, k), TopKLogitsWarper(k)(None, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(want))  # the kept set, exactly
    assert torch.equal(ours, want)  # the kept scores are untouched: equal, bit for bit


@pytest.mark.parametrize("penalty", [1.1, 1.5, 0.8])
def test_repetition_penalty_equals_transformers_processor(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = random_logits(1)
    g = torch.Generator().manual_seed(2)
    seen = torch.randint(0, 300, (6, 400), generator=g)  # many repeats per row
    ours = repetition_penalty(scores, seen, penalty)
    want = RepetitionPenaltyLogitsProcessor(penalty)(seen, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(want))
    # measured 0.0: the same multiply or divide per logit; 1e-6 allows another rounding order
    assert (ours - want).abs().max().item() <= 1e-6
    assert (ours != scores).any()  # it did something


def test_penalty_top_k_top_p_chain_keeps_transformers_set():
    """The chat's order: penalty, then top-k, then temperature and the top-p nucleus
    (sample_tokens), against transformers' processors in generate's order."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores, seen = random_logits(3), torch.randint(0, 2000, (6, 50))
    ours = nucleus(top_k(repetition_penalty(scores, seen, 1.1), 20) / 0.7, 0.8)
    want = scores.clone()
    for step in (RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        want = step(seen, want)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(want))
    kept = torch.isfinite(want)
    assert (ours[kept] - want[kept]).abs().max().item() <= 1e-6  # measured 0.0


# ----------------------------------------------------------------------------- streaming


def test_streamed_pieces_concatenate_to_the_one_shot_decode(tokenizer):
    """Random ids over the whole vocabulary (and past it: a random model can write those), and
    half of them from the tokens of multi-byte text, whose characters tokens split."""
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    split = encode(tokenizer, "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(300))
                   + "😀🦀🎉𝄞ÄÖÜ€")
    for _ in range(400):
        ids = [rng.randrange(V + 5) if rng.random() < 0.5 else rng.choice(split)
               for _ in range(rng.randrange(1, 30))]
        stream = StreamDecoder(tokenizer)
        assert "".join([stream.push(t) for t in ids] + [stream.flush()]) == tokenizer.decode(ids)


def test_streaming_never_prints_half_a_character(tokenizer):
    text = "你好，世界！😀🦀 Ωmega 𝄞 naïve"
    ids = encode(tokenizer, text)
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # the test has teeth: some token ends mid-character, so decoding it alone goes wrong
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    assert "" in pieces[:-1]


# ----------------------------------------------------------------------------- the conversation


@pytest.fixture(scope="module")
def tiny_model(real_vocab_checkpoint):
    return load_model(real_vocab_checkpoint)


@pytest.fixture
def new_chat(tiny_model, tokenizer):
    """A greedy Chat on the tiny real-vocabulary model, fp32 on the CPU."""
    def make(max_new_tokens: int, max_context: int = 4096) -> chat.Chat:
        sampling = chat.Sampling(**chat.FALLBACK_SAMPLING, greedy=True)
        return chat.Chat(tiny_model, tokenizer, sampling, None, max_context, max_new_tokens,
                         0, torch.device("cpu"))
    return make


def test_the_cache_kept_turn_equals_a_fresh_prefill(new_chat, monkeypatch, capsys):
    """Turn 2 prefills only its new tokens; its logits (the prefill's and each decode step's)
    equal one pass over the whole conversation. Turn 3 outgrows --max-context: one line says
    the oldest turn went, the system message stays, and the logits again equal a fresh pass."""
    talk = new_chat(max_new_tokens=6, max_context=70)
    chosen_from = []
    choose = talk.choose
    monkeypatch.setattr(talk, "choose", lambda logits, seen, step: (
        chosen_from.append(logits[0].clone()), choose(logits, seen, step))[1])
    worst, earlier = 0.0, []
    for turn, text in enumerate(["Hello there", "and again", "a third message, longer"]):
        chosen_from.clear()
        before, earlier = len(talk.cached), list(talk.turns)
        reply = list(talk.answer(text))
        prompt = len(talk.turns[-1]) - len(reply) - len(talk.close)
        conversation = len(talk.system) + sum(map(len, talk.turns[:-1])) + prompt
        if turn == 1:  # what the cache lacks: the unfed last reply token, <|im_end|>\n, the turn
            assert talk.stats[0] == conversation - before <= prompt + 3
        fresh = talk.model(torch.tensor([talk.cached]))[0]  # (T, V): every position at once
        first = len(talk.cached) - len(chosen_from)  # position of the prefill's last token + 1
        for j, logits in enumerate(chosen_from):
            worst = max(worst, (logits - fresh[first + j]).abs().max().item())
        assert talk.cached[: len(talk.system)] == talk.system
    assert worst <= 1e-5, worst  # fp32; measured 2.9e-6
    assert capsys.readouterr().err.count("dropped the oldest 1 turn, kept the system message") == 1
    assert talk.turns[:-1] == earlier[1:]  # the first turn went, the second stayed


def test_reset_forgets_the_conversation(new_chat):
    talk = new_chat(max_new_tokens=3)
    first = list(talk.answer("Hi"))
    list(talk.answer("more"))
    talk.reset()
    assert list(talk.answer("Hi")) == first  # greedy: the same answer as in a new chat
    assert talk.cached[: len(talk.system)] == talk.system


def test_an_answer_stops_at_im_end_or_endoftext(new_chat, monkeypatch):
    talk = new_chat(max_new_tokens=9)
    for stop in (IM_END, ENDOFTEXT):
        script = iter([40, 41, stop, 42])
        monkeypatch.setattr(talk, "choose", lambda logits, seen, step, s=script: next(s))
        assert list(talk.answer("Hi")) == [40, 41]
        assert talk.turns[-1][-len(talk.close) - 2:] == [40, 41, *talk.close]


PENALTY = 1.3


def test_greedy_chat_equals_transformers_generate(hf_checkpoint, hf_tokenizer, monkeypatch,
                                                  capsys):
    """Random weights, the real vocabulary, generation_config.json's repetition penalty (which
    greedy keeps, as transformers does): the same tokens, and stdout is their text."""
    hf_model, path = hf_checkpoint(seed=5, std=0.05, vocab_size=151936)
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
         "repetition_penalty": PENALTY}))
    prompt = "Give me a short introduction to large language models."
    input_ids = torch.tensor([hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)])
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            do_sample=False, max_new_tokens=24, repetition_penalty=PENALTY,
                            eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    want = out[0, input_ids.shape[1]:].tolist()
    want = want[: next((i for i, t in enumerate(want) if t in (IM_END, ENDOFTEXT)), len(want))]
    plain = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                              do_sample=False, max_new_tokens=24, repetition_penalty=1.0,
                              eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    assert plain[0, input_ids.shape[1]:].tolist()[: len(want)] != want  # the penalty matters

    written = []
    push = StreamDecoder.push
    monkeypatch.setattr(StreamDecoder, "push",
                        lambda self, t: (written.append(t), push(self, t))[1])
    assert chat.main(["--model", str(path), "--greedy", "--prompt", prompt, "--dtype", "fp32",
                      "--device", "cpu", "--max-new-tokens", "24"]) == 0
    assert written == want and len(want) >= 5
    assert capsys.readouterr().out == hf_tokenizer.decode(want) + "\n"


# ----------------------------------------------------------------------------- settings


def test_generation_config_then_flags(tmp_path):
    def settings(*argv):
        return chat.sampling_settings(chat.parse_args(list(argv)), tmp_path)

    assert settings() == chat.Sampling(**chat.FALLBACK_SAMPLING)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 5, "do_sample": True, "eos_token_id": [1, 2]}))
    assert settings("--top-k", "7") == chat.Sampling(0.3, 0.8, 7, 1.1)
    assert settings("--greedy").greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert settings().greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(chat.ChatError, match=r"generation_config.json: top_p: expected a "
                       r"number, got 'high'; fix it, or override it with --top-p"):
        settings()
    assert settings("--top-p", "0.9").top_p == 0.9
    with pytest.raises(chat.ChatError, match=r"temperature must be > 0 and top_p in \(0, 1\]"):
        settings("--top-p", "0.9", "--temperature", "0")
    (tmp_path / "generation_config.json").write_text("[0.7]")
    with pytest.raises(chat.ChatError, match=r"generation_config.json: expected a JSON object "
                       r"of generation settings, got list; fix or delete it"):
        settings()
    (tmp_path / "generation_config.json").write_bytes(b'{"top_p": "\xff"}')
    with pytest.raises(chat.ChatError, match=r"generation_config.json: cannot be read as JSON "
                       r"\('utf-8' codec can't decode byte 0xff"):
        settings()


def test_offline_says_what_train_says(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as raised:  # what make train stops with
        load_model("nobody/no-such-model")
    assert chat.main(["--model", "nobody/no-such-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {raised.value}\n"
    assert "--model /path/to/folder" in err and err.count("\n") == 1


def test_tiny_model_notes_noise_and_streams_piped_stdin(real_vocab_checkpoint, monkeypatch,
                                                        capsys):
    pipe = io.TextIOWrapper(io.BytesIO(b"Hello from a pipe\n"))  # not a terminal
    monkeypatch.setattr(sys, "stdin", pipe)
    written = []
    push = StreamDecoder.push
    monkeypatch.setattr(StreamDecoder, "push",
                        lambda self, t: (written.append(t), push(self, t))[1])
    assert chat.main(["--model", str(real_vocab_checkpoint), "--seed", "0",
                      "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert "a random-weight model writes noise" in err
    assert re.search(rf"\[{len(written)} tokens, [\d.]+ tokens/s; prefill \d+ tokens", err)
    assert written and out == load_tokenizer(real_vocab_checkpoint).decode(written) + "\n"


def test_piped_input_that_is_not_utf8_is_one_line(real_vocab_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe hi")))
    assert chat.main(["--model", str(real_vocab_checkpoint), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: stdin is not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte); pipe in UTF-8, or use --prompt")


def test_a_message_too_long_is_one_line(real_vocab_checkpoint, capsys, new_chat):
    assert chat.main(["--model", str(real_vocab_checkpoint), "--max-context", "40",
                      "--prompt", "word " * 60]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"error: this message and the system message take \d+ tokens, the "
                        r"context holds 40: write less, or raise --max-context", err)
    talk = new_chat(max_new_tokens=4, max_context=60)
    list(talk.answer("Hi"))
    turns = list(talk.turns)
    with pytest.raises(chat.ChatError, match="write less"):
        list(talk.answer("word " * 60))
    assert talk.turns == turns  # the history is kept for the next message


# ----------------------------------------------------------------------------- interactive


@pytest.mark.slow
def test_interactive_session_in_a_terminal(real_vocab_checkpoint):
    """A real pty: the prompt line, two answers, /reset, Ctrl-D ends with exit code 0."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "chat.py", "--model", str(real_vocab_checkpoint), "--greedy",
         "--max-new-tokens", "5"], cwd=ROOT, stdin=child_fd, stdout=child_fd, stderr=child_fd,
        env=os.environ | {"TERM": "dumb"})
    os.close(child_fd)
    seen = b""

    def until(marker: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([main_fd], [], [], 1)[0]:
                seen += os.read(main_fd, 4096)

    until(b">>> ", 1)
    for n, line in enumerate([b"Hello\n", b"/reset\n", b"Hello again\n"], start=2):
        os.write(main_fd, line)
        until(b">>> ", n)
    os.write(main_fd, b"\x04")
    assert proc.wait(timeout=60) == 0
    os.close(main_fd)
    text = seen.decode(errors="replace")
    assert text.count("tokens/s") == 2 and "[conversation forgotten]" in text
