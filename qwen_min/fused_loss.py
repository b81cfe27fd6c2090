"""The memory-saving loss behind `qwen_min.model.linear_cross_entropy`: an optimisation
detail kept out of the model file so that file reads as the architecture."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h Wᵀ) against targets, `chunk_rows` rows at a time, with the
    gradients computed in the forward pass (see qwen_min.model.linear_cross_entropy, which also
    counts its FLOPs). Autocast applies inside."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):  # h (N, d), weight (V, d), targets (N,)
        valid = targets != -100
        n = valid.sum()
        want_h, want_w = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = h.new_zeros((), dtype=torch.float32)
        if torch.is_autocast_enabled(h.device.type):  # cast the head once, not in every chunk
            weight = weight.to(torch.get_autocast_dtype(h.device.type))
        for s in range(0, h.shape[0], chunk_rows):
            rows = slice(s, s + chunk_rows)
            hc, ok = h[rows], valid[rows]
            t = targets[rows].clamp(min=0)  # ignored rows: any index, their weight below is 0
            logits = F.linear(hc, weight).float()  # (c, V)
            lse = logits.logsumexp(-1)  # (c,)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * ok).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(t), device=t.device), t] -= 1
                g *= (ok / n)[:, None]  # d(mean loss)/d(logits); (c, V)
                if want_h:
                    grad_h[rows] = g.to(weight.dtype) @ weight  # (c, d)
                if want_w:
                    grad_w += g.t().to(hc.dtype) @ hc  # (V, d)
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
