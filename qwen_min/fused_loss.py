"""The memory-saving loss behind `qwen_min.model.linear_cross_entropy`: an optimisation
detail kept out of the model file so that file reads as the architecture."""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h Wᵀ) against targets, `chunk_rows` rows at a time, with the
    gradients computed in the forward pass (see qwen_min.model.linear_cross_entropy, which also
    counts its FLOPs). Under autocast the products run in its dtype, the softmax in fp32.

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
                # d(mean loss)/d(logits) = (softmax − onehot) / n = (e − sum_e·onehot) / (n·sum_e)
                e[torch.arange(c, device=t.device), t] -= sum_e[:, 0]
                g = logits_buf[:c].copy_(e.mul_(ok[:, None] / (n * sum_e)))  # (c, V)
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
