"""The distillation loss: `w * KL(teacher || student) + (1 - w) * next-token CE`, averaged over positions."""

from __future__ import annotations

import torch


# Logits turned into loss and gradient at a time: 4 MB float32 temporaries, which stay in cache.
LOSS_CHUNK_ELEMENTS = 1 << 20


class _DistillationLoss(torch.autograd.Function):
    """`w * KL(p || q) + (1 - w) * CE(q, target)`, averaged over rows, with q = softmax(student logits) and p the
    teacher's distribution. The gradient, `(q - w p - (1 - w) onehot) / rows`, is computed in the forward pass and
    kept as the only saved tensor: no log-softmax is stored, nothing is computed twice. Rows are processed a few
    at a time so that the temporaries stay in cache."""

    @staticmethod
    def forward(ctx, logits, teacher_log_probs, targets, kl_weight: float):
        rows, vocab = logits.shape
        grad = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // vocab)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            z = logits[start:end].float()
            lse = z.logsumexp(dim=-1, keepdim=True)
            log_p = teacher_log_probs[start:end]
            p = log_p.exp()
            # KL = sum p (log p - log q), with log q = z - lse; one dot product over the chunk
            log_ratio = torch.sub(log_p, z).add_(lse)
            kl_sum += torch.dot(p.view(-1), log_ratio.view(-1)).double()
            del log_ratio
            index = targets[start:end].unsqueeze(1)
            ce_sum += (lse - z.gather(1, index)).sum(dtype=torch.float64)
            g = torch.sub(z, lse, out=grad[start:end]).exp_().sub_(p, alpha=kl_weight)
            g.scatter_add_(1, index, torch.full(index.shape, -(1.0 - kl_weight), dtype=g.dtype, device=g.device))
            g.div_(rows)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        kl, ce = kl_sum / rows, ce_sum / rows
        loss = (kl_weight * kl + (1.0 - kl_weight) * ce).to(torch.float32)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss).to(ctx.logits_dtype), None, None, None


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the last dimension, computed in place when `logits` already is float32 (for
    the teacher, whose logits are the largest tensor of the step and are needed no further)."""
    logits = logits.float()
    return logits.sub_(logits.logsumexp(dim=-1, keepdim=True))


def distillation_loss(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, targets: torch.LongTensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL(teacher || student), CE): all means over positions, `loss = kl_weight * KL + (1 - kl_weight) * CE`.

    Logits and float32 teacher log-probabilities (`log_softmax_`) are `[..., vocab]`, targets `[...]`.
    """
    vocab = student_logits.shape[-1]
    return _DistillationLoss.apply(
        student_logits.reshape(-1, vocab), teacher_log_probs.reshape(-1, vocab), targets.reshape(-1), kl_weight
    )
