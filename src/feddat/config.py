"""Run configuration: typed sections, one parser of `key=value` text and one of files, one source of defaults.

To the user a run's config is flat (`--lr-adapter 0.01`, `lr-adapter = 0.01` in Flower's run config, `lr_adapter`
in results.json); inside it is grouped in sections, each a dataclass whose fields carry their default and help
and which checks itself when built: data, model, train (`LocalConfig`, how a client trains), method (the method's
name and every method's own settings, declared beside each method), federation (the server's round), privacy
(robustness, DP, secure aggregation), eval and runtime. `RunConfig` is the union of the sections' fields, built
from them so that a default lives in one place; `validate()` builds every section (each checks its own values)
and then checks what involves several. The command line, `--config` files (JSON or TOML, flat or by section),
Flower's run config, `deploy`, `compare` and `tune` all read values through `parse_pairs`/`read_config_file`
and `RunConfig.from_values`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from dataclasses import Field, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from feddat.algorithms.base import LocalConfig
from feddat.algorithms.registry import METHODS, method_config, method_settings
from feddat.data.benchmarks import BENCHMARKS, resolve_sizes, sizes_help
from feddat.data.folders import check_unique_names, client_dirs, parse_columns
from feddat.data.partition import PARTITIONS, Partition, partition_client_names
from feddat.data.real import REAL_BENCHMARKS, real_clients
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError
from feddat.fault_spec import parse_faults
from feddat.models.backbone import BACKBONES
from feddat.settings import check, is_count, is_number, setting

ENGINES = ("inprocess", "flower")
MEAN_RULES = ("samples", "equal")
ROBUST_RULES = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan")
AGGREGATIONS = MEAN_RULES + ROBUST_RULES
TRACKERS = ("tensorboard", "mlflow", "wandb")


def krum_minimum(byzantine: int) -> int:
    """Krum's requirement n > 2f + 2 as a least number of updates."""
    return 2 * byzantine + 3


def bulyan_minimum(byzantine: int) -> int:
    """Bulyan's requirement n >= 4f + 3."""
    return 4 * byzantine + 3


def round_size(n_clients: int, clients_per_round: int | float) -> int:
    """Clients per round: all (0), a count (int), or a fraction of `n_clients` (float in (0, 1], rounded to the
    nearest count, at least one)."""
    if not clients_per_round:
        return n_clients
    if isinstance(clients_per_round, float):
        return min(n_clients, max(1, math.floor(clients_per_round * n_clients + 0.5)))
    return min(n_clients, int(clients_per_round))


def _finite_non_negative(self, *names: str, off: bool = False) -> None:
    for name in names:
        v = getattr(self, name)
        check(is_number(v) and v >= 0, name, "a finite number >= 0" + (" (0 = off)" if off else ""), v)


def _path_or_none(self, *names: str) -> None:
    for name in names:
        v = getattr(self, name)
        check(v is None or isinstance(v, str), name, "a path (or unset)", v)


