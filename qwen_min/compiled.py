"""Compiled fast paths beside the readable model: one training step as one graph, and one
decoding step over the preallocated KV cache with static shapes.

    step = CompiledTrainStep(model, optimizer, batch_size=4, context_length=768,
                             device=device, dtype=torch.bfloat16)
    loss, flops = step(batch, lr)        # the same return as train.py's eager train_step

The training step — forward, loss, backward and Adam on the LoRA tensors — is traced by
`torch.compile(fullgraph=True)` as one graph: the gradients come from `torch.func.grad_and_value`
(dynamo traces it; `loss.backward()` and `torch.optim.Adam.step`, which inserts graph breaks
on purpose, would split the graph), and Adam is written out below on the optimizer's own
state tensors, so `optimizer.state_dict()` still saves and resumes the run. On CUDA the graph
is replayed as CUDA graphs (`mode="reduce-overhead"`): inputs are copied into static buffers
of shape (B, L), and the learning rate is a tensor, so changing it never recompiles.

FLOPs: Python hooks do not run per step inside a compiled graph, so the step's count is taken
once, from an eager counted pass of `model.loss` at the same shape (3 × forward, as train.py
counts it); tests/test_compiled.py proves it equals the eager step's count and flops.py's
closed form.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .counting import FlopCounter, count_flops, paused_counting
from .model import KVCache, Qwen2ForCausalLM, rope_cos_sin
from .runtime import autocast

# ----------------------------------------------------------------------------- compile cache


def use_compile_cache(directory: str | Path) -> Path:
    """Keep inductor's FX-graph and AOT-autograd caches in `directory`, so that a second
    process (the next run of a sweep) loads the compiled kernels instead of generating them
    again. Call before the first compile; inductor reads the variable when it first caches."""
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs on CUDA (launches, not arithmetic, bound a small LoRA step there);
    inductor's default elsewhere (CUDA graphs do not exist on CPU)."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


# ----------------------------------------------------------------------------- the loss


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024
) -> torch.Tensor:
    """mean cross_entropy(h Wᵀ, targets) over targets ≠ −100, `chunk_rows` rows of logits at a
    time; h (N, d), weight (V, d), targets (N,). The function of fast.chunked_linear_cross_entropy
    in plain differentiable ops (its autograd.Function cannot be traced by torch.func). The loop
    has a fixed trip count for fixed shapes, so it unrolls into the graph."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_rows):
        logits = h[s : s + chunk_rows] @ weight.t()  # (chunk, V), in the autocast dtype
        total = total + F.cross_entropy(
            logits.float(), targets[s : s + chunk_rows], ignore_index=-100, reduction="sum"
        )
    return total / (targets != -100).sum()


