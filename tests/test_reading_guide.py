"""docs/reading-guide.md runs: its code is a doctest, executed here, so every shape and number
it shows is what the line before it prints, and a single edited output fails.

The guide builds Qwen2.5-0.5B with random bf16 weights (1 GB, on the CPU) and traces one
3-token pass through the plain path. The doctest runs once per session, with the shapes of
every tensor a torch function sees recorded, for the checks of the prose below.
"""

from __future__ import annotations

import doctest
import re
from functools import cache
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import flops
from qwen_min import Qwen2Config

PATH = Path(__file__).resolve().parent.parent / "docs" / "reading-guide.md"
GUIDE = PATH.read_text()


class Shapes(TorchFunctionMode):
    """The shape of every tensor that a torch function returns, and of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [*(out if isinstance(out, tuple) else [out]), *args]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


@cache
def run_guide() -> tuple[doctest.TestResults, str, set[tuple[int, ...]]]:
    """(doctest results, the runner's report of failures, the shapes the guide's code saw)."""
    test = doctest.DocTestParser().get_doctest(GUIDE, {}, PATH.name, str(PATH), 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.REPORT_NDIFF)
    # the guide turns autograd off and seeds torch: both are put back afterwards
    with torch.random.fork_rng(), torch.enable_grad(), Shapes() as shapes:
        result = runner.run(test, out=report.append)
    return result, "".join(report), shapes.seen


def test_the_guide_runs_and_prints_what_it_shows():
    result, report, _ = run_guide()
    assert result.failed == 0, report
    assert result.attempted >= 60  # every `>>>` line of the guide


def test_the_guide_quotes_exactly_the_computed_numbers():
    """The numbers with thousands separators: the FLOPs of the pass (closed form, and worked by
    hand), and LoRA's trainable count; nowhere else a number that was not computed."""
    cfg = Qwen2Config()
    closed = flops.forward_flops(cfg, 1, 3)
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    trainable = L * 8 * ((d + d) + (d + kv))  # rank 8: A (8, d_in) and B (d_out, 8), q and v
    want = {sum(closed.values()), closed["q_proj"], closed["lm_head"], trainable, V, 2 * d - 1}
    assert want == {2_969_045_556, 115_540_992, 816_352_128, 540_672, 151_936, 1_791}
    assert closed["q_proj"] == L * 3 * d * (2 * d - 1) and closed["lm_head"] == 3 * V * (2 * d - 1)
    quoted = {int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", GUIDE)}
    assert quoted == want


def test_the_guide_shows_only_shapes_of_the_pass():
    """Every shape the guide shows, printed (`torch.Size([...])`) or in the prose, is one that
    its code computed; and the attention's inner shapes are all shown."""
    _, _, seen = run_guide()
    sizes = {tuple(int(x) for x in m.split(", ")) for m in
             re.findall(r"torch\.Size\(\[(\d+(?:, \d+)*)\]\)", GUIDE)}
    prose = re.sub(r"```.*?```", "", GUIDE, flags=re.S)
    in_prose = {tuple(int(x) for x in m.split(", ")) for m in
                re.findall(r"\((\d+(?:, \d+)+)\)", prose)}
    assert len(sizes) >= 12
    assert (sizes | in_prose) - seen == set()
    assert {(1, 1, 3, 3), (1, 14, 3, 64), (1, 2, 3, 64), (1, 14, 3, 3), (1, 3, 8)} <= sizes


def test_the_guide_quotes_the_config():
    cfg = Qwen2Config()
    line = (f"d = {cfg.hidden_size}, {cfg.num_hidden_layers} layers, MLP width f = "
            f"{cfg.intermediate_size}, vocabulary V = {cfg.vocab_size}; "
            f"{cfg.num_attention_heads} query heads and {cfg.num_key_value_heads} key/value heads "
            f"of head_dim {cfg.hidden_size} / {cfg.num_attention_heads} = {cfg.head_dim}")
    assert line in " ".join(GUIDE.split())
