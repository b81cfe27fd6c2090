"""The LLMTIME grammar's state machine (qwen_min/grammar.py): exact allowed-token sets per state,
over Qwen2's real ids, for 0–3 decimals and 1–3 integer digits."""

from __future__ import annotations

import pytest
import torch

from qwen_min import load_tokenizer
from qwen_min.grammar import LLMTimeGrammar

QWEN2_VOCAB = 151936
CHAR_ID = {str(d): 15 + d for d in range(10)} | {".": 13, ",": 11, ";": 26}
ID_CHAR = {i: c for c, i in CHAR_ID.items()}
DIGITS = set("0123456789")


def walk(tables, text: str) -> int:
    """The state after `text`, from the start of a step; −1 once a character is not allowed."""
    state = tables.start(1)
    for c in text:
        state = tables.advance(state, torch.tensor([CHAR_ID[c]]))
        if int(state) < 0:
            return -1
    return int(state)


def allowed_after(tables, text: str) -> set[str]:
    """The characters the grammar allows next, read from the whole (S, V) mask: any id outside
    the 13 LLMTIME tokens would show up as a KeyError."""
    ids = tables.allowed[walk(tables, text)].nonzero().flatten().tolist()
    return {ID_CHAR[i] for i in ids}


CASES = {  # decimals → [(text so far, characters allowed next)]
    2: [("", DIGITS), ("1", DIGITS | {"."}), ("12", DIGITS | {"."}), ("123", {"."}),
        ("1.", DIGITS), ("1.2", DIGITS), ("1.23", {","}), ("1.23,", DIGITS),
        ("1.23,4", DIGITS | {"."}), ("1.23,456", {"."}), ("1.23,4.5", DIGITS),
        ("1.23,4.56", {";"}), ("1.23,4.56;", DIGITS), ("1.23,4.56;78.9", DIGITS)],
    1: [("0", DIGITS | {"."}), ("0.1", {","}), ("0.1,99", DIGITS | {"."}), ("0.1,999.9", {";"}),
        ("0.1,999.9;", DIGITS)],
    3: [("5.12", DIGITS), ("5.123", {","}), ("5.123,0.000", {";"})],
    0: [("", DIGITS), ("7", DIGITS | {","}), ("777", {","}), ("7,", DIGITS),
        ("7,12", DIGITS | {";"}), ("7,123", {";"}), ("7,123;", DIGITS)],
}  # fmt: skip


@pytest.mark.parametrize("decimals", sorted(CASES))
def test_allowed_token_sets_per_state(decimals):
    tables = LLMTimeGrammar(decimals).tables(QWEN2_VOCAB)
    for text, want in CASES[decimals]:
        assert allowed_after(tables, text) == want, text


@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
def test_every_state_allows_only_llmtime_tokens(decimals):
    tables = LLMTimeGrammar(decimals).tables(QWEN2_VOCAB)
    llmtime = torch.zeros(QWEN2_VOCAB, dtype=torch.bool)
    llmtime[list(CHAR_ID.values())] = True
    n_states = 2 * (4 + (decimals + 1 if decimals else 0))  # int0..int3 (+ frac0..fracD), ×2
    assert tables.allowed.shape == (n_states, QWEN2_VOCAB)
    assert not (tables.allowed & ~llmtime).any()
    assert tables.allowed.any(-1).all()  # no dead end: every state can go on


@pytest.mark.parametrize("text", ["1;", "1.2;", "1.23;", "1.23,4.5;", "1.23,4;", "1,", ".",
                                  "1234", "1.234", "1.23,4.56,", "1.23;4.56", ";"])
def test_semicolon_only_after_a_full_step_and_no_malformed_number(text):
    assert walk(LLMTimeGrammar(2).tables(QWEN2_VOCAB), text) == -1


@pytest.mark.parametrize("decimals, longest", [(2, "999.99,999.99;"), (0, "999,999;"),
                                               (3, "999.999,999.999;")])
def test_max_new_tokens_is_the_longest_step_the_grammar_allows(decimals, longest):
    g = LLMTimeGrammar(decimals)
    assert g.max_new_tokens(5) == 5 * len(longest)  # 14 per step at 2 decimals, 8 at 0
    assert walk(g.tables(QWEN2_VOCAB), longest) == 0  # the longest step is allowed...
    assert allowed_after(g.tables(QWEN2_VOCAB), longest[:-1]) == {";"}  # ...and cannot grow


def test_from_tokenizer_reads_qwen2_ids(tiny):
    g = LLMTimeGrammar.from_tokenizer(load_tokenizer(tiny[1]), decimals=1)
    assert g == LLMTimeGrammar(1)  # '0'..'9' = 15..24, '.' = 13, ',' = 11, ';' = 26


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match=r"^LLMTIME grammar: token id 26 is outside the model's "
                                         r"vocabulary of 20; build the grammar from this model's "
                                         r"tokenizer \(LLMTimeGrammar.from_tokenizer\)$"):
        LLMTimeGrammar(2).tables(20)
    with pytest.raises(ValueError, match=r"^LLMTIME grammar: decimals must be an integer ≥ 0, "
                                         r"got -1$"):
        LLMTimeGrammar(-1)
    with pytest.raises(ValueError, match=r"^n_steps must be an integer ≥ 1, got 0$"):
        LLMTimeGrammar(2).max_new_tokens(0)


@pytest.mark.parametrize("decimals, candidates", [(0, [11, *range(15, 25), 26]),
                                                  (2, [11, 13, *range(15, 25), 26])])
def test_sampling_candidates_are_the_ids_some_state_allows(decimals, candidates):
    """Sampling draws from token_ids only, and their count prices sampling in the FLOP count
    (the hooks and the plan alike, so their equality test cannot see a wrong count): at 0
    decimals no number has a '.', so the 12 ids of '0'..'9', ',' and ';', not 13."""
    g = LLMTimeGrammar(decimals)
    tables = g.tables(QWEN2_VOCAB)
    assert list(g.token_ids) == candidates == tables.token_ids.tolist()
    assert tables.allowed.any(0).nonzero().flatten().tolist() == candidates
