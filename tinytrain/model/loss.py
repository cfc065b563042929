"""Next-token cross-entropy from the last hidden states: plain, or a chunk of tokens at a time; with
``z_loss`` > 0, plus z_loss x mean(log Z ** 2), log Z the log-partition (logsumexp) of each token's
logits (PaLM's auxiliary loss: it keeps the output logits from drifting). With ``softcap`` > 0 the
logits are softcap x tanh(logits / softcap) first (Gemma 2's final-logit soft-capping)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap x tanh(logits / cap): every logit within (-cap, cap); ``cap`` 0 leaves them as they are."""
    return cap * torch.tanh(logits / cap) if cap else logits


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T) against targets, ``chunk`` rows at a time.

    Each chunk's gradients are computed in the forward pass (the loss is a scalar mean, so
    d loss / d logits = (softmax - onehot) / N is known then), so only one chunk of fp32 logits
    ever exists, instead of N x vocab for the whole batch, and nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                z_loss: float = 0.0, softcap: float = 0.0) -> torch.Tensor:
        n = hidden.size(0)
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]
            logits = soft_cap((h_c @ w.T).float(), softcap)  # (chunk, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            probs = torch.exp(logits - lse[:, None])
            if z_loss:
                total += z_loss * (lse ** 2).sum()
                probs *= 1.0 + 2.0 * z_loss * lse[:, None]  # d (z lse^2) / d logits = 2 z lse softmax
            probs[torch.arange(t_c.numel(), device=probs.device), t_c] -= 1.0
            probs /= n  # d mean-loss / d logits
            if softcap:  # d (c tanh(u / c)) / du = 1 - (capped / c) ** 2
                probs *= 1.0 - (logits / softcap) ** 2
            grad_hidden[start:start + chunk] = (probs.to(compute_dtype) @ w).to(hidden.dtype)
            grad_weight += (probs.to(compute_dtype).T @ h_c).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def logits_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                z_loss: float = 0.0, softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T (x: (B, T, d)), soft-capped at ``softcap`` when
    it is > 0, against targets (B, T), plus ``z_loss`` x mean(logsumexp ** 2). With ``chunk`` > 0,
    never holds fp32 logits for more than ``chunk`` tokens."""
    if chunk > 0:
        # (B, T, d) -> (B T, d): never materialises (B T, V) fp32 logits
        return ChunkedLinearCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten(), chunk, z_loss, softcap)
    logits = soft_cap(F.linear(x, weight).flatten(0, 1).float(), softcap)  # (B T, V)
    loss = F.cross_entropy(logits, targets.flatten())
    if z_loss:
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return loss


@torch.no_grad()
def token_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                 softcap: float = 0.0) -> torch.Tensor:
    """Cross-entropy at every position (B, T), fp32, of the logits x @ weight.T (x: (B, T, d)),
    soft-capped at ``softcap`` when it is > 0, ``chunk`` positions at a time (never the logits of a
    whole long sequence at once). No graph: for evaluation."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.size(1), chunk):
        logits = soft_cap((x[:, start:start + chunk] @ weight.t()).float(), softcap)
        out[:, start:start + chunk] = F.cross_entropy(logits.transpose(1, 2), targets[:, start:start + chunk],
                                                     reduction="none")
    return out
