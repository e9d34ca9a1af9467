"""The one interface every federated method implements, engine-agnostic.

A method says which named adapters a client carries, what travels (`shared`: one of its adapters, or a named
set of other tensors such as backbone biases or LoRA weights, `shared_state`), what else a client keeps
(`private_state`, beside its private adapters and head), how one local mini-batch is trained, and which view
predicts. Everything else (rounds, aggregation, evaluation, engines) is shared code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from feddat.algorithms.losses import task_loss
from feddat.models.adapters import AdaptedModel, View
from feddat.models.vl import AnswerHead, pooled_features
from feddat.settings import check, is_count, is_number, setting


@dataclass(frozen=True)
class LocalConfig:
    """How a client trains locally, whatever the method (the run config's `train` section)."""

    local_epochs: int = setting(1, "local epochs per round")
    batch_size: int = setting(32, "local mini-batch size")
    lr_adapter: float = setting(1e-2, "peak learning rate of what a method trains (adapters, LoRA, prompts, "
                                      "biases)")
    lr_head: float = setting(1e-3, "peak learning rate of the personal answer head")
    weight_decay: float = setting(0.01, "AdamW weight decay, in [0, 1)")
    warmup: float = setting(0.1, "fraction of the whole run spent warming the learning rate up, then linear "
                                 "decay to zero")
    precision: str = setting("fp32", "forward passes in fp32, or under torch.autocast(bfloat16) (bf16)",
                             choices=("fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the backbone's layers the worker trains through")
    prefix_cache_mb: int = setting(512, "MiB for ViLT's frozen layers below the first adapter, run once per "
                                        "item and kept (same results); 0 = off")

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size"):
            check(is_count(getattr(self, name)) and getattr(self, name) > 0, name, "a positive integer",
                  getattr(self, name))
        for name in ("lr_adapter", "lr_head"):
            check(is_number(getattr(self, name)) and getattr(self, name) > 0, name, "a positive number",
                  getattr(self, name))
        check(is_number(self.weight_decay) and 0 <= self.weight_decay < 1, "weight_decay", "in [0, 1)",
              self.weight_decay)
        check(is_number(self.warmup) and 0 <= self.warmup < 1, "warmup", "a fraction in [0, 1)", self.warmup)
        check(self.precision in ("fp32", "bf16"), "precision", "one of fp32, bf16", self.precision)
        check(isinstance(self.compile, bool), "compile", "true or false", self.compile)
        check(is_count(self.prefix_cache_mb) and self.prefix_cache_mb >= 0, "prefix_cache_mb",
              "a whole number of MiB, 0 or more", self.prefix_cache_mb)


@dataclass(frozen=True)
class MethodConfig:
    """A method's own settings. A method with settings declares a subclass beside its code (fields made with
    `setting`, checked in `__post_init__`) as its `Config`; field names are run-config keys (`--ditto-lambda`),
    so they are unique across methods, and every method that shares one means the same by it."""


State = dict[str, torch.Tensor]


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig   # the method's own settings
    views: ClassVar[dict[str, View]] = {}        # views beyond the base ones (models.adapters.BASE_VIEWS)
    adapters: ClassVar[tuple[str, ...]] = ()     # named adapters a client model carries
    trained: ClassVar[tuple[str, ...]] = ()      # those trained locally
    shared: ClassVar[str | None] = None          # the adapter that travels to the server, if any
    predict_view: ClassVar[str] = "none"         # the view whose predictions are scored
    report_views: ClassVar[tuple[str, ...]] = () # further views scored for information
    epochs_factor: ClassVar[int] = 1             # local epochs multiplier (compute-matched controls)
    in_all: ClassVar[bool] = True                # in `--methods all` (False: a probe, named on its own)
    modifies_backbone: ClassVar[bool] = False    # trains or hooks the backbone: the worker gives it its own copy
    pooled: ClassVar[bool] = False               # trains on every client's data pooled (a reference, not
                                                 # federated): its driver walks the pooled data

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(self.config).__name__}")

    # ----- what a client model carries -----
    def attach(self, model: AdaptedModel, cfg: LocalConfig) -> None:
        """Add what the method trains beyond the named adapters (LoRA layers, prompts, trainable backbone
        tensors); called once per worker, before the model is moved to its device."""

    @property
    def shares_adapter(self) -> bool:
        return self.shared is not None and self.shared in self.adapters

    @property
    def shared_prefix(self) -> str:
        """How the shared tensors' keys are prefixed in a saved client model."""
        return f"adapter.{self.shared}." if self.shares_adapter else f"{self.shared}."

    def shared_state(self, model: AdaptedModel) -> State:
        """The update: detached copies of exactly the tensors that travel (empty when nothing does)."""
        return model.adapter_state(self.shared) if self.shared else {}

    def load_shared_state(self, model: AdaptedModel, state: State) -> None:
        model.load_adapter_state(self.shared, state)

    def initial_shared_state(self, model: AdaptedModel, seed: int) -> State:
        """The server's starting point for shared tensors that are not a named adapter (the worker draws a
        fresh adapter otherwise); the same on every process for the same seed."""
        raise NotImplementedError(f"{self.name} shares {self.shared!r} but does not say where it starts")

    def initial_private_state(self, cfg: LocalConfig) -> State:
        """A new client's private tensors beyond its private adapters and head, keyed '<method>.<name>'."""
        return {}

    def private_state(self, model: AdaptedModel) -> State:
        """Detached copies of the private tensors of `initial_private_state`, as trained."""
        return {}

    def load_private_state(self, model: AdaptedModel, state: State) -> None:
        """Take the client's private tensors from its state (which also holds its adapters and head)."""

    # ----- local training -----
    def trained_in_round(self, round_idx: int) -> tuple[str, ...]:
        """The named adapters that train in round `round_idx` (from 0): `trained`, unless a method freezes some."""
        return self.trained

    def optimizer(self, groups: list[dict], cfg: LocalConfig, batches: int) -> torch.optim.Optimizer:
        """The optimiser of one client's round over `batches` mini-batches. The worker sets each group's
        learning rate before every batch from the run's schedule (`base_lr` times the warm-up/decay factor)
        unless the optimiser says it schedules itself (`schedules_itself = True`)."""
        return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)

    def local_epochs(self, cfg: LocalConfig) -> int:
        return cfg.local_epochs * self.epochs_factor

    def begin_epoch(self, model: AdaptedModel, epoch: int, cfg: LocalConfig) -> None:
        """Called before each local epoch (counted from 0 within the round)."""

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
        adapter_params = [p for name in self.trained for p in model.adapter_parameters(name) if p.requires_grad]
        groups = [{"params": list(head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head}]
        if adapter_params:
            groups.append({"params": adapter_params, "lr": cfg.lr_adapter, "base_lr": cfg.lr_adapter})
        return groups
