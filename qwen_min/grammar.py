"""The LLMTIME grammar as a state machine over token ids, used as a logit mask in generate().

A forecast is `int.frac,int.frac;` repeated: two values per time step, ',' between them, ';'
after the step. `frac` has exactly `decimals` digits (no '.' and no frac when decimals = 0);
`int` has 1 to `max_int_digits` digits, so values that scale past 9.99 (data.LLMTimeScaler
writes "12.34") can still be written. Qwen2 writes one token per digit and separator, so the
grammar reads one character per token.

States, for decimals = 2 and max_int_digits = 3 (value 0 of a step, then the same for value 1
with ';' instead of ','):

    int0 -digit-> int1 -digit-> int2 -digit-> int3
                   |             |             |
                   '.'-----------'.'-----------'.'--> frac0 -digit-> frac1 -digit-> frac2 -','->

Every other token (letters, spaces, end-of-text, ...) is never allowed. On the device the
machine is three small tables, so a batch advances with two gathers and no loop over rows:
`token_class` (V,) maps each id to digit / '.' / ',' / ';' / other, `next_state` (S, 5) says
where each class leads (−1: not allowed), and `allowed` (S, V) is the mask itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QWEN2_DIGIT_IDS = tuple(range(15, 25))  # '0'..'9'
QWEN2_DOT_ID, QWEN2_COMMA_ID, QWEN2_SEMICOLON_ID = 13, 11, 26

DIGIT, DOT, COMMA, SEMICOLON, OTHER = range(5)  # token classes: the columns of next_state
NOT_ALLOWED = -1


@dataclass(frozen=True)
class GrammarTables:
    """The grammar on one device for one vocabulary size; one state per batch row."""

    allowed: torch.Tensor  # (S, V) bool: token allowed in state
    next_state: torch.Tensor  # (S, 5) long: state after a token of each class, −1 not allowed
    token_class: torch.Tensor  # (V,) long: DIGIT, DOT, COMMA, SEMICOLON or OTHER
    token_ids: torch.Tensor  # (C,) long: the ids some state allows (LLMTimeGrammar.token_ids)

    def start(self, rows: int) -> torch.Tensor:
        """(rows,) states at the start of a step (the prompt ends with ';')."""
        return torch.zeros(rows, dtype=torch.long, device=self.allowed.device)

    def mask(self, logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """logits (R, V) with −inf on the tokens that `state` (R,) does not allow: a selection,
        no arithmetic (0 FLOPs)."""
        return logits.masked_fill(~self.allowed[state], float("-inf"))

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(R,) states after writing `tokens` (R,); −1 for a token the state did not allow."""
        return self.next_state[state, self.token_class[tokens]]


