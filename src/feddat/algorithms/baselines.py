"""The controls FedDAT is compared with, all on the same bottleneck adapters and personal heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from feddat.algorithms.base import LocalConfig, Method, MethodConfig
from feddat.algorithms.losses import proximal_term, task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features
from feddat.settings import check, is_number, setting


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


@dataclass(frozen=True)
class FedProxConfig(MethodConfig):
    fedprox_mu: float = setting(0.01, "fedprox-adapter: mu of the proximal term mu/2 * ||adapter - global||^2")

    def __post_init__(self) -> None:
        check(is_number(self.fedprox_mu) and self.fedprox_mu >= 0, "fedprox_mu", "a finite number >= 0",
              self.fedprox_mu)


class FedProxAdapter(FedAvgAdapter):
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020) on the adapter: FedAvg + Adapter whose local loss adds mu/2 * ||adapter - global||^2,
    the global adapter being the one received this round. Sends the adapter; keeps the head."""

    name = "fedprox-adapter"
    summary = "FedAvg + Adapter with the proximal term mu/2 ||adapter - global||^2 in the local loss (FedProx)"
    Config = FedProxConfig

    def begin_round(self, model: AdaptedModel) -> None:
        model.round_state["anchor"] = [p.detach().clone() for p in model.adapter_parameters("global")]

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        model.set_view("student")
        loss_task = task_loss(head(pooled_features(model, batch)), batch["labels"])
        loss_prox = proximal_term(model.adapter_parameters("global"), model.round_state["anchor"],
                                  self.config.fedprox_mu)
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