class _StepLoss(nn.Module):
    """model.loss's function for the compiled step: what torch.func.functional_call calls."""

    def __init__(self, model: Qwen2ForCausalLM, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.model, self.device, self.dtype = model, device, dtype

    def forward(self, input_ids, labels, attention_mask) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            # always the masked path (no host-side "is anything padded?" check), so one graph
            # serves padded and unpadded batches; an all-ones mask gives the function of None
            h = self.model.model(input_ids, attention_mask)  # (B, T, d), before the head
            d = h.shape[-1]
            h = h[:, :-1].reshape(-1, d)  # (B·(T−1), d): position t predicts label t+1
            return chunked_cross_entropy(h, self.model.lm_head.weight, labels[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------- Adam


def adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps) -> None:
    """torch.optim.Adam's update (no weight decay, no amsgrad), in place, with tensor `lr` and
    `steps`, as its capturable form: the bias corrections stay on the device.

        m ← β₁m + (1−β₁)g    v ← β₂v + (1−β₂)g²    p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
    """
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        denom = (v.sqrt() / bias2.sqrt()).add_(eps)
        p.sub_((lr / bias1) * m / denom)


def adam_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    """The optimizer's per-tensor state, created as torch's Adam creates it on its first step,
    so optimizer.state_dict() saves what the compiled step trains (train.py's resume)."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise ValueError(f"CompiledTrainStep needs a torch.optim.Adam, got {type(optimizer)}")
    group = optimizer.param_groups[0]
    unsupported = {k: group[k] for k in ("weight_decay", "amsgrad", "maximize", "differentiable")
                   if group[k]}
    if len(optimizer.param_groups) != 1 or unsupported:
        raise ValueError(f"CompiledTrainStep runs plain Adam in one parameter group; this "
                         f"optimizer has {len(optimizer.param_groups)} groups and {unsupported}")
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # a non-capturable Adam keeps `step` on the CPU
            state["step"] = state["step"].to(p.device)
        for t in state.values():  # updated in place by the graph: CUDA graphs keep their address
            torch._dynamo.mark_static_address(t)
    return [optimizer.state[p] for p in params]


# ----------------------------------------------------------------------------- the step


class CompiledTrainStep:
    """One Adam step on the LoRA tensors as one compiled graph, for batches of exactly
    (batch_size, context_length). `step(batch, lr) -> (loss float, counted FLOPs)`.

    The Adam state lives in the optimizer and is read from it at every call, so train.py's
    save_state/load_state (optimizer.state_dict()) work as with the eager step. `mode`:
    "auto" is compile_mode(device); None inductor's default; "reduce-overhead" CUDA graphs.
    LoRA dropout compiles too, but draws other random numbers than the eager step."""

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        context_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
        mode: str | None = "auto",
    ):
        self.device = torch.device(device)
        self.optimizer = optimizer
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in self.params} != {id(p) for g in optimizer.param_groups
                                            for p in g["params"]}:
            raise ValueError("CompiledTrainStep: the optimizer must hold exactly the model's "
                             "trainable tensors (lora_parameters after apply_lora)")
        group = optimizer.param_groups[0]
        # constants of the graph; read here, because dynamo guards on every dict it reads and
        # the group's "lr" changes each step
        self.betas, self.eps = tuple(group["betas"]), group["eps"]
        adam_state(optimizer, self.params)
        self.loss_module = _StepLoss(model, self.device, dtype)
        shape = (batch_size, context_length)
        self.input_ids = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.labels = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.attention_mask = torch.ones(shape, dtype=torch.long, device=self.device)
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        for t in (self.input_ids, self.labels, self.attention_mask, self.lr, *self.params):
            torch._dynamo.mark_static_address(t)  # CUDA graphs use them in place, no copy
        self.flops = eager_step_flops(model, batch_size, context_length, self.device, dtype)
        mode = compile_mode(self.device) if mode == "auto" else mode
        self.compiled = torch.compile(self._step, fullgraph=True, mode=mode)

    def _step(self, params, exp_avgs, exp_avg_sqs, steps, lr, input_ids, labels, attention_mask):
        names = ["model." + n for n in self.names]  # the names inside _StepLoss

        def loss_of(trainable):
            return torch.func.functional_call(self.loss_module, dict(zip(names, trainable)),
                                              (input_ids, labels, attention_mask))

        grads, loss = torch.func.grad_and_value(loss_of)(tuple(params))
        with torch.no_grad():
            adam_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, *self.betas, self.eps)
        return loss.detach()

    def __call__(self, batch: dict, lr: float) -> tuple[float, int]:
        """batch: input_ids, labels, attention_mask, each (batch_size, context_length)."""
        want, got = tuple(self.input_ids.shape), tuple(batch["input_ids"].shape)
        if got != want:
            raise ValueError(f"CompiledTrainStep was built for batches of {want}, got {got}")
        self.input_ids.copy_(batch["input_ids"])
        self.labels.copy_(batch["labels"])
        if batch["attention_mask"] is None:  # an unpadded batch (train.device_batch)
            self.attention_mask.fill_(1)
        else:
            self.attention_mask.copy_(batch["attention_mask"])
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:  # what a saved state_dict records
            group["lr"] = lr
        states = adam_state(self.optimizer, self.params)
        loss = self.compiled(self.params, [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                             self.lr, self.input_ids, self.labels, self.attention_mask)
        return loss.item(), self.flops


def eager_step_flops(
    model: Qwen2ForCausalLM, batch_size: int, context_length: int, device, dtype
) -> int:
    """The FLOPs train.py's eager step counts at this shape, from one counted forward pass:
    3 × (forward + loss), backward counting exactly 2× the forward. The count depends on the
    shapes only, not on the token values or the padding."""
    ids = torch.zeros(batch_size, context_length, dtype=torch.long, device=device)
    with torch.no_grad(), count_flops() as c, autocast(torch.device(device), dtype):
        model.loss(ids, ids, torch.ones_like(ids))
    return 3 * c.total


# ----------------------------------------------------------------------------- decoding


class CompiledDecodeStep:
    """One decoding step of (B, 1) tokens against a KVCache of fixed size, compiled with
    static shapes (CUDA graphs on CUDA): `logits = step(tokens, attention_mask)`; what chooses
    the next token from the logits (argmax, grammar, sampling) stays outside the graph.

    The reference decode step, `model(tokens, mask[:, :T+i], cache, last_only=True)`, reads a
    cache slice and a mask that grow by one every step: a new shape each time. Here the query
    attends over the whole preallocated cache, and slots after the current one are masked, so
    every step has the same shapes. Those slots hold zeros or stale values; masked, they get
    probability exactly 0, as if absent. The current slot is a tensor (no recompiles); the
    cache's `length` is that slot, and this step advances it by one.

    FLOPs: the hooks do not run per step inside the graph, so each call adds to the active
    count_flops() counter what the reference step counts (DecodeStepFlops). The graph's real
    work differs (it attends over every slot, masked ones included), but the ledger counts the
    reference algorithm, over the S real keys, as the budget rules define it."""

    def __init__(self, model: Qwen2ForCausalLM, cache: KVCache, mode: str | None = "auto"):
        self.model, self.cache = model, cache
        device = cache.k.device
        self.flops = DecodeStepFlops(model, cache.k.dtype, device)
        mode = compile_mode(device) if mode == "auto" else mode
        self.position = torch.zeros((), dtype=torch.long, device=device)
        for t in (cache.k, cache.v, self.position):  # written in place: CUDA graphs keep them
            torch._dynamo.mark_static_address(t)
        self.compiled = torch.compile(self._step, fullgraph=True, mode=mode)

    def _step(self, tokens, attention_mask, position, cache_k, cache_v):
        model, cfg = self.model, self.model.cfg
        # model.positions_and_mask's decoding row, for a position held in a tensor
        slots = torch.arange(cache_k.shape[3], device=tokens.device)  # (S,)
        keys = attention_mask.bool() & (slots <= position)  # (B, S): real tokens up to this one
        positions = keys.long().sum(-1, keepdim=True) - 1  # (B, 1): real tokens before it
        mask = keys[:, None, None, :]  # (B, 1, 1, S)
        x = model.model.embed_tokens(tokens)  # (B, 1, d)
        cos, sin = rope_cos_sin(cfg, positions, x.dtype)
        view = _StaticCache(cache_k, cache_v, position)
        for i, layer in enumerate(model.model.layers):
            x = layer(x, cos, sin, mask, view, i)
        return model.lm_head(model.model.norm(x))[:, -1]  # (B, V)

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) go into slot `cache.length`; attention_mask (B, max_len) is generate's
        whole mask (prompt padding 0, every generated slot 1): slots after this one are masked
        here. Returns the logits (B, V) of the next token."""
        self.position.fill_(self.cache.length)
        # with a counter active every step recompiled (the recompile limit was hit in one
        # generate): the graph runs uncounted and the step is counted below
        with paused_counting() as counter:
            logits = self.compiled(tokens, attention_mask, self.position, self.cache.k,
                                   self.cache.v)
        if counter is not None:  # the reference step attends over this token and those before
            self.flops.add_to(counter, tokens.shape[0], self.cache.length + 1)
        self.cache.advance(1)
        return logits


class DecodeStepFlops:
    """What the reference decode step (generate.decode_step) counts for R rows, each one new
    token attending over S keys: R · (c₁ + (S − 1) · (c₂ − c₁)), key by key, where c₁, c₂ are
    the counts of one row at S = 1 and S = 2, taken once from two counted eager steps.

    Exact, not an estimate: every rule in qwen_min.model is linear in the rows, and only the
    attention's rules see S, each affine in it (q·kᵀ: nh·S·(2hd − 1), scale nh·S, softmax
    nh·(12S − 1), p·v nh·hd·(2S − 1)); tests/test_fast_decode.py checks the whole ledger."""

    def __init__(self, model: Qwen2ForCausalLM, dtype: torch.dtype, device: torch.device):
        cache = KVCache(model.cfg, 1, 2, dtype, device)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        counts = []
        for _ in range(2):  # S = 1 (an empty cache), then S = 2
            with torch.no_grad(), count_flops() as c:
                model(token, None, cache, last_only=True)
            counts.append(c)
        self.at_one = counts[0]
        self.per_key = FlopCounter({k: counts[1][k] - counts[0][k] for k in counts[1]})
        self.per_key.matmul_outputs = counts[1].matmul_outputs - counts[0].matmul_outputs

    def add_to(self, counter: FlopCounter, rows: int, keys: int) -> None:
        """Count one step of `rows` rows over `keys` keys into `counter`, as its hooks would."""
        for name, per_key in self.per_key.items():
            counter[name] += rows * (self.at_one[name] + (keys - 1) * per_key)
        counter.matmul_outputs += rows * (self.at_one.matmul_outputs
                                          + (keys - 1) * self.per_key.matmul_outputs)


class _StaticCache:
    """The KVCache interface the attention layer calls (`update`), writing one slot chosen by
    a tensor (a Python slice at a moving position would change shapes) and returning the
    whole cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor):
        self.k, self.v, self.slot = k, v, position.view(1)  # (1,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, n_kv, 1, hd) into slot `position` of the (B, n_kv, S, hd) layer cache
        self.k[layer].index_copy_(2, self.slot, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slot, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]  # (B, n_kv, S, hd)