@dataclass(frozen=True)
class LLMTimeGrammar:
    """`int.frac,int.frac;` repeated, over Qwen2's token ids unless others are given."""

    decimals: int = 2
    max_int_digits: int = 3
    digit_ids: tuple[int, ...] = QWEN2_DIGIT_IDS
    dot_id: int = QWEN2_DOT_ID
    comma_id: int = QWEN2_COMMA_ID
    semicolon_id: int = QWEN2_SEMICOLON_ID

    def __post_init__(self) -> None:
        if not isinstance(self.decimals, int) or self.decimals < 0:
            raise ValueError(f"LLMTIME grammar: decimals must be an integer ≥ 0, got "
                             f"{self.decimals!r}")
        if not isinstance(self.max_int_digits, int) or self.max_int_digits < 1:
            raise ValueError(f"LLMTIME grammar: max_int_digits must be an integer ≥ 1, got "
                             f"{self.max_int_digits!r}")
        ids = [*self.digit_ids, self.dot_id, self.comma_id, self.semicolon_id]
        if len(self.digit_ids) != 10 or len(set(ids)) != 13:
            raise ValueError(f"LLMTIME grammar: expected 10 digit ids and distinct ids for "
                             f"'.', ',' and ';', got digits {self.digit_ids} and "
                             f"{self.dot_id}, {self.comma_id}, {self.semicolon_id}")

    @classmethod
    def from_tokenizer(cls, tokenizer, decimals: int = 2, max_int_digits: int = 3
                       ) -> LLMTimeGrammar:
        """The grammar over a `tokenizers.Tokenizer`'s ids for '0'..'9', '.', ',' and ';'."""

        def token_id(char: str) -> int:
            ids = tokenizer.encode(char, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"LLMTIME grammar: the tokenizer writes {char!r} as {len(ids)} "
                                 "tokens, expected 1 (LLMTIME needs one token per character, "
                                 "as Qwen2's tokenizer.json does)")
            return ids[0]

        return cls(decimals, max_int_digits, tuple(token_id(str(d)) for d in range(10)),
                   token_id("."), token_id(","), token_id(";"))

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The ids the grammar can ever emit, ascending: 13, or 12 with no '.' at 0 decimals."""
        dot = (self.dot_id,) if self.decimals else ()
        return tuple(sorted((*self.digit_ids, *dot, self.comma_id, self.semicolon_id)))

    def max_new_tokens(self, n_steps: int) -> int:
        """The longest n-step forecast the grammar allows: each value max_int_digits digits
        (+ '.' and `decimals` digits), two values, ',' and ';' per step."""
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer ≥ 1, got {n_steps!r}")
        value = self.max_int_digits + (1 + self.decimals if self.decimals else 0)
        return n_steps * (2 * value + 2)

    @property
    def state_names(self) -> tuple[str, ...]:
        """'v0.int0', …, 'v0.frac2', 'v1.int0', …: value 0 or 1 of a step, digits written."""
        part = [f"int{k}" for k in range(self.max_int_digits + 1)]
        if self.decimals:
            part += [f"frac{j}" for j in range(self.decimals + 1)]
        return tuple(f"v{v}.{p}" for v in (0, 1) for p in part)

    def transitions(self) -> list[list[int]]:
        """next state per (state, token class), NOT_ALLOWED where the grammar says no."""
        index = {name: i for i, name in enumerate(self.state_names)}
        table = [[NOT_ALLOWED] * 5 for _ in index]
        for v, separator in ((0, COMMA), (1, SEMICOLON)):
            after_value = index["v1.int0" if v == 0 else "v0.int0"]
            for k in range(self.max_int_digits + 1):
                row = table[index[f"v{v}.int{k}"]]
                if k < self.max_int_digits:
                    row[DIGIT] = index[f"v{v}.int{k + 1}"]
                if k >= 1 and self.decimals:
                    row[DOT] = index[f"v{v}.frac0"]
                elif k >= 1:
                    row[separator] = after_value
            for j in range(self.decimals + 1 if self.decimals else 0):
                row = table[index[f"v{v}.frac{j}"]]
                if j < self.decimals:
                    row[DIGIT] = index[f"v{v}.frac{j + 1}"]
                else:
                    row[separator] = after_value
        return table

    def tables(self, vocab_size: int, device: torch.device | str | None = None) -> GrammarTables:
        """The machine as tensors on `device`, for a model with `vocab_size` logits."""
        ids = [*self.digit_ids, self.dot_id, self.comma_id, self.semicolon_id]
        if max(ids) >= vocab_size:
            raise ValueError(f"LLMTIME grammar: token id {max(ids)} is outside the model's "
                             f"vocabulary of {vocab_size}; build the grammar from this model's "
                             "tokenizer (LLMTimeGrammar.from_tokenizer)")
        token_class = torch.full((vocab_size,), OTHER, dtype=torch.long)
        token_class[list(self.digit_ids)] = DIGIT
        token_class[[self.dot_id, self.comma_id, self.semicolon_id]] = torch.tensor(
            [DOT, COMMA, SEMICOLON])
        next_state = torch.tensor(self.transitions(), dtype=torch.long)  # (S, 5)
        allowed = (next_state != NOT_ALLOWED)[:, token_class]  # (S, 5) → (S, V)
        token_ids = torch.tensor(self.token_ids, device=device)
        return GrammarTables(allowed.to(device), next_state.to(device), token_class.to(device),
                             token_ids)
