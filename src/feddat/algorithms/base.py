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
    fused: bool = False        # FedDAT: student and DAT views in one forward over the batch taken twice
    precision: str = "fp32"    # fp32, or bf16: the forward passes under torch.autocast(bfloat16)
    compile: bool = False      # torch.compile the backbone (feddat.federation.worker.Worker)
    prefix_cache_mb: int = 512   # memory for the frozen layers below the first adapter (models.vl.PrefixCache)
    lr_backbone: float = 1e-4           # full finetuning: the backbone's own weights
    fedprox_mu: float = 0.01            # FedProx: mu/2 * ||adapter - global||^2
    ditto_lambda: float = 0.1           # Ditto: lambda/2 * ||personal - global||^2
    fedrep_head_epochs: int = 1         # FedRep: head-only epochs before the adapter's epochs
    apfl_alpha: float = 0.5             # APFL: initial mixing weight of the local adapter
    apfl_alpha_lr: float = 0.1          # APFL: SGD step size of alpha
    lora_rank: int = 16
    lora_alpha: float = 16.0            # LoRA scaling = lora_alpha / lora_rank
    lora_targets: str = "query,value"   # comma-separated names of the linear layers LoRA wraps
    prompt_tokens: int = 5              # prompt tuning: learned tokens per modality


State = dict[str, torch.Tensor]


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
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
    def local_epochs(self, cfg: LocalConfig) -> int:
        return cfg.local_epochs * self.epochs_factor

    def begin_epoch(self, epoch: int, cfg: LocalConfig) -> None:
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
        adapter_params = [p for name in self.trained for p in model.adapter_parameters(name)]
        groups = [{"params": list(head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head}]
        if adapter_params:
            groups.append({"params": adapter_params, "lr": cfg.lr_adapter, "base_lr": cfg.lr_adapter})
        return groups
