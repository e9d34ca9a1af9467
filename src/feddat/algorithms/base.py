"""The one interface every federated method implements, engine-agnostic.

A method says which named adapters a client carries, which one travels (`shared`), how one local
mini-batch is trained, and which view predicts. Everything else (rounds, aggregation, evaluation,
engines) is shared code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from feddat.algorithms.losses import task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features


@dataclass(frozen=True)
class LocalConfig:
    """Knobs of local training; every method reads the ones it needs."""

    local_epochs: int = 1
    batch_size: int = 32
    lr_adapter: float = 3e-3
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    kd_temperature: float = 3.0


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    adapters: ClassVar[tuple[str, ...]] = ()     # named adapters a client model carries
    trained: ClassVar[tuple[str, ...]] = ()      # those trained locally
    shared: ClassVar[str | None] = None          # the adapter that travels to the server, if any
    predict_view: ClassVar[str] = "none"         # the view whose predictions are scored
    report_views: ClassVar[tuple[str, ...]] = () # further views scored for information
    epochs_factor: ClassVar[int] = 1             # local epochs multiplier (compute-matched controls)

    def begin_round(self, model: AdaptedModel) -> None:
        """Called after the newest global adapter is loaded and before local training."""

    def prepare_eval(self, model: AdaptedModel, newest_global: bool) -> None:
        """Called before scoring, with the newest aggregate loaded into the shared adapter."""

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        """One mini-batch: forward, losses, optimiser step(s). Returns named loss values."""
        model.set_view(self.predict_view)
        logits = head(pooled_features(model, batch))
        loss = task_loss(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    def param_groups(self, model: AdaptedModel, head: AnswerHead, cfg: LocalConfig) -> list[dict]:
        adapter_params = [p for name in self.trained for p in model.adapter_parameters(name)]
        groups = [{"params": list(head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head}]
        if adapter_params:
            groups.append({"params": adapter_params, "lr": cfg.lr_adapter, "base_lr": cfg.lr_adapter})
        return groups
