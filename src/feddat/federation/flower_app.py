"""The Flower engine: a ServerApp and a ClientApp that only translate between Flower records and our objects.

The ML stays where the in-process engine has it: `Worker` trains and scores one client, `aggregate()` validates
and averages updates, `History` records the run. Flower carries the messages (flwr >= 1.41 Message API):

- query     server -> every node, once: the run config. Reply: the node's client index and name, its label
            space and the starting global adapter (every node computes the same one from the seed).
- train     server -> every client, each round: the global adapter ("arrays") and the round ("config").
            Reply: the updated global adapter ("arrays"; empty when the method shares nothing) and
            "metrics": num-examples, client-index and the mean train losses as train.<name>.
- evaluate  server -> every client, on evaluation rounds: the new global adapter. Reply: "metrics" with
            the score; on the last round ("final") also score.<view> for every reported view, the per-item
            scores and breakdown.<key> of the predicting view; when the server saves the run ("export",
            set when it has an out dir) also the client's personalised model ("arrays") and its description
            ("client" record, "model-meta": client.json as JSON), which the server writes to
            <out>/clients/<client>/ exactly as the in-process engine does. Without an out dir no private
            state leaves a node.

Every message also carries the run config ("run-config"), so the server is the one source of truth and the
ClientApp needs nothing from Flower's own run config. A node's client is its `partition-id` (simulation) or
`client-id` (deployment, `--node-config "client-id=0"`); node-local settings (model-path, cache-dir, device,
threads) may be overridden by the node config. A client's private state (its local adapters and head) lives
in `context.state`, one backbone is built per process whatever the number of clients it serves.

`run_flower(cfg)` runs this app on Flower's simulation engine in this process and returns the same results
dict as the in-process engine; `flwr run .` runs it from pyproject.toml.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from feddat.algorithms.registry import get_method
from feddat.config import RunConfig
from feddat.data.benchmarks import BENCHMARKS
from feddat.errors import FedDATError
from feddat.eval.results import History
from feddat.federation.aggregate import update_bytes
from feddat.federation.inprocess import Setup, aggregate, build, evaluate_client, finish_history, reported_views
from feddat.federation.worker import State

log = logging.getLogger(__name__)

ARRAYS, CONFIG, METRICS, CLIENT, RUN_CONFIG = "arrays", "config", "metrics", "client", "run-config"
STATE_KEY = "feddat-client-state"
MODEL_META = "model-meta"
NODE_LOCAL = ("model_path", "cache_dir", "device", "threads")
TIMEOUT_S = 3600.0


# ----- records <-> our objects -----
def state_to_record(state: State | None) -> ArrayRecord:
    return ArrayRecord() if not state else ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> State | None:
    """Tensors that own writable memory (Flower's arrays are read-only views of the wire bytes); None if empty."""
    if not len(record):
        return None
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def config_to_record(cfg: RunConfig) -> ConfigRecord:
    """A RunConfig as a ConfigRecord (unset paths are left out: records hold no None)."""
    return ConfigRecord({k: v for k, v in cfg.to_dict().items() if v is not None})


def config_from_values(values: Mapping[str, Any]) -> tuple[RunConfig, Path | None]:
    """A RunConfig and the output directory from Flower's run config (or a record).

    Keys may use dashes or underscores (`lr-adapter` = `lr_adapter`); an empty model-path, cache-dir or tracker
    means unset; `out-dir`, if given, is where the server writes results.json.
    """
    d = {str(k).replace("-", "_"): v for k, v in values.items()}
    out = d.pop("out_dir", None) or None
    for key in ("model_path", "cache_dir", "tracker"):
        if d.get(key) == "":
            d[key] = None
    return RunConfig.from_dict(d), Path(out) if out else None


# ----- ClientApp -----
_SETUP_LOCK = threading.Lock()
_SETUP: dict[tuple, Setup] = {}  # at most one entry: the backbone and data of the config this process serves


def get_setup(cfg: RunConfig) -> Setup:
    """The process's Setup for `cfg`, built once: one backbone per process, however many clients it serves."""
    key = tuple(sorted(cfg.to_dict().items()))
    with _SETUP_LOCK:
        if key not in _SETUP:
            _SETUP.clear()
            _SETUP[key] = build(cfg)
        return _SETUP[key]


def client_index(node_config: Mapping[str, Any], n_clients: int) -> int:
    for key in ("partition-id", "client-id"):
        if key in node_config:
            value = node_config[key]
            break
    else:
        raise FedDATError("the node config names no client: run the SuperNode with --node-config 'client-id=<i>' "
                          "(simulation sets partition-id itself)")
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise FedDATError(f"{key} must be an integer, got {value!r}") from None
    if not 0 <= index < n_clients:
        raise FedDATError(f"{key}={index} is out of range: the benchmark has {n_clients} clients (0..{n_clients - 1})")
    return index


def _client_context(msg: Message, context: Context) -> tuple[RunConfig, Setup, int]:
    values = dict(msg.content[RUN_CONFIG])
    for key, v in context.node_config.items():
        if key.replace("-", "_") in NODE_LOCAL:
            values[key.replace("-", "_")] = v
    cfg, _ = config_from_values(values)
    setup = get_setup(cfg)
    return cfg, setup, client_index(context.node_config, len(setup.clients))


def _client_state(context: Context, setup: Setup, cfg: RunConfig, index: int) -> State:
    """The client's private state from context.state; the worker's initial one the first time."""
    if STATE_KEY in context.state:
        state = record_to_state(context.state[STATE_KEY])
        if state is not None:
            return state
    return setup.worker.initial_state(index, len(setup.clients[index].answers), cfg.seed)


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict, name: str, **config: Any) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), CLIENT: ConfigRecord({"name": name, **config})})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


