"""FedDAT: Dual-Adapter Teacher and Mutual Knowledge Distillation (Chen et al., AAAI 2024).

Each client carries a global adapter (travels), a local adapter (private) and a frozen copy of the
global adapter taken at the start of the round. The teacher view mixes local and frozen outputs 50/50.
"""

from __future__ import annotations

import torch

from feddat.algorithms.base import LocalConfig, Method
from feddat.algorithms.losses import kd_loss, task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features


class FedDAT(Method):
    name = "feddat"
    summary = "global adapter (sent) + local adapter + frozen global copy; DAT teacher, mutual distillation"
    adapters = ("global", "local", "global_frozen")
    trained = ("global", "local")
    shared = "global"
    predict_view = "teacher"
    report_views = ("student", "local")

    def begin_round(self, model: AdaptedModel) -> None:
        model.copy_adapter("global", "global_frozen")

    def prepare_eval(self, model: AdaptedModel, newest_global: bool) -> None:
        # Default: the teacher mixes the local adapter with the newest aggregate. The authors' code keeps
        # the copy taken at the start of the client's last round (newest_global=False keeps the stored one).
        if newest_global:
            model.copy_adapter("global", "global_frozen")

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        y, t = batch["labels"], cfg.kd_temperature
        # DAT encoder pass once, with gradient into the local adapter; it serves both sub-steps because
        # neither the backbone, the local adapter nor the frozen copy changes in the student sub-step.
        model.set_view("teacher")
        teacher_features = pooled_features(model, batch)
        with torch.no_grad():
            teacher_logits = head(teacher_features)

        # 1) student (global adapter) learns the task and the teacher.
        model.set_view("student")
        student_logits = head(pooled_features(model, batch))
        loss_student_task = task_loss(student_logits, y)
        loss_student_kd = kd_loss(student_logits, teacher_logits, t)
        loss_student = (loss_student_task + loss_student_kd) / 2
        opt.zero_grad(set_to_none=True)
        loss_student.backward()
        opt.step()

        # 2) teacher (local adapter, through the DAT) learns the task and the updated student.
        teacher_logits = head(teacher_features)  # the head as updated by sub-step 1
        loss_teacher_task = task_loss(teacher_logits, y)
        loss_teacher_kd = kd_loss(teacher_logits, student_logits.detach(), t)
        loss_teacher = (loss_teacher_task + loss_teacher_kd) / 2
        opt.zero_grad(set_to_none=True)
        loss_teacher.backward()
        opt.step()
        return {"loss": loss_teacher_task.item(), "loss_student": loss_student.item(),
                "loss_teacher": loss_teacher.item(), "kd_student": loss_student_kd.item(),
                "kd_teacher": loss_teacher_kd.item()}