# ----- the sections -----
@dataclass(frozen=True)
class DataConfig:
    """What the clients' data are."""

    benchmark: str = setting("domain", "the benchmark the clients come from", choices=tuple(BENCHMARKS))
    clients: int = setting(0, "take the benchmark's first N clients (a smaller federation); 0 = all")
    partition: str = setting("natural", "natural: the benchmark's own clients (or one per folder); iid, "
                                        "dirichlet, pathological: its pooled records (or your folders' items) split "
                                        "over num-clients clients", choices=PARTITIONS)
    num_clients: int = setting(0, "clients of a partitioned benchmark (partition other than natural)")
    partition_alpha: float = setting(0.5, "dirichlet: concentration of each answer's spread over the clients")
    partition_classes: int = setting(2, "pathological: answers (classes) per client")
    train_per_client: int = setting(0, f"training records per client; 0 = the benchmark's ({sizes_help()})")
    val_per_client: int = setting(0, "validation records per client; 0 = the benchmark's")
    test_per_client: int = setting(0, "test records per client; 0 = the benchmark's")
    data_dir: str | None = setting(None, "the paper's real datasets, as they ship (docs/datasets.md); unset = "
                                         "the generated benchmark")
    skip_bad_records: bool = setting(False, "with data-dir: skip (and count) malformed records and unreadable "
                                            "images instead of stopping")
    cache_dir: str | None = setting(None, "where generated benchmarks are cached; unset = ~/.cache/feddat "
                                          "(or $FEDDAT_CACHE)")
    clients_dir: str | None = setting(None, "your own data: a folder of client folders, each a client named by "
                                            "its folder (docs/own-data.md); unset = the benchmark")
    client_data: str = setting("", "your own data, client by client: NAME=PATH pairs separated by commas "
                                   "(the command line's repeatable --client NAME=PATH)")
    columns: str = setting("", "with your own data: how its columns map to ours, e.g. image=img,question=q,"
                               "answer=label")
    nodes: int = setting(0, "a deployment where every SuperNode brings its own client folder (node config "
                            "data=PATH): the server waits for this many and holds no data; 0 = clients from the "
                            "benchmark or the folders above")

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise FedDATError(f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if self.data_dir is not None:
            if self.benchmark not in REAL_BENCHMARKS:
                raise FedDATError(f"benchmark {self.benchmark!r} has no real-data form; with --data-dir choose one "
                                  f"of {', '.join(REAL_BENCHMARKS)}")
            if not isinstance(self.data_dir, str) or not Path(self.data_dir).is_dir():
                raise FedDATError(f"data-dir {self.data_dir!r} is not a directory")
        check(isinstance(self.skip_bad_records, bool), "skip_bad_records", "true or false", self.skip_bad_records)
        for name in ("train_per_client", "val_per_client", "test_per_client"):
            v = getattr(self, name)
            check(is_count(v) and v > 0, name, "a positive integer (or 0: the benchmark's default)", v)
        if self.partition not in PARTITIONS:
            raise FedDATError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        check(is_count(self.num_clients) and self.num_clients >= 0, "num_clients", "a non-negative integer",
              self.num_clients)
        if self.partition == "natural" and self.num_clients:
            raise FedDATError(f"num-clients applies to a partitioned benchmark (partition iid, dirichlet or "
                              f"pathological); partition natural has the benchmark's own clients, got "
                              f"num-clients={self.num_clients}")
        if self.partition != "natural" and self.num_clients < 1:
            raise FedDATError(f"partition {self.partition} needs num-clients >= 1 (the clients the pooled records "
                              "are split over)")
        check(is_number(self.partition_alpha) and self.partition_alpha > 0, "partition_alpha",
              "a finite number > 0", self.partition_alpha)
        check(is_count(self.partition_classes) and self.partition_classes >= 1, "partition_classes",
              "a positive integer", self.partition_classes)
        _path_or_none(self, "cache_dir", "clients_dir")
        check(isinstance(self.client_data, str) and isinstance(self.columns, str), "client_data",
              "NAME=PATH pairs separated by commas", self.client_data)
        if self.own_data:
            if self.clients_dir and self.client_data:
                raise FedDATError("clients-dir cannot go with client: give the clients as one folder of folders "
                                  "(clients-dir) or one by one (client NAME=PATH, repeated)")
            if self.data_dir:
                raise FedDATError("your own client folders (clients-dir, client) cannot go with data-dir, which "
                                  "reads the paper's datasets for a benchmark")
            parse_columns(self.columns)
        check(is_count(self.nodes) and self.nodes >= 0, "nodes", "a non-negative integer (0 = off)", self.nodes)
        if self.nodes:
            given = [what for what, on in (("data-dir", self.data_dir), ("partition " + self.partition,
                                                                        self.partition != "natural"),
                                           ("clients", self.clients), ("clients-dir", self.clients_dir)) if on]
            if given:
                raise FedDATError("with nodes (each SuperNode brings its own data) the server names no data: drop "
                                  + ", ".join(given))
            return
        total = len(all_client_names(self))
        check(is_count(self.clients) and 0 <= self.clients <= total, "clients",
              f"an integer from 1 to the benchmark's {total} clients (0 = all)", self.clients)

    @property
    def own_data(self) -> bool:
        return uses_own_data(self)


# What the data section's fields say about the clients; a DataConfig and a RunConfig both have those fields.
def uses_own_data(d) -> bool:
    """Whether the clients are the user's own folders (clients-dir or client) rather than a benchmark's."""
    return bool(d.clients_dir or d.client_data)


def client_folders(d) -> list[tuple[str, Path]]:
    """(name, folder) of every own-data client, in client order (folder names sorted, or as given)."""
    if d.clients_dir:
        return client_dirs(d.clients_dir)
    return check_unique_names(p for p in d.client_data.split(",") if p.strip())


def all_client_names(d) -> list[str]:
    """Every client: the own folders', or a benchmark's (its own, or a partition's of its pooled records). With
    `nodes` the server knows no client before the SuperNodes report: [] (a node knows its own one: client-data)."""
    if uses_own_data(d):
        if d.partition != "natural":  # the folders' items pooled and split over num-clients clients
            return partition_client_names(d.num_clients)
        return [name for name, _ in client_folders(d)]
    if d.nodes:
        return []
    if d.partition == "natural" and d.data_dir:
        return [c.name for _, c in real_clients(d.benchmark)]
    if d.partition == "natural":
        return [c.name for c in BENCHMARKS[d.benchmark]()]
    return partition_client_names(d.num_clients)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen backbone and the adapters' size."""

    backbone: str = setting("vilt", "vilt (single-stream) or blip (dual-stream); both ship a small one",
                            choices=BACKBONES)
    model_path: str | None = setting(None, "a checkpoint directory (save_pretrained layout) or hub id; unset = "
                                           "the embedded small backbone")
    reduction: int = setting(16, "adapter bottleneck = hidden size / reduction")

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise FedDATError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        _path_or_none(self, "model_path")
        check(is_count(self.reduction) and self.reduction > 0, "reduction", "a positive integer", self.reduction)


@dataclass(frozen=True)
class MethodSection:
    """The method by name; each method's own settings are fields of its config class (`feddat methods`)."""

    method: str = setting("feddat", "the federated method (`feddat methods` lists them)", choices=tuple(METHODS))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FedDATError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)} "
                              "(`feddat methods` lists them)")