client_app = ClientApp()


@client_app.query()
def describe(msg: Message, context: Context) -> Message:
    cfg, setup, index = _client_context(msg, context)
    c = setup.clients[index]
    return _reply(msg, state_to_record(setup.worker.initial_global(cfg.seed)),
                  {"client-index": index, "num-examples": len(c.train)}, c.name, answers=list(c.answers))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, setup, index = _client_context(msg, context)
    c = setup.clients[index]
    state = _client_state(context, setup, cfg, index)
    global_state = record_to_state(msg.content[ARRAYS])
    round_idx = int(msg.content[CONFIG]["server-round"]) - 1
    res = setup.worker.fit(c, state, global_state, round_idx, cfg.rounds, cfg.seed, index)
    context.state[STATE_KEY] = state_to_record(res.state)
    metrics = {"num-examples": res.num_examples, "client-index": index}
    metrics.update({f"train.{k}": float(v) for k, v in res.metrics.items()})
    return _reply(msg, state_to_record(res.update), metrics, c.name)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, setup, index = _client_context(msg, context)
    c = setup.clients[index]
    method = setup.worker.method
    final = bool(msg.content[CONFIG].get("final", False))
    state, global_state = _client_state(context, setup, cfg, index), record_to_state(msg.content[ARRAYS])
    evals = evaluate_client(setup, c, state, global_state, reported_views(method) if final else None)
    main = evals[method.predict_view]
    metrics = {"client-index": index, "num-examples": len(c.test), "score": main["score"]}
    if final:
        metrics.update({f"score.{v}": e["score"] for v, e in evals.items()})
        metrics["scores"] = [float(x) for x in main["scores"].tolist()]
        metrics.update({f"breakdown.{k}": float(v) for k, v in main.get("breakdown", {}).items()})
    if final and bool(msg.content[CONFIG].get("export", False)):
        from feddat.federation.export import client_export

        tensors, meta = client_export(setup, index, state, global_state)
        return _reply(msg, state_to_record(tensors), metrics, c.name, **{MODEL_META: json.dumps(meta)})
    return _reply(msg, None, metrics, c.name)


