"""Loss terms and scores as pure functions of tensors."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """KD(p, q) = T^2 * KL(softmax(q/T) || softmax(p/T)), mean over the batch; p = student, q = teacher."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=-1)
    q = F.softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], coef: float) -> torch.Tensor:
    """coef / 2 * sum_k ||p_k - a_k||^2 (FedProx's mu, Ditto's lambda); its gradient in p_k is coef * (p_k - a_k).
    The anchor (the global adapter received this round) is a constant."""
    if len(params) != len(anchor):
        raise ValueError(f"{len(params)} parameters but {len(anchor)} anchor tensors")
    total = sum(((p - a.detach()) ** 2).sum() for p, a in zip(params, anchor))
    return coef / 2 * total


def clipped_sgd_step(value: torch.Tensor, grad: torch.Tensor, lr: float, low: float = 0.0,
                     high: float = 1.0) -> torch.Tensor:
    """value - lr * grad, clipped to [low, high] (APFL's update of its mixing weight alpha)."""
    return (value - lr * grad).clamp(low, high)


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices; for soft VQA scores (float targets), BCE scaled by the answer count."""
    if targets.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[-1]
    return F.cross_entropy(logits, targets)


def scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-item score: accuracy for class indices (label -1 = answer outside the label space, always wrong),
    the VQA soft score of the predicted answer for float targets."""
    pred = logits.argmax(-1)
    if targets.is_floating_point():
        return targets.gather(-1, pred[:, None]).squeeze(-1)
    return (pred == targets).float()