@dataclass(frozen=True)
class FederationConfig:
    """The server's rounds: how many, who trains, how their updates are combined and what a round needs."""

    rounds: int = setting(10, "communication rounds")
    clients_per_round: int | float = setting(0, "clients trained per round, drawn from seed and round: a count, "
                                                "or a fraction in (0, 1]; 0 = all")
    aggregation: str = setting("samples", "FedAvg weighted by training counts (samples) or equally (equal); "
                                          "robust: median, trimmed-mean, krum, multi-krum, bulyan",
                               choices=AGGREGATIONS)
    min_clients: int = setting(1, "a round needs this many usable client results, else retry or stop")
    round_retries: int = setting(0, "re-ask the clients that gave no answer this many times per round")
    round_timeout: float = setting(0.0, "seconds a client's answer may take; 0 = no limit (Flower: one hour)")

    def __post_init__(self) -> None:
        check(is_count(self.rounds) and self.rounds > 0, "rounds", "a positive integer", self.rounds)
        k = self.clients_per_round
        check(is_number(k), "clients_per_round", "a count or a fraction in (0, 1]", k)
        if isinstance(k, float) and not 0 < k <= 1:
            raise FedDATError(f"clients-per-round as a fraction must be in (0, 1] (give a count as an integer), "
                              f"got {k!r}")
        if self.aggregation not in AGGREGATIONS:
            raise FedDATError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        check(is_count(self.round_retries) and self.round_retries >= 0, "round_retries", "a non-negative integer",
              self.round_retries)
        _finite_non_negative(self, "round_timeout", off=True)