# ----- ServerApp -----
def _wait_for_nodes(grid: Grid, n: int, timeout: float = TIMEOUT_S) -> list[int]:
    start = time.time()
    end, next_note = start + timeout, start + 10
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.time() > next_note:
            next_note += 30
            log.warning("waiting for SuperNodes: %d of %d connected (one per client; in a simulation pass "
                        "--federation-config \"num-supernodes=%d\" to flwr run)", len(nodes), n, n)
        if time.time() > end:
            raise FedDATError(f"only {len(nodes)} of the {n} SuperNodes the benchmark needs connected "
                              f"in {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def _errors(replies: list[Message]) -> list[str]:
    """The error replies' reasons, each once, with the nodes that sent it."""
    by_reason: dict[str, list[str]] = {}
    for m in replies:
        if m.has_error():
            by_reason.setdefault(m.error.reason, []).append(str(m.metadata.src_node_id))
    return [f"node{'s' if len(n) > 1 else ''} {', '.join(n)}: {reason}" for reason, n in by_reason.items()]


class FedDATStrategy(Strategy):
    """Sends the global adapter to every client, aggregates with our `aggregate()`, scores on evaluation rounds
    and fills a `History` as the in-process engine does."""

    def __init__(self, cfg: RunConfig, nodes: dict[int, int], names: list[str], history: History,
                 global_state: State | None, bar: tqdm | None = None, export: bool = False):
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.nodes = nodes                  # node id -> client index
        self.names = names                  # client names by index
        self.history = history
        self.global_state = global_state    # the current aggregate, as tensors (None when nothing travels)
        self.run_record = config_to_record(cfg)
        self.bar = bar
        self.final_evals: dict[str, dict] | None = None
        self.export = export                # ask the clients for their models in the final evaluation
        self.exports: dict[str, tuple[State, dict]] = {}   # client name -> (tensors, client.json)
        self._round_start = 0.0
        self._train: tuple[dict, dict, list[str]] = ({}, {}, [])

    def summary(self) -> None:
        log.info("FedDAT strategy: method %s, %d clients, %d rounds, %s-weighted FedAvg of %s", self.cfg.method,
                 len(self.names), self.cfg.rounds, self.cfg.aggregation, self.method.shared or "nothing")

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, kind: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({ARRAYS: arrays, CONFIG: config, RUN_CONFIG: self.run_record})
        return [Message(content=record, dst_node_id=node, message_type=kind, group_id=str(server_round))
                for node in sorted(self.nodes, key=self.nodes.get)]

    def _valid(self, replies: Iterable[Message], stage: str) -> tuple[list[Message], list[str]]:
        """Replies without errors, in client order, and the errors of the others."""
        replies = list(replies)
        ok = []
        for m in replies:
            if m.has_error():
                continue
            index = int(m.content[METRICS]["client-index"])
            if self.nodes.get(m.metadata.src_node_id) != index:
                raise FedDATError(f"{stage} reply from node {m.metadata.src_node_id} claims client {index}, but that "
                                  f"node serves client {self.nodes.get(m.metadata.src_node_id)}")
            ok.append(m)
        return sorted(ok, key=lambda m: int(m.content[METRICS]["client-index"])), _errors(replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start = time.time()
        if self.bar is not None:
            self.bar.set_description(f"{self.cfg.method} round {server_round}/{self.cfg.rounds}")
        return self._messages(server_round, arrays, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, errors = self._valid(replies, "train")
        if not ok:
            raise FedDATError(f"round {server_round}: no client trained: " + ("; ".join(errors) or "no replies"))
        train, updates, sizes = {}, {}, {}
        for m in ok:
            name = self.names[int(m.content[METRICS]["client-index"])]
            metrics = m.content[METRICS]
            train[name] = {k[len("train."):]: v for k, v in metrics.items() if k.startswith("train.")}
            sizes[name] = int(metrics["num-examples"])
            if self.method.shared:
                # a missing or empty update fails validation in aggregate(), naming the client
                updates[name] = (record_to_state(m.content[ARRAYS]) if ARRAYS in m.content else None) or {}
        missing = [n for n in self.names if n not in train]
        if missing:
            log.warning("round %d: no update from %s: %s", server_round, ", ".join(missing), "; ".join(errors))
        bytes_sent = {n: update_bytes(u) for n, u in updates.items()} or {n: 0 for n in self.names}
        self._train = (train, bytes_sent, missing)
        arrays = None
        if updates:
            self.global_state = aggregate(self.cfg, updates, sizes, self.global_state)
            arrays = state_to_record(self.global_state)
        total = sum(sizes.values())
        means = {f"train.{k}": sum(train[n][k] * sizes[n] for n in train) / total for k in next(iter(train.values()))}
        return arrays, MetricRecord(means)

    def _evaluates(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self._evaluates(server_round):
            return []
        config["final"] = server_round == self.cfg.rounds
        config["export"] = self.export and server_round == self.cfg.rounds
        return self._messages(server_round, arrays, config, MessageType.EVALUATE)

    def _final_eval(self, metrics: MetricRecord) -> dict[str, dict]:
        """A final evaluate reply as Worker.evaluate's {view: {...}}: every view's score; the predicting view's
        per-item scores and breakdown too (what finish_history reads)."""
        out = {v: {"score": float(metrics[f"score.{v}"])} for v in reported_views(self.method)}
        out[self.method.predict_view].update(
            scores=torch.tensor(metrics["scores"], dtype=torch.float64),
            breakdown={k[len("breakdown."):]: float(v) for k, v in metrics.items() if k.startswith("breakdown.")})
        return out

    def _export(self, reply: Message) -> tuple[State, dict]:
        """A final evaluate reply's saved model: (tensors, client.json content)."""
        index = int(reply.content[METRICS]["client-index"])
        if ARRAYS not in reply.content or MODEL_META not in reply.content[CLIENT]:
            raise FedDATError(f"client {self.names[index]} sent no model in its final evaluation")
        tensors = record_to_state(reply.content[ARRAYS]) or {}
        meta = json.loads(str(reply.content[CLIENT][MODEL_META]))
        if meta.get("client") != self.names[index]:
            raise FedDATError(f"client {self.names[index]} sent the model of client {meta.get('client')!r}")
        return tensors, meta

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok, errors = self._valid(replies, "evaluate")
        scores = None
        if self._evaluates(server_round):
            if errors or len(ok) != len(self.names):
                raise FedDATError(f"round {server_round}: evaluation failed: "
                                  + ("; ".join(errors) or "replies missing"))
            named = {self.names[int(m.content[METRICS]["client-index"])]: m.content[METRICS] for m in ok}
            scores = {name: float(metrics["score"]) for name, metrics in named.items()}
            if server_round == self.cfg.rounds:
                self.final_evals = {name: self._final_eval(metrics) for name, metrics in named.items()}
                if self.export:
                    self.exports = {name: self._export(m) for m in ok
                                    for name in [self.names[int(m.content[METRICS]["client-index"])]]}
        train, bytes_sent, missing = self._train
        self.history.add_round(server_round - 1, train, scores, bytes_sent, time.time() - self._round_start, missing)
        if self.bar is not None:
            self.bar.update(1)
            if scores is not None:
                self.bar.write(f"round {server_round}: mean test score {sum(scores.values()) / len(scores):.4f}")
        return None if scores is None else MetricRecord({"score": sum(scores.values()) / len(scores)})


def _same(a: State | None, b: State | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _describe(grid: Grid, node_ids: list[int], cfg: RunConfig, n: int):
    """Ask every node which client it serves: node->index map, names, label spaces, the starting global adapter."""
    record = RecordDict({RUN_CONFIG: config_to_record(cfg), CONFIG: ConfigRecord()})
    replies = list(grid.send_and_receive([Message(content=record, dst_node_id=node, message_type=MessageType.QUERY)
                                          for node in node_ids], timeout=TIMEOUT_S))
    nodes, names, answers, initial = {}, [None] * n, [None] * n, None
    for m in replies:
        if m.has_error():
            continue
        index = int(m.content[METRICS]["client-index"])
        if index in nodes.values():
            raise FedDATError(f"two SuperNodes serve client {index}: give each a different client-id")
        state = record_to_state(m.content[ARRAYS])
        if nodes and not _same(initial, state):
            raise FedDATError(f"client {index} starts from another global adapter than the others: every SuperNode "
                              "must load the same backbone")
        initial = state
        nodes[m.metadata.src_node_id] = index
        names[index] = str(m.content[CLIENT]["name"])
        answers[index] = list(m.content[CLIENT]["answers"])
    missing = [i for i in range(n) if i not in nodes.values()]
    if missing:
        raise FedDATError(f"no SuperNode serves client(s) {missing}: " + ("; ".join(_errors(replies)) or "no reply"))
    return nodes, names, dict(zip(names, answers)), initial


def serve(grid: Grid, cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
          t_start: float | None = None) -> dict:
    """The whole run on the server side; returns History.data. With out_dir: saves results.json and the
    clients' models (clients/) there, and the tracker's logs."""
    from feddat.eval.tracking import open_tracker

    t_start = time.time() if t_start is None else t_start
    cfg = replace(cfg, engine="flower").validate()
    out_dir = Path(out_dir) if out_dir is not None else None
    tracker = open_tracker(cfg.tracker, out_dir, cfg.to_dict())
    ok = False
    try:
        data = _serve(grid, cfg, out_dir, progress, t_start, tracker)
        ok = True
        return data
    finally:
        if tracker is not None:
            tracker.close(ok)


def _serve(grid: Grid, cfg: RunConfig, out_dir: Path | None, progress: bool, t_start: float, tracker) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = get_method(cfg.method)
    n = len(BENCHMARKS[cfg.benchmark]())
    nodes, names, label_spaces, initial = _describe(grid, _wait_for_nodes(grid, n), cfg, n)
    history = History(cfg.to_dict(), names, label_spaces)
    history.attach(tracker)
    bar = tqdm(total=cfg.rounds, desc=cfg.method, unit="round", disable=not progress)
    strategy = FedDATStrategy(cfg, nodes, names, history, initial, bar, export=out_dir is not None)
    try:
        strategy.start(grid, state_to_record(initial), num_rounds=cfg.rounds, timeout=TIMEOUT_S,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    finally:
        bar.close()
    if strategy.final_evals is None:
        raise FedDATError("the run ended without a final evaluation")
    finish_history(history, method, strategy.final_evals, time.time() - t_start)
    if out_dir is not None:
        from feddat.federation.export import save_clients

        missing = [n for n in names if n not in strategy.exports]
        if missing:
            raise FedDATError(f"no saved model came back from client(s) {', '.join(missing)}")
        save_clients(out_dir, strategy.exports)
        history.save(out_dir)
    return history.data


def make_server_app(cfg: RunConfig | None = None, out_dir: Path | None = None, progress: bool = True,
                    sink: dict | None = None, t_start: float | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (cfg None) for the run config Flower passes (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, out = (cfg, out_dir) if cfg is not None else config_from_values(context.run_config)
        data = serve(grid, run_cfg, out, progress, t_start)
        if sink is not None:
            sink["results"] = data

    return app


server_app = make_server_app()


# ----- Python entry -----
def run_flower(cfg: RunConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Run on Flower's simulation engine (Ray) in this process: one SuperNode per client, one Ray worker (one
    backbone) serving them in turn. Returns the results dict of `inprocess.run` for the same config."""
    from flwr.simulation import run_simulation

    t_start = time.time()
    cfg = replace(cfg, engine="flower").validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gpus = 1.0 if cfg.device.startswith("cuda") else 0.0
    # One CPU (and the GPU, if any) for Ray and the same per client: exactly one actor process.
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                      "init_args": {"num_cpus": 1, "num_gpus": gpus}}
    sink: dict = {}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not progress:
        flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(server_app=make_server_app(cfg, out_dir, progress, sink, t_start), client_app=client_app,
                       num_supernodes=len(BENCHMARKS[cfg.benchmark]()), backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
    if "results" not in sink:
        raise FedDATError("the Flower simulation ended without results; see its log above")
    return sink["results"]
