"""Data-parallel training (qwen_min/distributed.py) on the CPU with gloo: two processes
started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) train five
steps of a global batch of 3 windows split 2 + 1, with padding, so the ranks hold different
numbers of counted tokens. Losses, LoRA tensors and summed FLOPs equal one process's."""

from __future__ import annotations

import argparse
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
import train
from lora import apply_lora, lora_parameters
from qwen_min import Qwen2Config, Qwen2ForCausalLM
from qwen_min.distributed import (
    World,
    all_reduce_sum,
    data_parallel,
    global_mean,
    init_from_env,
    shard_rows,
    shutdown,
)

CFG = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
GLOBAL_BATCH, STEPS, SEED = 3, 5, 0
ARGS = argparse.Namespace(lr=3e-3, schedule="cosine", warmup=2, steps=STEPS)


def windows() -> dict[str, torch.Tensor]:
    """Series of uneven lengths cut as train.py cuts them: last windows are left-padded."""
    rng = np.random.default_rng(5)
    series = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (23, 17, 30, 12, 26)]
    ids, labels, mask = data.training_windows(series, context_length=16, stride=8, pad_id=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lora_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG)
    apply_lora(model, 2, targets=("q_proj", "v_proj"))
    with torch.no_grad():  # B = 0 at init would leave A without gradient on the first step
        for p in lora_parameters(model).values():
            p.normal_(0.0, 0.2)
    return model.train()


def train_steps(world: World) -> dict:
    """train.py's loop, as it runs on one rank: its rows of each global batch."""
    torch.set_num_threads(1)
    model = lora_model()
    trainer = data_parallel(model, world)
    optimizer = torch.optim.Adam(list(lora_parameters(model).values()))
    train_set = windows()
    rows = shard_rows(GLOBAL_BATCH, world)
    losses, counted = [], 0
    for step in range(STEPS):
        idx = train.batch_indices(step, len(train_set["input_ids"]), GLOBAL_BATCH, SEED)[rows]
        batch = {k: v[torch.from_numpy(idx)] for k, v in train_set.items()}
        lr = train.learning_rate(step, ARGS)
        loss, flops = train.train_step(trainer, optimizer, batch, lr, "cpu", torch.float32)
        losses.append(global_mean(world, loss))
        counted += all_reduce_sum(world, flops)
    return {"losses": losses, "flops": counted, "lora": lora_parameters(model)}


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = init_from_env(torch.device("cpu"))
    result = train_steps(world)
    if world.is_main:
        torch.save(result, out)
    shutdown(world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch 2.13's gloo DDP on the CPU sometimes kills a rank with a signal from a native thread
# ("terminate called without an active exception" and SIGABRT, or SIGSEGV/SIGBUS), with none of
# this project's code involved: a minimal script (init, DDP over one nn.Linear, one backward,
# destroy) lost a rank in 4 of 45 spawns here, these ranks outside pytest in 3 of 40, and under
# pytest about 1 spawn in 3. So a rank killed by a signal is run again, 4 times at most; a rank
# that raises (any error of ours) fails at once.
SIGNAL_RETRIES = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    for attempt in range(SIGNAL_RETRIES + 1):
        try:
            mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == SIGNAL_RETRIES:
                raise
    return torch.load(out, weights_only=False), train_steps(World())


def test_two_gloo_ranks_match_one_process(runs):
    ddp, single = runs
    masks = windows()["attention_mask"]
    counts = [[int(masks[train.batch_indices(s, len(masks), GLOBAL_BATCH, SEED)][rows].sum())
               for rows in (slice(0, 2), slice(2, 3))] for s in range(STEPS)]
    # padding: the ranks' token counts are not 2 : 1 like their rows (measured [30, 12], ...)
    assert sum(a != 2 * b for a, b in counts) == STEPS
    assert len(ddp["losses"]) == STEPS
    # measured: largest difference 3.8e-6 on losses of ~29 (fp32; sums in another order); the
    # bound is the issue's
    np.testing.assert_allclose(ddp["losses"], single["losses"], atol=1e-5, rtol=0)
    for name, p in single["lora"].items():
        # measured: ≤ 3.0e-8
        torch.testing.assert_close(ddp["lora"][name], p, atol=1e-6, rtol=0)


def test_ledger_flops_summed_over_ranks_equal_one_process(runs):
    ddp, single = runs
    assert ddp["flops"] == single["flops"]
    assert single["flops"] > 0


@pytest.mark.parametrize("batch, sizes", [(6, [2, 2, 1, 1]), (4, [1, 1, 1, 1]), (9, [3, 2, 2, 2])])
def test_shard_rows_split_the_global_batch(batch, sizes):
    shards = [shard_rows(batch, World(r, 4)) for r in range(4)]
    assert [s.stop - s.start for s in shards] == sizes
    assert [i for s in shards for i in range(s.start, s.stop)] == list(range(batch))


def test_shard_rows_needs_a_row_per_rank():
    with pytest.raises(ValueError, match=r"^--batch-size 3 is smaller than the 4 processes: "
                                         r"every rank needs at least one window; raise "
                                         r"--batch-size or run fewer processes$"):
        shard_rows(3, World(0, 4))
