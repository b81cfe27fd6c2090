"""Data-parallel LoRA training over several processes, launched by PyTorch's own torchrun:

    torchrun --nproc_per_node 4 train.py --batch-size 8 ...

Each process (rank) holds the whole model and trains on its share of every global batch;
DistributedDataParallel (DDP) all-reduces the LoRA gradients, so every rank takes the same
Adam step. One process with no torchrun variables is a world of one, and nothing changes.

The loss is the mean over the counted tokens of the *global* batch. With padding, ranks hold
different numbers of counted tokens n_r (n = Σ n_r), so rank r's mean loss ℓ_r is weighted:

    DDP averages gradients over W ranks:  (1/W) Σ_r ∇(W · n_r/n · ℓ_r)  =  ∇(Σ_r n_r ℓ_r / n)

which is the gradient of the single-process loss. The FLOPs each rank counts add up to the
single-process count (every term of the count is linear in the batch rows); only rank 0
writes checkpoints, the ledger and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .model import Qwen2ForCausalLM


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0


def init_from_env(device: torch.device) -> World:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK and join the process group: NCCL for
    CUDA, gloo for the CPU. Without them (a plain `python train.py`): a world of one, no group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def local_device(world: World, device: torch.device) -> torch.device:
    """One GPU per rank on a node: cuda:LOCAL_RANK. The CPU is shared by all ranks."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def shard_rows(batch_size: int, world: World) -> slice:
    """This rank's rows of a global batch: consecutive, as even as can be. When W does not
    divide B, the first B mod W ranks take one row more (B = 6 over 4 ranks: 2, 2, 1, 1);
    the token weighting keeps the step that of one process either way."""
    if batch_size < world.size:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {world.size} processes: "
                         f"every rank needs at least one window; raise --batch-size or run "
                         f"fewer processes")
    base, extra = divmod(batch_size, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def counted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens the loss is taken on: labels[:, 1:] ≠ −100 (position t predicts t+1)."""
    return (labels[:, 1:] != -100).sum()


class _WeightedLoss(nn.Module):
    """model.loss as a module's forward (DDP arms its gradient all-reduce in forward), weighted
    by W · n_r / n so that the averaged gradient is the global batch's."""

    def __init__(self, model: Qwen2ForCausalLM, world: World):
        super().__init__()
        self.model, self.world = model, world

    def forward(self, input_ids, labels, attention_mask) -> torch.Tensor:
        n_local = counted_tokens(labels)
        n_global = n_local.clone()
        dist.all_reduce(n_global)
        loss = self.model.loss(input_ids, labels, attention_mask)
        return loss * (self.world.size * n_local / n_global)


class DataParallelLoss:
    """What train.py's `train_step(model, ...)` calls as `model.loss(...)`, across ranks: each
    rank's weighted loss, with DDP all-reducing the LoRA gradients in backward. The loss it
    returns is this rank's share; `global_mean(world, loss)` gives the global batch's loss."""

    def __init__(self, model: Qwen2ForCausalLM, world: World):
        self.ddp = DistributedDataParallel(_WeightedLoss(model, world))

    def loss(self, input_ids, labels, attention_mask=None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.ddp(input_ids, labels, attention_mask)


def data_parallel(model: Qwen2ForCausalLM, world: World) -> Qwen2ForCausalLM | DataParallelLoss:
    """The object to train: the model itself in a world of one, else its DDP loss."""
    return model if world.size == 1 else DataParallelLoss(model, world)


def global_mean(world: World, weighted_loss: float) -> float:
    """The global batch's loss from each rank's weighted share: (Σ_r W·n_r/n·ℓ_r) / W."""
    return all_reduce_sum(world, weighted_loss) / world.size


def all_reduce_sum(world: World, value: float | int) -> float | int:
    """Σ over ranks of a number (the FLOPs each rank counted, its weighted loss); exact for
    integers (int64), as the ledger needs."""
    if world.size == 1:
        return value
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    t = torch.tensor(value, dtype=dtype)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item()


def shutdown(world: World) -> None:
    if world.size > 1:
        dist.destroy_process_group()
