"""Qwen2.5-Instruct's chat format (ChatML), and a streaming decoder that never splits a character.

ChatML writes every message between two special tokens, its role on the first line:

    <|im_start|>system
    You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello! How can I help?<|im_end|>

A conversation without a system message gets the default one above, and the prompt ends with
`<|im_start|>assistant\\n`: the model writes its answer and then `<|im_end|>`. This is the
official template of Qwen2.5-Instruct (tokenizer_config.json's `chat_template`) for plain
messages, tools aside; tests/test_chat.py checks the tokens against transformers rendering it.

Special-token text inside a message (a user who types `<|im_end|>`) becomes the special token,
exactly as transformers' `apply_chat_template` tokenizes it, and so as the Instruct model was
served: the rendered text is tokenized as a whole. It ends the message early; the user is the
only author of a local chat, so there is nobody to inject. Write `< |im_end| >` to talk about it.

Streaming: Qwen2's byte-level BPE can split one UTF-8 character (an emoji, most Chinese
characters) across tokens, so each token is turned back into its bytes and an incremental
UTF-8 decoder lets out only whole characters.
"""

from __future__ import annotations

import codecs
import functools

from tokenizers import Tokenizer

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ASSISTANT_PROMPT = f"{IM_START}assistant\n"  # what the model answers after


def message(role: str, content: str) -> str:
    """One message as ChatML text, with the newline that follows it."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The whole conversation as text: messages [{'role': …, 'content': …}, …], the default
    system message first when the first is not a system message."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text = "".join(message(m["role"], m["content"]) for m in messages)
    return text + (ASSISTANT_PROMPT if add_generation_prompt else "")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """ChatML text → token ids, special-token text included (no BOS: Qwen2 has none)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


@functools.cache
def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each of
    the 256 bytes in a token's text → that byte. Printable bytes stand for themselves; the
    others (control bytes, space, …) are shifted to 256 + n, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


class StreamDecoder:
    """`push(token_id)` → the text that token completes (often '', mid-character); `flush()` at
    the end. The pieces concatenate to `tokenizer.decode(ids)` (special tokens skipped; an
    unfinished character at the end becomes U+FFFD, as there)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.added = tokenizer.get_added_tokens_decoder()  # id → AddedToken
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        added = self.added.get(token_id)
        if added is not None:  # written as it is, not in the byte alphabet; specials skipped
            return b"" if added.special else added.content.encode()
        text = self.tokenizer.id_to_token(token_id)  # None: an id past the vocabulary
        return bytes(byte_of_char()[c] for c in text) if text is not None else b""

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
