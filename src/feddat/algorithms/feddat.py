"""FedDAT: Dual-Adapter Teacher and Mutual Knowledge Distillation (Chen et al., AAAI 2024).

Each client carries a global adapter (travels), a local adapter (private) and a frozen copy of the
global adapter taken at the start of the round. The teacher view mixes local and frozen outputs 50/50.

The ablations (feddat.algorithms.ablations) are this class with one piece changed: the teacher's view
(`teacher_view`: the frozen copy alone, or the local adapter alone) or the losses (`kd_into`: the sub-steps
whose loss adds the distillation term; in the others the adapter learns the task alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from feddat.algorithms.base import LocalConfig, Method, MethodConfig
from feddat.algorithms.losses import kd_loss, task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features_of_views
from feddat.settings import check, is_number, setting


@dataclass(frozen=True)
class FedDATConfig(MethodConfig):
    kd_temperature: float = setting(3.0, "FedDAT: temperature of the distillation's softened predictions")
    fused: bool = setting(False, "FedDAT: student and DAT views in one batched forward (same gradients; "
                                 "docs/performance.md says when it is faster)")

    def __post_init__(self) -> None:
        check(is_number(self.kd_temperature) and self.kd_temperature > 0, "kd_temperature", "a positive number",
              self.kd_temperature)
        check(isinstance(self.fused, bool), "fused", "true or false", self.fused)


class FedDAT(Method):
    name = "feddat"
    summary = "global adapter (sent) + local adapter + frozen global copy; DAT teacher, mutual distillation"
    adapters = ("global", "local", "global_frozen")
    trained = ("global", "local")
    shared = "global"
    predict_view = "teacher"
    report_views = ("student", "local")
    views = {"teacher": (("local", 0.5), ("global_frozen", 0.5))}   # the Dual-Adapter Teacher
    Config = FedDATConfig
    config: FedDATConfig
    teacher_view: ClassVar[str] = "teacher"   # the view that teaches the student (the DAT)
    # The sub-steps whose loss is (task + KD) / 2, the others' the task alone: "student" (the DAT teaches the
    # global adapter) and "teacher" (the student teaches the DAT, so its local adapter); both is mutual.
    kd_into: ClassVar[tuple[str, ...]] = ("student", "teacher")

    def mkd_loss(self, task: torch.Tensor, kd: torch.Tensor, sub_step: str) -> torch.Tensor:
        return (task + kd) / 2 if sub_step in self.kd_into else task

    def begin_round(self, model: AdaptedModel) -> None:
        if "global_frozen" in self.adapters:
            model.copy_adapter("global", "global_frozen")

    def prepare_eval(self, model: AdaptedModel, newest_global: bool) -> None:
        # Default: the teacher mixes the local adapter with the newest aggregate. The authors' code keeps
        # the copy taken at the start of the client's last round (newest_global=False keeps the stored one).
        if newest_global and "global_frozen" in self.adapters:
            model.copy_adapter("global", "global_frozen")

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        if self.config.fused:
            return self.fused_train_step(model, head, batch, opt, cfg)
        y, t = batch["labels"], self.config.kd_temperature
        # DAT encoder pass once, with gradient into the local adapter; it serves both sub-steps because
        # neither the backbone, the local adapter nor the frozen copy changes in the student sub-step.
        # The student's pass shares with it the frozen layers before the first adapter.
        teacher_features, student_features = pooled_features_of_views(model, batch, (self.teacher_view, "student"))
        with torch.no_grad():
            teacher_logits = head(teacher_features)
        # 1) student (global adapter) learns the task and the teacher; 2) teacher (local adapter, through the
        # DAT) learns the task and the updated student, through the head as updated by sub-step 1.
        student = self.sub_step("student", head(student_features), teacher_logits, y, t, opt)
        teacher = self.sub_step("teacher", head(teacher_features), student[0].detach(), y, t, opt)
        return self.step_losses(student, teacher)

    def sub_step(self, which: str, logits: torch.Tensor, target_logits: torch.Tensor, y: torch.Tensor, t: float,
                 opt: torch.optim.Optimizer) -> tuple[torch.Tensor, ...]:
        """One optimiser step on `which`'s loss (task, plus distillation towards `target_logits` where MKD goes
        into it); returns (logits, task loss, KD loss, loss)."""
        task = task_loss(logits, y)
        kd = kd_loss(logits, target_logits, t)
        loss = self.mkd_loss(task, kd, which)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return logits, task, kd, loss

    @staticmethod
    def step_losses(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> dict[str, float]:
        return {"loss": teacher[1].item(), "loss_student": student[3].item(), "loss_teacher": teacher[3].item(),
                "kd_student": student[2].item(), "kd_teacher": teacher[2].item()}

    def fused_train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                         cfg: LocalConfig) -> dict[str, float]:
        """`train_step` with the student and the DAT side by side in one pass over the batch taken twice (after
        the frozen first layer, run once), and one backward through the encoder.

        The student's loss is differentiated through the head alone at first: the head steps, and the
        gradient the loss sends into the student's features waits for the one backward through the encoder,
        taken with the teacher's loss. So the global adapter steps in the second optimiser step rather than
        the first, with the same gradient and learning rate; with `zero_grad(set_to_none=True)` AdamW and SGD
        skip it in the first and the result is the unfused step's (nothing in the teacher sub-step depends on
        the global adapter).
        """
        y, t = batch["labels"], self.config.kd_temperature
        student_features, teacher_features = pooled_features_of_views(model, batch, ("student", self.teacher_view),
                                                                      stacked=True)
        with torch.no_grad():
            teacher_logits = head(teacher_features)

        # 1) student: the head steps now, the global adapter with the teacher's backward below.
        student_cut = student_features.detach().requires_grad_()
        student_logits = head(student_cut)
        loss_student_task = task_loss(student_logits, y)
        loss_student_kd = kd_loss(student_logits, teacher_logits, t)
        loss_student = self.mkd_loss(loss_student_task, loss_student_kd, "student")
        opt.zero_grad(set_to_none=True)
        loss_student.backward()
        opt.step()

        # 2) teacher, plus the student's gradient through the encoder: one backward over the doubled batch.
        teacher_logits = head(teacher_features)
        loss_teacher_task = task_loss(teacher_logits, y)
        loss_teacher_kd = kd_loss(teacher_logits, student_logits.detach(), t)
        loss_teacher = self.mkd_loss(loss_teacher_task, loss_teacher_kd, "teacher")
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward((loss_teacher, student_features), (None, student_cut.grad))
        opt.step()
        return {"loss": loss_teacher_task.item(), "loss_student": loss_student.item(),
                "loss_teacher": loss_teacher.item(), "kd_student": loss_student_kd.item(),
                "kd_teacher": loss_teacher_kd.item()}