@dataclass(frozen=True)
class PrivacyConfig:
    """Robust aggregation's knobs, update screening, central DP, secure aggregation and injected faults."""

    trim_fraction: float = setting(0.2, "trimmed-mean: drop int(f * n) smallest and largest values per "
                                        "coordinate")
    byzantine: int = setting(1, "krum, multi-krum, bulyan: hostile clients tolerated (f)")
    max_update_norm: float = setting(0.0, "reject an update farther than this (L2) from the global adapter; "
                                          "0 = off")
    dp_clip: float = setting(0.0, "central DP: clip each update's change to this L2 norm; 0 = off")
    dp_noise_multiplier: float = setting(0.0, "central DP: Gaussian noise std = multiplier * clip / n on the "
                                              "mean")
    secure_aggregation: bool = setting(False, "Flower: SecAgg+ for the shared adapter (the server sees only the "
                                              "mean)")
    fault_injection: str = setting("", "clients that fail on purpose, e.g. 'crash:textured@2,scale:blurry=-10' "
                                       "(feddat.federation.faults)")

    def __post_init__(self) -> None:
        check(is_count(self.byzantine) and self.byzantine >= 0, "byzantine", "a non-negative integer",
              self.byzantine)
        _finite_non_negative(self, "max_update_norm", "dp_clip", "dp_noise_multiplier", off=True)
        check(is_number(self.trim_fraction) and 0 <= self.trim_fraction < 0.5, "trim_fraction", "in [0, 0.5)",
              self.trim_fraction)
        if self.dp_noise_multiplier > 0 and self.dp_clip <= 0:
            raise FedDATError("dp-noise-multiplier needs dp-clip > 0: the noise is calibrated to the clipping norm")
        check(isinstance(self.secure_aggregation, bool), "secure_aggregation", "true or false",
              self.secure_aggregation)
        check(isinstance(self.fault_injection, str), "fault_injection", "a string", self.fault_injection)


