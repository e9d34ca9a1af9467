"""FedDAT and FedAvg-adapter as the authors' code runs them: three behaviours the paper does not describe.

Read line by line from the authors' code (docs/method.md, "Where the authors' code departs from the paper"):

- `schedule`: the learning-rate schedule (linear warm-up over 10% of the horizon, then linear decay) is built
  anew for every client in every round, so it restarts from zero each round; its horizon is
  `authors_horizon_epochs` epochs of the client's data (the task configs' 15 to 20), so the warm-up is longer
  than the one epoch a round runs; and it advances after every optimiser step, twice per batch in FedDAT (one
  step per sub-step), once in FedAvg.
- `zero_grad`: their torch 1.10's `optimizer.zero_grad()` leaves zero tensors rather than None, so AdamW also
  moves the adapter a sub-step does not train (momentum and weight decay).
- `freeze_local`: their evaluation after round 0 switches `requires_grad` off on the local adapter of the model
  every later client copies, and the optimiser takes the parameters that require gradients: from round 1 on the
  local adapter never trains (the teacher is the round-0 local adapter plus the frozen global copy).

`feddat-authors` has all three; `feddat-authors-<departure>` one alone, to attribute a difference;
`fedavg-adapter-authors` is the adapter baseline with their schedule (stepped once per batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from feddat.algorithms.base import LocalConfig, MethodConfig

from feddat.algorithms.baselines import FedAvgAdapter
from feddat.algorithms.feddat import FedDAT, FedDATConfig
from feddat.errors import FedDATError
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features
from feddat.settings import check, is_count, setting

DEPARTURES = ("schedule", "zero_grad", "freeze_local")


def authors_lr_factor(step: int, horizon: int, warmup: float = 0.1) -> float:
    """transformers' `get_polynomial_decay_schedule_with_warmup` (power 1) after `step` scheduler steps: linear
    warm-up from 0 over `warmup * horizon` steps, then linear decay to 0 at `horizon`."""
    warm = int(warmup * horizon)
    if step < warm:
        return step / max(1, warm)
    return max(0.0, (horizon - step) / max(1, horizon - warm))


class AuthorsOptimizer(torch.optim.AdamW):
    """AdamW as the authors' code drives it: the learning rate follows `authors_lr_factor`, restarted when the
    optimiser is made (every round) and advanced after every `step()` (with `schedule`); `zero_grad` fills
    gradients with zeros rather than dropping them (with `zero_grad`), so a parameter that got a gradient once
    keeps taking AdamW steps (momentum, weight decay) in sub-steps that do not train it."""

    schedules_itself: bool

    def __init__(self, groups: list[dict], weight_decay: float, horizon: int, schedule: bool, zero_fill: bool):
        super().__init__(groups, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay)
        self.schedules_itself = schedule
        self.horizon, self.zero_fill, self.scheduler_steps = horizon, zero_fill, 0
        if schedule:
            self._set_lr()

    def _set_lr(self) -> None:
        factor = authors_lr_factor(self.scheduler_steps, self.horizon)
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self, closure=None):
        loss = super().step(closure)
        if self.schedules_itself:
            self.scheduler_steps += 1
            self._set_lr()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none and not self.zero_fill)


@dataclass(frozen=True)
class AuthorsConfig(MethodConfig):
    authors_horizon_epochs: int = setting(15, "the *-authors methods: horizon of their per-round schedule, in "
                                              "epochs of the client's data (the authors' task configs: 15 to 20)")

    def __post_init__(self) -> None:
        check(is_count(self.authors_horizon_epochs) and self.authors_horizon_epochs > 0, "authors_horizon_epochs",
              "a positive integer", self.authors_horizon_epochs)


@dataclass(frozen=True)
class FedDATAuthorsConfig(FedDATConfig, AuthorsConfig):
    def __post_init__(self) -> None:
        FedDATConfig.__post_init__(self)
        AuthorsConfig.__post_init__(self)


class Departures:
    """The authors' departures a method takes (`departures`), as the worker's hooks."""

    departures: ClassVar[tuple[str, ...]] = DEPARTURES

    def optimizer(self, groups: list[dict], cfg: LocalConfig, batches: int) -> torch.optim.Optimizer:
        if "zero_grad" in self.departures and getattr(self.config, "fused", False):
            raise FedDATError(f"{self.name} has no fused form: with zero-filled gradients the fused step's "
                              "deferred update of the global adapter is not the unfused one; drop --fused")
        horizon = self.config.authors_horizon_epochs * batches // max(1, self.local_epochs(cfg))
        return AuthorsOptimizer(groups, cfg.weight_decay, horizon, "schedule" in self.departures,
                                "zero_grad" in self.departures)

    def trained_in_round(self, round_idx: int) -> tuple[str, ...]:
        if "freeze_local" in self.departures and round_idx > 0:
            return tuple(name for name in self.trained if name != "local")
        return self.trained


class FedDATAuthors(Departures, FedDAT):
    name = "feddat-authors"
    summary = ("FedDAT as the authors' code runs it: per-round schedule stepped per sub-step, zero-filled "
               "gradients, local adapter frozen after round 0")
    Config = FedDATAuthorsConfig
    in_all = False   # a fidelity probe, named on its own

    def train_step(self, model: AdaptedModel, head: AnswerHead, batch: dict, opt: torch.optim.Optimizer,
                   cfg: LocalConfig) -> dict[str, float]:
        if "zero_grad" not in self.departures:
            return super().train_step(model, head, batch, opt, cfg)
        # With zero-filled gradients the student's optimiser step also moves the local adapter (momentum), so
        # the DAT cannot be reused across the sub-steps: the authors' three forwards, a fresh DAT for the second.
        y, t = batch["labels"], self.config.kd_temperature
        model.set_view(self.teacher_view)
        with torch.no_grad():
            teacher_logits = head(pooled_features(model, batch))
        model.set_view("student")
        student = self.sub_step("student", head(pooled_features(model, batch)), teacher_logits, y, t, opt)
        model.set_view(self.teacher_view)
        teacher = self.sub_step("teacher", head(pooled_features(model, batch)), student[0].detach(), y, t, opt)
        return self.step_losses(student, teacher)


class FedDATAuthorsSchedule(FedDATAuthors):
    name = "feddat-authors-schedule"
    summary = "FedDAT with the authors' schedule alone (restarted per round, stepped after each sub-step)"
    departures = ("schedule",)
    in_all = False


class FedDATAuthorsZeroGrad(FedDATAuthors):
    name = "feddat-authors-zerograd"
    summary = "FedDAT with the authors' zero-filled gradients alone (AdamW moves the untrained adapter too)"
    departures = ("zero_grad",)
    in_all = False


class FedDATAuthorsFreeze(FedDATAuthors):
    name = "feddat-authors-freeze"
    summary = "FedDAT with the authors' frozen local adapter alone (it trains in round 0 only)"
    departures = ("freeze_local",)
    in_all = False


class FedAvgAdapterAuthors(Departures, FedAvgAdapter):
    name = "fedavg-adapter-authors"
    summary = "FedAvg + Adapter with the authors' schedule (restarted per round, stepped once per batch)"
    departures = ("schedule",)
    Config = AuthorsConfig
    in_all = False
