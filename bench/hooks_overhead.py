"""What the FLOP hooks cost when no counter is active (evidence, not a test).

    .venv/bin/python bench/hooks_overhead.py              # Qwen2.5-0.5B shapes, random weights
    .venv/bin/python bench/hooks_overhead.py --layers 4 --device cuda

A one-token decode step is the worst case: the least arithmetic per hook call. The script
counts the hook calls in one such step, times one call with counting off, and sets
calls × that time beside the step's own time. It also times the step with counting on.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from dataclasses import replace

import torch

import qwen_min.model as qm
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, count_flops


def hook_calls(model: Qwen2ForCausalLM, step) -> int:
    """Hook calls in one `step()`, by wrapping both hooks in call counters."""
    calls = 0
    originals = qm.add_flops, qm.add_matmul_flops

    def wrap(fn):
        def counted(*args):
            nonlocal calls
            calls += 1
            return fn(*args)

        return counted

    qm.add_flops, qm.add_matmul_flops = map(wrap, originals)
    try:
        step()
    finally:
        qm.add_flops, qm.add_matmul_flops = originals
    return calls


def seconds(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--past", type=int, default=64, help="cached positions before the step")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = replace(Qwen2Config(), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(cfg).eval()
    cache = KVCache(cfg, 1, args.past + 1, torch.float32, device)
    cache.length = args.past
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def step():
        cache.rewind(args.past)  # the same step every time
        model(token, cache=cache, last_only=True)

    for _ in range(3):
        step()  # warm-up
    calls = hook_calls(model, step)
    n = 1_000_000
    off_ns = (
        1e9
        * min(
            timeit.timeit(lambda: qm.add_flops("rope", 7), number=n),
            timeit.timeit(lambda: qm.add_matmul_flops("q_proj", 1, 1, 896, 896), number=n),
        )
        / n
    )
    # the lambda wrapper itself is a call too: take it off, to bound the hook alone
    empty_ns = 1e9 * timeit.timeit(lambda: None, number=n) / n
    off, on = [], []
    for _ in range(args.repeats):  # interleaved, so load from elsewhere hits both alike
        off.append(seconds(step, device))
        with count_flops():
            on.append(seconds(step, device))
    off, on = statistics.median(off), statistics.median(on)
    bound = calls * max(off_ns - empty_ns, 0.0) * 1e-9
    print(f"device {device}, {args.layers} layers, decode step at {args.past} cached positions")
    print(f"hook calls per step:              {calls}")
    print(
        f"one hook call, counting off:      {off_ns - empty_ns:.0f} ns (+{empty_ns:.0f} ns lambda)"
    )
    print(f"all hook calls, counting off:     {1e6 * bound:.1f} µs")
    print(f"decode step, counting off:        {1e3 * off:.2f} ms (median of {args.repeats})")
    print(f"decode step, counting on:         {1e3 * on:.2f} ms")
    print(f"hooks off / step:                 {100 * bound / off:.3f}%")


if __name__ == "__main__":
    main()