@dataclass(frozen=True)
class EvalConfig:
    """When and how clients are scored, and where the numbers are logged."""

    eval_every: int = setting(1, "score the test split every N rounds (and always after the last)")
    eval_frozen: str = setting("newest", "the DAT at prediction mixes the local adapter with the newest aggregate "
                                         "(newest) or the copy from the client's last round (last_round)",
                               choices=("newest", "last_round"))
    tracker: str | None = setting(None, "experiment tracker: tensorboard, mlflow or wandb; unset = none",
                                  choices=TRACKERS)

    def __post_init__(self) -> None:
        check(is_count(self.eval_every) and self.eval_every > 0, "eval_every", "a positive integer",
              self.eval_every)
        if self.eval_frozen not in ("newest", "last_round"):
            raise FedDATError(f"eval-frozen must be 'newest' or 'last_round', got {self.eval_frozen!r}")
        if self.tracker is not None and self.tracker not in TRACKERS:
            raise FedDATError(f"unknown tracker {self.tracker!r}; choose one of {', '.join(TRACKERS)} "
                              "(or leave it unset)")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes; the seed fixes data, initialisation and client order."""

    seed: int = setting(0, "fixes data, initialisation, client order and sampling")
    engine: str = setting("inprocess", "inprocess (one process, deterministic) or flower (Flower's simulation)",
                          choices=ENGINES)
    device: str = setting("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    threads: int = setting(0, "torch intra-op threads; 0 = torch's default")
    client_state_dir: str | None = setting(None, "where clients' private states live between their rounds, one "
                                                 "file per client (node-local; makes a Flower run resumable); "
                                                 "unset = in memory up to 32 clients")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise FedDATError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        check(is_count(self.seed) and self.seed >= 0, "seed", "a non-negative integer", self.seed)
        check(is_count(self.threads) and self.threads >= 0, "threads", "a non-negative integer", self.threads)
        _path_or_none(self, "client_state_dir")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": LocalConfig, "method": MethodSection,
                             "federation": FederationConfig, "privacy": PrivacyConfig, "eval": EvalConfig,
                             "runtime": RuntimeConfig}


def _run_fields() -> list[tuple[str, Any, Field]]:
    """Every section's fields, each tagged with its section; the method section adds every method's settings."""
    out = []
    for section, cls in SECTIONS.items():
        own = [(f, None) for f in fields(cls)]
        if section == "method":
            own += [(f, methods) for f, methods in method_settings().values()]
        for f, methods in own:
            meta = {**f.metadata, "section": section}
            if methods is not None:
                meta["methods"] = tuple(methods)
            out.append((f.name, f.type, field(default=f.default, metadata=meta)))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise TypeError(f"a config key is declared twice: {sorted({n for n in names if names.count(n) > 1})}")
    return out


class _RunConfig:
    """The methods of `RunConfig` (its fields come from the sections)."""

    def validate(self) -> "RunConfig":
        sizes = resolve_sizes(self.benchmark, self.train_per_client, self.val_per_client, self.test_per_client) \
            if self.benchmark in BENCHMARKS else None
        if sizes is not None:
            self.train_per_client, self.val_per_client, self.test_per_client = sizes.train, sizes.val, sizes.test
        for name in SECTIONS:  # each section checks its own values as it is built
            self.section(name)
        for name in METHODS:   # and every method's settings, whichever method runs
            method_config(name, self.to_dict())
        self._validate_pooled()
        self._validate_nodes()
        self._validate_server()
        return self

    def section(self, name: str):
        """Section `name` (a key of SECTIONS) of this config, as its dataclass (which checks its values)."""
        cls = SECTIONS[name]
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    @property
    def method_config(self):
        """The running method's own settings (its config class, feddat.algorithms)."""
        return method_config(self.method, self.to_dict())

    def _validate_pooled(self) -> None:
        """A pooled reference (centralised-adapter) has one trainer and no federation to configure."""
        if not METHODS[self.method].pooled:
            return
        conflicts = [what for what, on in (
            ("engine flower (nothing is federated: it runs in one process, --engine inprocess)",
             self.engine == "flower"),
            ("clients-per-round (every client's data is pooled every round)", bool(self.clients_per_round)),
            ("fault-injection (there are no client rounds to fail)", bool(self.fault_injection)),
            ("secure-aggregation (nothing is aggregated)", self.secure_aggregation is True),
            ("dp-clip (there is no aggregate to clip and noise)", self.dp_clip > 0)) if on]
        if conflicts:
            raise FedDATError(f"method {self.method} pools every client's raw data (a centralised reference, not "
                              "federated) and cannot go with " + "; ".join(conflicts))

    def _validate_nodes(self) -> None:
        """Clients that bring their own data to their SuperNodes exist only in a deployment."""
        if self.nodes and self.own_data and len(self.client_names()) != 1:
            raise FedDATError("with nodes, a SuperNode serves one client folder (node config data=PATH)")

    def _validate_server(self) -> None:
        """What the round needs of the clients: counts against the federation's size, faults by client name."""
        names = None if self.nodes else self.client_names()  # with nodes: known when the SuperNodes report
        k = self.clients_per_round
        if isinstance(k, int) and not 0 <= k <= self.n_clients:
            raise FedDATError(f"clients-per-round must be a count from 1 to the run's {self.n_clients} clients "
                              f"(0 = all), got {k}")
        if k and self.secure_aggregation:
            raise FedDATError("secure-aggregation cannot go with clients-per-round: its SecAgg+ rounds take every "
                              "client")
        n = self.round_size()  # the updates a round aggregates
        if not is_count(self.min_clients) or not 1 <= self.min_clients <= n:
            where = f"the {n} clients of a round (clients-per-round)" if self.samples_clients else \
                f"the benchmark's {n} clients"
            raise FedDATError(f"min-clients must be an integer from 1 to {where}, got {self.min_clients!r}")
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
        if self.dp_clip > 0 and self.aggregation not in MEAN_RULES:
            raise FedDATError(f"dp-clip works with the mean aggregations ({', '.join(MEAN_RULES)}), whose "
                              f"sensitivity to one client is bounded by the clip; got aggregation={self.aggregation}")
        parse_faults(self.fault_injection, names, self.rounds)
        self._validate_secure_aggregation(n)

    def _validate_secure_aggregation(self, n: int) -> None:
        """SecAgg+ hands the server the mean only: what needs each client's update cannot go with it."""
        if not self.secure_aggregation:
            return
        conflicts = [what for what, on in (
            (f"aggregation={self.aggregation} (secure aggregation computes a mean: samples or equal)",
             self.aggregation not in MEAN_RULES),
            ("max-update-norm (the server cannot screen updates it does not see)", self.max_update_norm > 0),
            ("dp-clip (central DP clips each update on the server)", self.dp_clip > 0),
            ("round-retries (a SecAgg+ round cannot take late answers)", self.round_retries > 0),
            (f"method {self.method} (it shares nothing to aggregate)", not METHODS[self.method].shared),
            (f"{n} clients (SecAgg+ needs at least 3)", n < 3)) if on]
        if conflicts:
            raise FedDATError("secure-aggregation cannot go with " + "; ".join(conflicts))

    def client_specs(self) -> list:
        """The benchmark's clients this run federates: all of them, or the first `clients`."""
        return BENCHMARKS[self.benchmark]()[:self.clients or None]

    def client_names(self) -> list[str]:
        """The names of the clients this run federates (a partitioned benchmark's too), in client order."""
        return all_client_names(self)[:self.clients or None]

    def client_folders(self) -> list[tuple[str, Path]]:
        """(name, folder) of every own-data client, in client order."""
        return client_folders(self)

    @property
    def n_clients(self) -> int:
        """The federation's size: the SuperNodes with their own data (`nodes`), else the clients named here."""
        return self.nodes or len(self.client_names())

    def round_size(self) -> int:
        """How many clients train in each round (`clients_per_round` resolved against the client count)."""
        return round_size(self.n_clients, self.clients_per_round)

    @property
    def own_data(self) -> bool:
        return uses_own_data(self)

    @property
    def samples_clients(self) -> bool:
        """Whether rounds draw their clients (then every round records `sampled_clients`)."""
        return bool(self.clients_per_round)

    @property
    def partition_spec(self) -> Partition | None:
        """The benchmark's partition (feddat.data.partition.Partition), None for its own clients."""
        if self.partition == "natural":
            return None
        return Partition(self.partition, self.num_clients, float(self.partition_alpha), self.partition_classes)

    @property
    def max_train_examples(self) -> int:
        """The most training examples one client can hold: the server caps a claimed FedAvg weight at it."""
        if self.own_data or self.nodes:  # the clients' own counts: the server learns them from the clients
            return sys.maxsize
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
        return self.section("train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The config as TOML by section, each key under its help; `read_config_file` reads it back."""
        lines = []
        by_section: dict[str, list[Field]] = {}
        for f in fields(self):
            by_section.setdefault(f.metadata["section"], []).append(f)
        for section, fs in by_section.items():
            lines.append(f"[{section}]")
            for f in fs:
                help_text = f.metadata.get("help", "")
                if "methods" in f.metadata:
                    help_text = f"({', '.join(f.metadata['methods'])}) " + help_text.split(": ", 1)[-1]
                lines.append(f"# {help_text}")
                value = getattr(self, f.name)
                lines.append(f"{f.name} = {json.dumps('' if value is None else value)}")
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FedDATError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**values).validate()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "RunConfig":
        """A validated config from values as users write them: dashes or underscores, flat or by section, ''
        for an unset path or tracker."""
        return cls.from_dict(normalise(values))


