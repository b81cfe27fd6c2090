"""Fast paths beside the readable model: each computes what a function of qwen_min/model.py
computes, counts the same FLOPs, and is swapped in per model by `use_fast_paths` (load_model
does it; tests/test_fast_paths.py checks each against the plain function).

  * attention → `sdpa_attention`: torch's fused kernel (scaled_dot_product_attention) for
    T > 1 queries per head (prefill, training). One query per head (decoding) goes to
    `grouped_attention`, plain ops that share each KV head without copying it, which beat
    SDPA's kernel on CPU.
  * the loss → `chunked_linear_cross_entropy`: the head and the softmax a chunk of rows at a
    time, never holding all the logits, with the gradients computed in the forward pass.

And one switch that generate.decode_step turns on around a pass: `OneRowMatmuls`, torch's own
matrix-vector kernel instead of oneDNN's for the products of a single row (decoding at batch 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .counting import add_matmul_flops
from .model import Linear, Qwen2ForCausalLM, add_loss_flops, attention, linear_cross_entropy


def use_fast_paths(model: Qwen2ForCausalLM, on: bool = True) -> Qwen2ForCausalLM:
    """Swap the fast paths in (on) or the plain functions of qwen_min.model back (off)."""
    for layer in model.model.layers:
        layer.self_attn.attend = sdpa_attention if on else attention
    model.head_loss = chunked_linear_cross_entropy if on else linear_cross_entropy
    return model


# ----------------------------------------------------------------------------- attention


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """model.attention through torch's fused kernel, for T > 1: the same arguments, in one
    dtype (Qwen2Attention casts q and k to v's, autocast off)."""
    if q.shape[2] == 1:  # one query per head (decoding): on CPU plain ops beat SDPA's kernel
        return grouped_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """model.attention without repeating K and V: the n_rep query heads that share KV head g
    are stacked into one matrix, qg[b, g, r·T + t] = q[b, g·n_rep + r, t], which multiplies
    k_g as it is. Head g·n_rep + r meets k_g, as after repeat_interleave, but nothing is copied."""
    B, nh, T, hd = q.shape
    n_kv, S, n_rep = k.shape[1], k.shape[2], nh // k.shape[1]
    qg = q.reshape(B, n_kv, n_rep * T, hd)  # (B, n_kv, n_rep·T, hd)
    scores = (qg @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, n_kv, n_rep·T, S)
    scores = scores.view(B, n_kv, n_rep, T, S)  # (B, n_kv, n_rep, T, S)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask: (B, 1, 1, T, S)
    weights = scores.float().softmax(-1).to(v.dtype).view(B, n_kv, n_rep * T, S)
    return (weights @ v).view(B, nh, T, hd)  # (B, n_kv, n_rep·T, hd) → (B, nh, T, hd)


# ----------------------------------------------------------------------------- the loss


def chunked_linear_cross_entropy(
    h: torch.Tensor, head: Linear, targets: torch.Tensor, chunk_rows: int = 256
) -> torch.Tensor:
    """model.linear_cross_entropy(h, head, targets) without ever holding all the logits.

    Why: a training batch of 4 × 512 positions has 2048 × 151,936 logits, 1.2 GB in fp32, and
    the plain path makes several such tensors per step (bf16 output, fp32 copy, log-softmax,
    its gradient) and keeps some for the backward pass. Here `chunk_rows` rows at a time go
    through the head and the softmax, and each chunk's gradient with respect to h,
    ((softmax − onehot) / n) · W, is computed at once in the forward pass: only that
    (rows, d) tensor waits for backward. The head is frozen under LoRA; if its weight does
    train, its gradient ((softmax − onehot) / n)ᵀ · h is accumulated the same way."""
    if head.bias is not None:
        raise ValueError("chunked_linear_cross_entropy supports a head without bias (as Qwen2's)")
    d, V = head.in_features, head.out_features
    rows = h.numel() // d
    add_matmul_flops(head.flop_name, 1, rows, d, V)  # rows·V·(2d − 1), as Linear counts it
    add_loss_flops(rows, V)
    h, targets = h.reshape(rows, d), targets.reshape(rows)  # (rows, d), (rows,)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, targets, chunk_rows)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h Wᵀ) against targets, `chunk_rows` rows at a time, with the
    gradients computed in the forward pass. Under autocast the products run in its dtype, the
    softmax in fp32.

    The chunks reuse two (chunk_rows, V) buffers: on CPU a fresh 150 MB tensor per chunk costs
    as much time in page faults as the softmax arithmetic itself."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):  # h (N, d), weight (V, d), targets (N,)
        valid = targets != -100
        n = valid.sum()
        want_h, want_w = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        if torch.is_autocast_enabled(h.device.type):  # cast the head once, not in every chunk
            weight = weight.to(torch.get_autocast_dtype(h.device.type))
        rows_max, V = min(chunk_rows, h.shape[0]), weight.shape[0]
        logits_buf = weight.new_empty(rows_max, V)  # the product's dtype
        e_buf = torch.empty(rows_max, V, dtype=torch.float32, device=h.device)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk_rows):
            rows = slice(s, s + chunk_rows)
            hc, ok = h[rows].to(weight.dtype), valid[rows]
            t = targets[rows].clamp(min=0)  # ignored rows: any index, their weight below is 0
            c = hc.shape[0]
            logits = torch.mm(hc, weight.t(), out=logits_buf[:c])  # (c, V)
            # log Σ exp(logits) = m + log Σ exp(logits − m), m the row max; e = exp(logits − m)
            # is computed once, in fp32, and serves both the loss and its gradient
            m = logits.amax(-1, keepdim=True).float()  # (c, 1)
            e = e_buf[:c].copy_(logits).sub_(m).exp_()  # (c, V)
            sum_e = e.sum(-1, keepdim=True)  # (c, 1)
            target_logit = logits.gather(1, t[:, None]).float()  # (c, 1)
            total += ((m + sum_e.log() - target_logit)[:, 0] * ok).sum()
            if want_h or want_w:
                # d(mean loss)/d(logits) = (softmax − onehot) / n = (e − sum_e·onehot) / (n·sum_e);
                # with every label ignored (n = 0) the rows' weights are 0 and so is the
                # gradient, as in the plain path (0/0 would be NaN); the loss is NaN in both
                e[torch.arange(c, device=t.device), t] -= sum_e[:, 0]
                g = logits_buf[:c].copy_(e.mul_(ok[:, None] / (n.clamp(min=1) * sum_e)))  # (c, V)
                if want_h:
                    grad_h[rows] = g @ weight  # (c, d)
                if want_w:
                    grad_w += (g.t() @ hc).float()  # (V, d)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss if grad_h is not None else None,
            (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- one-row products


class OneRowMatmuls:
    """`with OneRowMatmuls(rows, device):` on CPU, when a pass has one row, its matrix products
    skip oneDNN.

    Why: decoding one sequence multiplies a single row by every weight, so each weight is read
    once for 2 FLOPs and only memory bandwidth counts. On this project's CPU (the 0.5B's bf16
    weights, out of cache) oneDNN's kernel reads them at 23–31 GB/s and torch's own
    matrix-vector kernel at 44–51 GB/s, about as fast as a large copy: a decoding step takes
    28 ms instead of 52 (docs/speed.md). From two rows on oneDNN is faster, so the switch is on
    only for one row. The flag is process-wide (torch.backends.mkldnn), so it is put back on
    exit, an exception included. FLOPs and results are the same up to the rounding of the
    products' sums."""

    def __init__(self, rows: int, device: torch.device):
        self.on = rows == 1 and device.type == "cpu"

    def __enter__(self) -> None:
        if self.on:
            self.before = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False

    def __exit__(self, *exc) -> None:
        if self.on:
            torch.backends.mkldnn.enabled = self.before
