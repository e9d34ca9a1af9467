"""Personalised-FL rivals of FedDAT on the same bottleneck adapters and personal heads.

All three send exactly what FedDAT sends, the global adapter (averaged by the server as in FedAvg), and differ
in what a client keeps and how it personalises:

- ditto-adapter: Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021). Sends the global adapter, trained on the task as in FedAvg; keeps a personal
  adapter trained on the task plus lambda/2 * ||personal - global||^2, the global adapter being the one
  received this round; predicts with the personal adapter.
- fedrep-adapter: FedRep (Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
  Personalized Federated Learning", ICML 2021). Sends the shared adapter (the representation); keeps only its
  head. Each round first trains the head with the adapter fixed (`fedrep_head_epochs` epochs), then the
  adapter with the head fixed (`local_epochs` epochs).
- apfl-adapter: APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv 2003.13461,
  2020). Sends the global adapter w, trained on the task as in FedAvg; keeps a local adapter v and a mixing
  weight alpha (`apfl.alpha`, private state). Predicts with the adapter whose parameters are
  alpha * v + (1 - alpha) * w; v and alpha follow the gradient of that mixed adapter's loss (w held fixed in
  it), alpha by plain SGD clipped to [0, 1].

The head is one per client; where a method trains two adapters (Ditto, APFL) it is shared by both views and
trained with both, as FedDAT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from feddat.algorithms.base import LocalConfig, Method, MethodConfig, State
from feddat.algorithms.losses import clipped_sgd_step, proximal_term, task_loss
from feddat.models.adapters import AdaptedModel, MixedParameters
from feddat.models.vl import AnswerHead, pooled_features
from feddat.settings import check, is_count, is_number, setting


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, inputs: list[torch.Tensor] | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=inputs)
    opt.step()


@dataclass(frozen=True)
class DittoConfig(MethodConfig):
    ditto_lambda: float = setting(0.1, "ditto-adapter: lambda of lambda/2 * ||personal - global||^2")

    def __post_init__(self) -> None:
        check(is_number(self.ditto_lambda) and self.ditto_lambda >= 0, "ditto_lambda", "a finite number >= 0",
              self.ditto_lambda)


@dataclass(frozen=True)
class FedRepConfig(MethodConfig):
    fedrep_head_epochs: int = setting(1, "fedrep-adapter: head-only epochs before the adapter's local epochs")

    def __post_init__(self) -> None:
        check(is_count(self.fedrep_head_epochs) and self.fedrep_head_epochs > 0, "fedrep_head_epochs",
              "a positive integer", self.fedrep_head_epochs)


@dataclass(frozen=True)
class APFLConfig(MethodConfig):
    apfl_alpha: float = setting(0.5, "apfl-adapter: initial weight of the local adapter in the mix, in [0, 1]")
    apfl_alpha_lr: float = setting(0.1, "apfl-adapter: SGD step size of the per-client alpha")

    def __post_init__(self) -> None:
        check(is_number(self.apfl_alpha) and 0 <= self.apfl_alpha <= 1, "apfl_alpha", "in [0, 1]", self.apfl_alpha)
        check(is_number(self.apfl_alpha_lr) and self.apfl_alpha_lr >= 0, "apfl_alpha_lr", "a finite number >= 0",
              self.apfl_alpha_lr)


class DittoAdapter(Method):
    name = "ditto-adapter"
    summary = ("Ditto: global adapter trained as in FedAvg; personal adapter (kept, predicts) trained on the task "
               "+ lambda/2 ||personal - global||^2")
    adapters = ("global", "local")
    trained = ("global", "local")
    shared = "global"
    predict_view = "local"
    report_views = ("student",)
    Config = DittoConfig

    def begin_round(self, model: AdaptedModel) -> None:
        # the proximal anchor is the global adapter as received, not as it moves during local training
        model.round_state["anchor"] = [p.detach().clone() for p in model.adapter_parameters("global")]

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        y = batch["labels"]
        # 1) global adapter: the task, as in FedAvg
        model.set_view("student")
        loss_global = task_loss(head(pooled_features(model, batch)), y)
        _step(opt, loss_global)

        # 2) personal adapter: the task, pulled towards the received global adapter
        model.set_view("local")
        loss_personal_task = task_loss(head(pooled_features(model, batch)), y)
        loss_prox = proximal_term(model.adapter_parameters("local"), model.round_state["anchor"],
                                  self.config.ditto_lambda)
        _step(opt, loss_personal_task + loss_prox)
        return {"loss": loss_personal_task.item(), "loss_global": loss_global.item(), "prox": loss_prox.item()}


class FedRepAdapter(Method):
    name = "fedrep-adapter"
    summary = ("FedRep: shared adapter + personal head; each round trains the head with the adapter fixed, "
               "then the adapter with the head fixed")
    adapters = ("global",)
    trained = ("global",)
    shared = "global"
    predict_view = "student"
    Config = FedRepConfig

    def local_epochs(self, cfg: LocalConfig) -> int:
        return self.config.fedrep_head_epochs + cfg.local_epochs

    def begin_epoch(self, model: AdaptedModel, epoch: int, cfg: LocalConfig) -> None:
        # "head": the head learns, the adapter is fixed; "adapter": the other way round
        model.round_state["phase"] = "head" if epoch < self.config.fedrep_head_epochs else "adapter"

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        model.set_view("student")
        if model.round_state.get("phase", "head") == "head":
            with torch.no_grad():  # the adapter gets no gradient, so AdamW leaves it exactly as it is
                features = pooled_features(model, batch)
            loss = task_loss(head(features), batch["labels"])
            _step(opt, loss)
        else:
            loss = task_loss(head(pooled_features(model, batch)), batch["labels"])
            _step(opt, loss, inputs=model.adapter_parameters("global"))
        return {"loss": loss.item()}


ALPHA = "apfl.alpha"


class APFLAdapter(Method):
    name = "apfl-adapter"
    summary = ("APFL: global adapter w trained as in FedAvg; local adapter v and per-client alpha (kept) "
               "trained through the mixed adapter alpha*v + (1-alpha)*w")
    adapters = ("global", "local")
    trained = ("global", "local")
    shared = "global"
    predict_view = "mixed"
    report_views = ("student", "local")
    views = {"mixed": MixedParameters("local", "global")}
    Config = APFLConfig

    def initial_private_state(self, cfg: LocalConfig) -> State:
        return {ALPHA: torch.tensor(float(self.config.apfl_alpha))}

    def load_private_state(self, model: AdaptedModel, state: State) -> None:
        like = model.adapter_parameters("local")[0]
        model.set_parameter_mix(state[ALPHA].detach().to(device=like.device, dtype=like.dtype).clone()
                                .requires_grad_(True))  # the client's alpha lives on its loaded model

    def private_state(self, model: AdaptedModel) -> State:
        return {ALPHA: model.mix_alpha.detach().clone()}

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        y = batch["labels"]
        # Both losses at the same point, one step (APFL's simultaneous update): w gets the gradient of its
        # own loss only (it enters the mix detached), v and alpha that of the mixed adapter's loss.
        model.set_view("student")
        loss_global = task_loss(head(pooled_features(model, batch)), y)
        model.set_view("mixed")
        loss_mixed = task_loss(head(pooled_features(model, batch)), y)
        alpha = model.mix_alpha
        alpha.grad = None
        _step(opt, loss_global + loss_mixed)
        with torch.no_grad():
            alpha.copy_(clipped_sgd_step(alpha, alpha.grad, self.config.apfl_alpha_lr))
        alpha.grad = None
        return {"loss": loss_mixed.item(), "loss_global": loss_global.item(), "alpha": alpha.item()}