RunConfig = make_dataclass("RunConfig", _run_fields(), bases=(_RunConfig,))
RunConfig.__module__ = __name__
RunConfig.__doc__ = "A run's whole configuration: the union of SECTIONS' fields (see the module's docstring)."
OPTIONAL = frozenset(f.name for f in fields(RunConfig) if f.default is None)  # paths etc. that may be unset


# ----- reading values -----
def config_field(key: str) -> Field:
    known = {f.name: f for f in fields(RunConfig)}
    if key not in known:
        raise FedDATError(f"unknown config key {key.replace('_', '-')!r}; known keys: "
                          f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
    return known[key]


def parse_value(key: str, text: str) -> Any:
    """A RunConfig value from text, typed as the field's default (true/false for switches; '' unsets a path)."""
    f = config_field(key)
    default = f.default
    try:
        if key in OPTIONAL:
            return text or None
        if isinstance(default, bool):
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        if isinstance(default, int):  # an integer field (clients-per-round also takes a fraction)
            return int(text) if key != "clients_per_round" or text.lstrip("-").isdigit() else float(text)
        if isinstance(default, float):
            return float(text)
        return text
    except (KeyError, ValueError):
        kind = "true or false" if isinstance(default, bool) else type(default).__name__
        raise FedDATError(f"{key.replace('_', '-')}={text!r}: expected {kind}") from None


_PAIR = re.compile(r"\S+?=(?:'[^']*'|\"[^\"]*\"|\S+)|\S+")


def parse_pairs(items: str | Iterable[str], config_keys: bool = True) -> dict[str, Any]:
    """`key=value` items (a list, or one string as `flwr run --run-config` takes: `k=v k2="a b"`) as a dict. With
    `config_keys`, keys are RunConfig keys (dashes or underscores) and values are typed by the field; otherwise
    keys are kept as written and values read as TOML literals, or as plain strings when they are not."""
    if isinstance(items, str):
        items = _PAIR.findall(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise FedDATError(f"{item!r} is not key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
            if not config_keys:
                out[key] = text
                continue
        if config_keys:
            key = key.replace("-", "_")
            out[key] = parse_value(key, text)
        else:
            try:
                out[key] = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = text
    return out


def normalise(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values as users write them (dashes, sections as tables, '' for unset) as RunConfig keys."""
    out: dict[str, Any] = {}
    for key, v in values.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(v, Mapping):
            out.update(normalise(v))
            continue
        out[key] = None if key in OPTIONAL and v == "" else v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's values as RunConfig keys: JSON or TOML (by suffix; other names are tried as both), flat or
    with one table per section, as `feddat run --print-config` writes it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FedDATError(f"config file {path} is unreadable: {e}") from e
    loaders = {".json": (json.loads,), ".toml": (tomllib.loads,)}.get(path.suffix.lower(), (json.loads, tomllib.loads))
    errors = []
    for load in loaders:
        try:
            values = load(text)
            break
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            errors.append(str(e))
    else:
        kinds = " or ".join({".json": "JSON", ".toml": "TOML"}.get(path.suffix.lower(), "JSON or TOML").split())
        raise FedDATError(f"config file {path} is not {kinds}: {'; '.join(errors)}")
    if not isinstance(values, dict):
        raise FedDATError(f"config file {path} must hold a JSON object or TOML table of config keys")
    return normalise(values)


def defaults() -> dict[str, Any]:
    """Every key's default: the one source pyproject's Flower table is checked against."""
    return {f.name: f.default for f in fields(RunConfig)}


