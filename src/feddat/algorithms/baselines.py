"""The controls FedDAT is compared with, all on the same bottleneck adapters and personal heads."""

from __future__ import annotations

import torch

from feddat.algorithms.base import LocalConfig, Method
from feddat.algorithms.losses import proximal_term, task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features


class FedAvgAdapter(Method):
    name = "fedavg-adapter"
    summary = "one shared adapter trained locally and averaged by the server (FedAvg + Adapter)"
    adapters = ("global",)
    trained = ("global",)
    shared = "global"
    predict_view = "student"


class FedAvgAdapter2x(FedAvgAdapter):
    name = "fedavg-adapter-2x"
    summary = "FedAvg + Adapter with twice the local epochs: as many optimiser steps per round as FedDAT"
    epochs_factor = 2


class FedProxAdapter(FedAvgAdapter):
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020) on the adapter: FedAvg + Adapter whose local loss adds mu/2 * ||adapter - global||^2,
    the global adapter being the one received this round. Sends the adapter; keeps the head."""

    name = "fedprox-adapter"
    summary = "FedAvg + Adapter with the proximal term mu/2 ||adapter - global||^2 in the local loss (FedProx)"

    def begin_round(self, model: AdaptedModel) -> None:
        self.anchor = [p.detach().clone() for p in model.adapter_parameters("global")]

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        model.set_view("student")
        loss_task = task_loss(head(pooled_features(model, batch)), batch["labels"])
        loss_prox = proximal_term(model.adapter_parameters("global"), self.anchor, cfg.fedprox_mu)
        opt.zero_grad(set_to_none=True)
        (loss_task + loss_prox).backward()
        opt.step()
        return {"loss": loss_task.item(), "prox": loss_prox.item()}


class LocalAdapter(Method):
    name = "local-adapter"
    summary = "a private adapter per client, no communication"
    adapters = ("local",)
    trained = ("local",)
    predict_view = "local"


class HeadOnly(Method):
    name = "head-only"
    summary = "a personal head on the frozen backbone, no adapter, no communication"
    predict_view = "none"
