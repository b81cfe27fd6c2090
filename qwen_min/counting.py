"""The FLOP counter behind the one-line hooks in qwen_min/model.py.

    with count_flops() as c:     # opens a counter; the hooks add to it
        model(ids)
    c["q_proj"], c.total

model.py calls `add_flops(name, n)` or `add_matmul_flops(name, batch, m, n, p)` beside each
operation, with its rule in a comment. With no counter open a hook is one global read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class FlopCounter(Counter):
    """FLOPs per operation name, plus Σ m·p over the matrix products (`matmul_outputs`): the
    exact difference between our m·p·(2n−1) and the 2·m·n·p of torch.utils.flop_counter, so
    tests/test_flops.py can check our matmuls against torch's FlopCounterMode."""

    matmul_outputs: int = 0

    @property
    def total(self) -> int:
        return sum(self.values())


_counter: FlopCounter | None = None


@contextmanager
def count_flops() -> Iterator[FlopCounter]:
    """`with count_flops() as c: model(x)` → c["q_proj"], c.total, ... (forward pass only)."""
    global _counter
    outer, _counter = _counter, FlopCounter()
    try:
        yield _counter
    finally:
        _counter = outer


@contextmanager
def paused_counting() -> Iterator[FlopCounter | None]:
    """Set the active counter (or None) aside, and yield it: for code whose FLOPs are counted
    outside the hooks, e.g. a compiled graph (qwen_min/compiled.py), where dynamo would trace
    the hooks' updates of the counter and recompile at every call."""
    global _counter
    outer, _counter = _counter, None
    try:
        yield outer
    finally:
        _counter = outer


def add_flops(name: str, n: int) -> None:
    """The hook. With no counter active it is one global read: nothing measurable."""
    if _counter is not None:
        _counter[name] += int(n)


def add_matmul_flops(name: str, batch: int, m: int, n: int, p: int) -> None:
    # `batch` independent (m×n)(n×p) products: m·p dot products of n multiplies and n−1 adds
    if _counter is not None:
        _counter[name] += batch * m * p * (2 * n - 1)
        _counter.matmul_outputs += batch * m * p
