"""Run configuration: one validated dataclass built by the CLI, config files and Flower's run config alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from feddat.algorithms.base import LocalConfig
from feddat.data.benchmarks import BENCHMARKS, Sizes
from feddat.errors import FedDATError

ENGINES = ("inprocess", "flower")
AGGREGATIONS = ("samples", "equal")


@dataclass
class RunConfig:
    benchmark: str = "domain"
    method: str = "feddat"
    rounds: int = 10
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr_adapter: float = 3e-3
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    kd_temperature: float = 3.0
    reduction: int = 4
    aggregation: str = "samples"        # FedAvg weights: local sample counts, or equal (as the authors' runs)
    eval_frozen: str = "newest"         # DAT at prediction: newest aggregate, or the copy from the last round
    eval_every: int = 1
    train_per_client: int = 400
    val_per_client: int = 200
    test_per_client: int = 1000
    engine: str = "inprocess"
    model_path: str | None = None       # None = the embedded backbone
    device: str = "cpu"
    threads: int = 0                    # torch intra-op threads; 0 = torch's default
    cache_dir: str | None = None        # benchmark cache; None = ~/.cache/feddat
    tracker: str | None = None          # experiment tracker: tensorboard, mlflow or wandb; None = none

    def validate(self) -> "RunConfig":
        from feddat.algorithms.registry import METHODS

        if self.benchmark not in BENCHMARKS:
            raise FedDATError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if self.method not in METHODS:
            raise FedDATError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)} "
                              "(`feddat methods` lists them)")
        for name in ("rounds", "local_epochs", "batch_size", "reduction", "eval_every", "train_per_client",
                     "val_per_client", "test_per_client"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FedDATError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr_adapter", "lr_head", "kd_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise FedDATError(f"{name.replace('_', '-')} must be a positive number, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < 1:
            raise FedDATError(f"weight-decay must be in [0, 1), got {self.weight_decay!r}")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            raise FedDATError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.aggregation not in AGGREGATIONS:
            raise FedDATError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.eval_frozen not in ("newest", "last_round"):
            raise FedDATError(f"eval-frozen must be 'newest' or 'last_round', got {self.eval_frozen!r}")
        if self.engine not in ENGINES:
            raise FedDATError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise FedDATError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise FedDATError(f"threads must be a non-negative integer, got {self.threads!r}")
        from feddat.eval.tracking import TRACKERS

        if self.tracker is not None and self.tracker not in TRACKERS:
            raise FedDATError(f"unknown tracker {self.tracker!r}; choose one of {', '.join(TRACKERS)} "
                              "(or leave it unset)")
        return self

    @property
    def sizes(self) -> Sizes:
        return Sizes(self.train_per_client, self.val_per_client, self.test_per_client)

    @property
    def local(self) -> LocalConfig:
        return LocalConfig(self.local_epochs, self.batch_size, self.lr_adapter, self.lr_head, self.weight_decay,
                           self.kd_temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise FedDATError(f"unknown config keys {unknown}; known keys: {', '.join(known)}")
        return cls(**values).validate()
