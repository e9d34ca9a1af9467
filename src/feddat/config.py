"""Run configuration: one validated dataclass built by the CLI, config files and Flower's run config alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from feddat.algorithms.base import LocalConfig
from feddat.data.benchmarks import BENCHMARKS, Sizes, resolve_sizes
from feddat.errors import FedDATError
from feddat.federation.aggregate import AGGREGATIONS, MEAN_RULES, bulyan_minimum, krum_minimum

ENGINES = ("inprocess", "flower")
PRECISIONS = ("fp32", "bf16")


@dataclass
class RunConfig:
    benchmark: str = "domain"
    clients: int = 0                    # take the benchmark's first N clients (a smaller federation); 0 = all
    clients_per_round: int | float = 0  # clients trained per round, drawn from seed and round: a count, or a
                                        # fraction in (0, 1] of the clients; 0 = all (docs/clients.md)
    partition: str = "natural"          # natural: the benchmark's own clients; iid, dirichlet, pathological: its
                                        # pooled records split over num-clients clients (feddat.data.partition)
    num_clients: int = 0                # clients of a partitioned benchmark (partition other than natural)
    partition_alpha: float = 0.5        # dirichlet: concentration of each answer's spread over the clients
    partition_classes: int = 2          # pathological: answers (classes) per client
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
    fused: bool = False                 # FedDAT: student and DAT views in one batched forward (same gradients,
                                        # docs/performance.md says when it is faster)
    precision: str = "fp32"             # fp32, or bf16: torch.autocast(bfloat16) around the forward passes of local
                                        # training and evaluation (docs/performance.md)
    compile: bool = False               # torch.compile the backbone the worker trains through
    prefix_cache_mb: int = 512          # memory for ViLT's frozen layers below the first adapter, run once per item
                                        # and kept (feddat.models.vl.PrefixCache; same results); 0 = off
    reduction: int = 16
    lr_backbone: float = 1e-4           # fedavg-full: learning rate of the backbone's own weights
    fedprox_mu: float = 0.01            # fedprox-adapter: mu/2 * ||adapter - global||^2
    ditto_lambda: float = 0.1           # ditto-adapter: lambda/2 * ||personal - global||^2
    fedrep_head_epochs: int = 1         # fedrep-adapter: head-only epochs before the adapter's local epochs
    apfl_alpha: float = 0.5             # apfl-adapter: initial weight of the local adapter in the mix
    apfl_alpha_lr: float = 0.1          # apfl-adapter: SGD step size of the per-client alpha
    lora_rank: int = 16                 # fedavg-lora: rank
    lora_alpha: float = 16.0            # fedavg-lora: scaling lora_alpha / lora_rank
    lora_targets: str = "query,value"   # fedavg-lora: comma-separated names of the linear layers it wraps
    prompt_tokens: int = 5              # fedavg-prompt: learned prompt tokens per modality
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
    secure_aggregation: bool = False    # Flower: SecAgg+ for the shared adapter (the server sees only the mean)
    eval_frozen: str = "newest"         # DAT at prediction: newest aggregate, or the copy from the last round
    eval_every: int = 1
    train_per_client: int = 0           # records per client in each split; 0 = the benchmark's default
    val_per_client: int = 0             # (feddat.data.benchmarks.default_sizes: 400 / 200 / 1000, Task's
    test_per_client: int = 0            # 200 / 100 / 500), filled in by validate()
    engine: str = "inprocess"
    model_path: str | None = None       # None = the embedded backbone
    backbone: str = "vilt"              # vilt (single-stream) or blip (dual-stream); both ship a small one
    device: str = "cpu"
    threads: int = 0                    # torch intra-op threads; 0 = torch's default
    cache_dir: str | None = None        # benchmark cache; None = ~/.cache/feddat
    data_dir: str | None = None         # the paper's real datasets, as they ship (docs/datasets.md); None =
                                        # the generated benchmark
    skip_bad_records: bool = False      # with data_dir: skip (and count) malformed records and unreadable images
    tracker: str | None = None          # experiment tracker: tensorboard, mlflow or wandb; None = none
    client_state_dir: str | None = None # where clients' private states live between their rounds, one file
                                        # per client (node-local; makes a Flower run resumable); None = in
                                        # memory up to 32 clients, else a temporary directory

    def validate(self) -> "RunConfig":
        from feddat.algorithms.registry import METHODS

        if self.benchmark not in BENCHMARKS:
            raise FedDATError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if self.data_dir is not None:
            from feddat.data.real import REAL_BENCHMARKS

            if self.benchmark not in REAL_BENCHMARKS:
                raise FedDATError(f"benchmark {self.benchmark!r} has no real-data form; with --data-dir choose one "
                                  f"of {', '.join(REAL_BENCHMARKS)}")
            if not isinstance(self.data_dir, str) or not Path(self.data_dir).is_dir():
                raise FedDATError(f"data-dir {self.data_dir!r} is not a directory")
        if not isinstance(self.skip_bad_records, bool):
            raise FedDATError(f"skip-bad-records must be true or false, got {self.skip_bad_records!r}")
        if self.method not in METHODS:
            raise FedDATError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)} "
                              "(`feddat methods` lists them)")
        sizes = resolve_sizes(self.benchmark, self.train_per_client, self.val_per_client, self.test_per_client)
        self.train_per_client, self.val_per_client, self.test_per_client = sizes.train, sizes.val, sizes.test
        for name in ("rounds", "local_epochs", "batch_size", "reduction", "eval_every", "train_per_client",
                     "val_per_client", "test_per_client",
                     "fedrep_head_epochs", "lora_rank", "prompt_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                zero = " (or 0: the benchmark's default)" if name.endswith("_per_client") else ""
                raise FedDATError(f"{name.replace('_', '-')} must be a positive integer{zero}, got {v!r}")
        for name in ("lr_adapter", "lr_head", "kd_temperature", "lr_backbone", "lora_alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise FedDATError(f"{name.replace('_', '-')} must be a positive number, got {v!r}")
        self._validate_method_knobs()
        self._validate_pooled()
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < 1:
            raise FedDATError(f"weight-decay must be in [0, 1), got {self.weight_decay!r}")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            raise FedDATError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        self._validate_server()
        if not isinstance(self.fused, bool):
            raise FedDATError(f"fused must be true or false, got {self.fused!r}")
        if self.precision not in PRECISIONS:
            raise FedDATError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise FedDATError(f"compile must be true or false, got {self.compile!r}")
        if not isinstance(self.prefix_cache_mb, int) or isinstance(self.prefix_cache_mb, bool) \
                or self.prefix_cache_mb < 0:
            raise FedDATError(f"prefix-cache-mb must be a whole number of MiB, 0 or more, got {self.prefix_cache_mb!r}")
        if self.eval_frozen not in ("newest", "last_round"):
            raise FedDATError(f"eval-frozen must be 'newest' or 'last_round', got {self.eval_frozen!r}")
        from feddat.models.backbone import BACKBONES

        if self.backbone not in BACKBONES:
            raise FedDATError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
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

    def _validate_method_knobs(self) -> None:
        """The knobs of the personalised and PEFT baselines (each read only by the method it names)."""
        import re

        for name in ("fedprox_mu", "ditto_lambda", "apfl_alpha_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
                raise FedDATError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.apfl_alpha, (int, float)) or isinstance(self.apfl_alpha, bool) \
                or not 0 <= self.apfl_alpha <= 1:
            raise FedDATError(f"apfl-alpha must be in [0, 1], got {self.apfl_alpha!r}")
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else []
        if not targets or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t.strip()) for t in targets):
            raise FedDATError("lora-targets must be comma-separated module names (e.g. 'query,value'), "
                              f"got {self.lora_targets!r}")

    def _validate_pooled(self) -> None:
        """A pooled reference (centralised-adapter) has one trainer and no federation to configure."""
        from feddat.algorithms.registry import METHODS

        if not METHODS[self.method].pooled:
            return
        conflicts = [what for what, on in (
            ("engine flower (nothing is federated: it runs in one process, --engine inprocess)",
             self.engine == "flower"),
            ("clients-per-round (every client's data is pooled every round)", bool(self.clients_per_round)),
            ("fault-injection (there are no client rounds to fail)", bool(self.fault_injection)),
            ("secure-aggregation (nothing is aggregated)", self.secure_aggregation is True)) if on]
        if conflicts:
            raise FedDATError(f"method {self.method} pools every client's raw data (a centralised reference, not "
                              "federated) and cannot go with " + "; ".join(conflicts))

    def _validate_server(self) -> None:
        """Aggregation, update screening, DP and fault handling (needs a known benchmark: its client count)."""
        from feddat.federation.faults import parse_faults

        self._validate_partition()
        total = len(self._all_client_names())
        if not isinstance(self.clients, int) or isinstance(self.clients, bool) or not 0 <= self.clients <= total:
            raise FedDATError(f"clients must be an integer from 1 to the benchmark's {total} clients (0 = all), "
                              f"got {self.clients!r}")
        names = self.client_names()
        self._validate_sampling(len(names))
        n = self.round_size()  # the updates a round aggregates
        if self.aggregation not in AGGREGATIONS:
            raise FedDATError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        for name in ("byzantine", "round_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FedDATError(f"{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if not isinstance(self.min_clients, int) or isinstance(self.min_clients, bool) or not 1 <= self.min_clients <= n:
            where = f"the {n} clients of a round (clients-per-round)" if self.samples_clients else \
                f"the benchmark's {n} clients"
            raise FedDATError(f"min-clients must be an integer from 1 to {where}, got {self.min_clients!r}")
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
        self._validate_secure_aggregation(n)

    def _validate_secure_aggregation(self, n: int) -> None:
        """SecAgg+ hands the server the mean only: what needs each client's update cannot go with it."""
        from feddat.algorithms.registry import METHODS

        if not isinstance(self.secure_aggregation, bool):
            raise FedDATError(f"secure-aggregation must be true or false, got {self.secure_aggregation!r}")
        if not self.secure_aggregation:
            return
        conflicts = [what for what, on in (
            (f"aggregation={self.aggregation} (secure aggregation computes a mean: samples or equal)",
             self.aggregation not in MEAN_RULES),
            ("max-update-norm (the server cannot screen updates it does not see)", self.max_update_norm > 0),
            ("dp-clip (central DP clips each update on the server)", self.dp_clip > 0),
            ("round-retries (a SecAgg+ round cannot take late answers)", self.round_retries > 0),
            (f"method {self.method} (it shares nothing to aggregate)",
             self.method in METHODS and not METHODS[self.method].shared),
            (f"{n} clients (SecAgg+ needs at least 3)", n < 3)) if on]
        if conflicts:
            raise FedDATError("secure-aggregation cannot go with " + "; ".join(conflicts))

    def _validate_partition(self) -> None:
        from feddat.data.partition import PARTITIONS

        if self.partition not in PARTITIONS:
            raise FedDATError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        if not isinstance(self.num_clients, int) or isinstance(self.num_clients, bool) or self.num_clients < 0:
            raise FedDATError(f"num-clients must be a non-negative integer, got {self.num_clients!r}")
        if self.partition == "natural" and self.num_clients:
            raise FedDATError(f"num-clients applies to a partitioned benchmark (partition iid, dirichlet or "
                              f"pathological); partition natural has the benchmark's own clients, got "
                              f"num-clients={self.num_clients}")
        if self.partition != "natural" and self.num_clients < 1:
            raise FedDATError(f"partition {self.partition} needs num-clients >= 1 (the clients the pooled records "
                              "are split over)")
        a = self.partition_alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 < a < float("inf"):
            raise FedDATError(f"partition-alpha must be a finite number > 0, got {a!r}")
        k = self.partition_classes
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise FedDATError(f"partition-classes must be a positive integer, got {k!r}")

    def _validate_sampling(self, n: int) -> None:
        k = self.clients_per_round
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise FedDATError(f"clients-per-round must be a count or a fraction in (0, 1], got {k!r}")
        if isinstance(k, int) and not 0 <= k <= n:
            raise FedDATError(f"clients-per-round must be a count from 1 to the run's {n} clients (0 = all), "
                              f"got {k}")
        if isinstance(k, float) and not 0 < k <= 1:
            raise FedDATError(f"clients-per-round as a fraction must be in (0, 1] (give a count as an integer), "
                              f"got {k!r}")
        if k and self.secure_aggregation:
            raise FedDATError("secure-aggregation cannot go with clients-per-round: its SecAgg+ rounds take every "
                              "client")

    def _all_client_names(self) -> list[str]:
        if self.partition == "natural" and self.data_dir:
            from feddat.data.real import real_clients

            return [c.name for _, c in real_clients(self.benchmark)]
        if self.partition == "natural":
            return [c.name for c in BENCHMARKS[self.benchmark]()]
        from feddat.data.partition import partition_client_names

        return partition_client_names(self.num_clients)

    def client_specs(self) -> list:
        """The benchmark's clients this run federates: all of them, or the first `clients`."""
        return BENCHMARKS[self.benchmark]()[:self.clients or None]

    def client_names(self) -> list[str]:
        """The names of the clients this run federates (a partitioned benchmark's too), in client order."""
        return self._all_client_names()[:self.clients or None]

    def round_size(self) -> int:
        """How many clients train in each round (`clients_per_round` resolved against the client count)."""
        from feddat.federation.sampling import round_size

        return round_size(len(self.client_names()), self.clients_per_round)

    @property
    def samples_clients(self) -> bool:
        """Whether rounds draw their clients (then every round records `sampled_clients`)."""
        return bool(self.clients_per_round)

    @property
    def partition_spec(self):
        """The benchmark's partition (feddat.data.partition.Partition), None for its own clients."""
        if self.partition == "natural":
            return None
        from feddat.data.partition import Partition

        return Partition(self.partition, self.num_clients, float(self.partition_alpha), self.partition_classes)

    @property
    def max_train_examples(self) -> int:
        """The most training examples one client can hold: the server caps a claimed FedAvg weight at it."""
        if self.partition == "natural":
            return self.train_per_client
        sources = len(BENCHMARKS[self.benchmark]())
        return sources * (self.train_per_client + self.val_per_client + self.test_per_client)

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0

    @property
    def sizes(self) -> Sizes:
        return Sizes(self.train_per_client, self.val_per_client, self.test_per_client)

    @property
    def local(self) -> LocalConfig:
        names = {f.name for f in fields(LocalConfig)}
        return LocalConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise FedDATError(f"unknown config keys {unknown}; known keys: {', '.join(known)}")
        return cls(**values).validate()
