"""Run configuration: one validated dataclass built by the CLI, config files and Flower's run config alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from feddat.algorithms.base import LocalConfig
from feddat.data.benchmarks import BENCHMARKS, Sizes
from feddat.errors import FedDATError
from feddat.federation.aggregate import AGGREGATIONS, MEAN_RULES, bulyan_minimum, krum_minimum

ENGINES = ("inprocess", "flower")


@dataclass
class RunConfig:
    benchmark: str = "domain"
    method: str = "feddat"
    rounds: int = 10
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr_adapter: float = 1e-2
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    kd_temperature: float = 3.0
    reduction: int = 4
    aggregation: str = "samples"        # FedAvg weighted by local sample counts, or "equal" (as the authors'
                                        # runs); robust: median, trimmed-mean, krum, multi-krum, bulyan
    trim_fraction: float = 0.2          # trimmed-mean: drop int(f * n) smallest and largest values per coordinate
    byzantine: int = 1                  # krum, multi-krum, bulyan: hostile clients tolerated (f)
    max_update_norm: float = 0.0        # reject an update farther than this (L2) from the global adapter; 0 = off
    dp_clip: float = 0.0                # central DP: clip each update's change to this L2 norm; 0 = off
    dp_noise_multiplier: float = 0.0    # central DP: Gaussian noise std = multiplier * clip / n on the mean
    min_clients: int = 1                # a round needs this many usable client results, else retry or stop
    round_retries: int = 0              # re-ask the clients that gave no answer this many times per round
    round_timeout: float = 0.0          # seconds a client's answer may take; 0 = no limit (Flower: one hour)
    fault_injection: str = ""           # e.g. "crash:textured@2,scale:blurry=-10" (feddat.federation.faults)
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
    client_state_dir: str | None = None # Flower: where a node keeps its clients' private state after every
                                        # round (node-local), so that the run can be resumed; None = in memory

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
        self._validate_server()
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

    def _validate_server(self) -> None:
        """Aggregation, update screening, DP and fault handling (needs a known benchmark: its client count)."""
        from feddat.federation.faults import parse_faults

        names = [c.name for c in BENCHMARKS[self.benchmark]()]
        n = len(names)
        if self.aggregation not in AGGREGATIONS:
            raise FedDATError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        for name in ("byzantine", "round_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FedDATError(f"{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if not isinstance(self.min_clients, int) or isinstance(self.min_clients, bool) or not 1 <= self.min_clients <= n:
            raise FedDATError(f"min-clients must be an integer from 1 to the benchmark's {n} clients, "
                              f"got {self.min_clients!r}")
        for name in ("max_update_norm", "dp_clip", "dp_noise_multiplier", "round_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
                raise FedDATError(f"{name.replace('_', '-')} must be a finite number >= 0 (0 = off), got {v!r}")
        if not isinstance(self.trim_fraction, (int, float)) or not 0 <= self.trim_fraction < 0.5:
            raise FedDATError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        f = self.byzantine
        if self.aggregation == "trimmed-mean" and int(self.trim_fraction * n) < 1:
            raise FedDATError(f"trimmed-mean with trim-fraction {self.trim_fraction} trims nothing from {n} clients "
                              f"(int({self.trim_fraction} * {n}) = 0): use at least {1 / n:.3g}")
        if self.aggregation in ("krum", "multi-krum") and n < krum_minimum(f):
            raise FedDATError(f"{self.aggregation} needs n > 2f + 2 clients: {n} clients tolerate at most "
                              f"{max((n - 3) // 2, 0)} byzantine, got byzantine={f}")
        if self.aggregation == "bulyan" and n < bulyan_minimum(f):
            raise FedDATError(f"bulyan needs n >= 4f + 3 clients: {n} clients tolerate at most "
                              f"{(n - 3) // 4} byzantine, got byzantine={f}" if n >= 3 else
                              f"bulyan needs n >= 4f + 3 clients, the benchmark has {n}")
        if self.dp_noise_multiplier > 0 and self.dp_clip <= 0:
            raise FedDATError("dp-noise-multiplier needs dp-clip > 0: the noise is calibrated to the clipping norm")
        if self.dp_clip > 0 and self.aggregation not in MEAN_RULES:
            raise FedDATError(f"dp-clip works with the mean aggregations ({', '.join(MEAN_RULES)}), whose "
                              f"sensitivity to one client is bounded by the clip; got aggregation={self.aggregation}")
        if self.client_state_dir is not None and not isinstance(self.client_state_dir, str):
            raise FedDATError(f"client-state-dir must be a path, got {self.client_state_dir!r}")
        if not isinstance(self.fault_injection, str):
            raise FedDATError(f"fault-injection must be a string, got {self.fault_injection!r}")
        parse_faults(self.fault_injection, names, self.rounds)

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0

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
