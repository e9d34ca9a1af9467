"""Loss terms and scores as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """KD(p, q) = T^2 * KL(softmax(q/T) || softmax(p/T)), mean over the batch; p = student, q = teacher."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=-1)
    q = F.softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


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
