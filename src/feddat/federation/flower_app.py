"""The Flower engine: a ServerApp and a ClientApp that only translate between Flower records and our objects.

The ML stays where the in-process engine has it: `Worker` trains and scores one client, `aggregate()` validates
and averages updates, `History` records the run. Flower carries the messages (flwr >= 1.41 Message API):

- query     server -> every node, once: the run config. Reply: the node's client index and name, its label
            space and the starting global adapter (every node computes the same one from the seed).
- train     server -> every client, each round: the global adapter ("arrays") and the round ("config":
            server-round, resumed-from, and attempt on a retry).
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
threads, client-state-dir) may be overridden by the node config. A client's private state (its local adapters,
head and the method's other private tensors) follows the in-process engine's rule
(feddat.federation.client_state): with client-state-dir set it lives only in the node's files between the
client's rounds (so the run can be resumed, `serve(resume=...)`); with more than 32 clients, only in files of a
temporary directory named by the run, removed as the clients finish; else in `context.state`. One backbone is
built per process whatever the number of clients it serves.

A round's train replies go to the same `RoundCollector` as in the in-process engine (feddat.federation.server):
error replies and clients silent past the timeout are missing, bad updates rejected, the missing ones asked
again (train config "attempt") when too few usable results came back; the ClientApp applies the run's
fault injection (feddat.federation.faults) as the in-process engine does. An error the SuperLink sends for a
node it counts as gone ("Node Unavailable") is the missing answer of that node's client. With
secure-aggregation the round's train messages are those of Flower's SecAgg+ protocol instead, and the server
gets the clients' metrics and the mean change of the global adapter only (feddat.federation.secagg).

`run_flower(cfg)` runs this app on Flower's simulation engine in this process and returns the same results
dict as the in-process engine; `flwr run .` runs it from pyproject.toml.
"""

from __future__ import annotations

import json
import logging
import re
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
from feddat.errors import FedDATError
from feddat.eval.results import History
from feddat.federation.checkpoint import Checkpoint, check_fits, save_checkpoint
from feddat.federation.client_state import NODE_LOCAL, RoundStates, node_states, remove_temporary_node_dirs
from feddat.federation.faults import check_crash, corrupt, delay, parse_faults
from feddat.federation.inprocess import Setup, build, evaluate_client, finish_history, reported_views
from feddat.federation.secagg import secure_aggregation_mod
from feddat.federation.server import RoundCollector, privacy_report
from feddat.federation.worker import State

log = logging.getLogger(__name__)

ARRAYS, CONFIG, METRICS, CLIENT, RUN_CONFIG = "arrays", "config", "metrics", "client", "run-config"
STATE_KEY = "feddat-client-state"
MODEL_META = "model-meta"
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
    d.pop("resume_dir", None)  # the ServerApp's business (make_server_app)
    for key in ("model_path", "cache_dir", "tracker", "client_state_dir", "data_dir"):
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
        raise FedDATError(f"{key}={index} is out of range: the run has {n_clients} clients (0..{n_clients - 1})")
    return index


def _client_context(msg: Message, context: Context) -> tuple[RunConfig, Setup, int]:
    values = dict(msg.content[RUN_CONFIG])
    for key, v in context.node_config.items():
        if key.replace("-", "_") in NODE_LOCAL:
            values[key.replace("-", "_")] = v
    cfg, _ = config_from_values(values)
    setup = get_setup(cfg)
    return cfg, setup, client_index(context.node_config, len(setup.clients))


def _store(cfg: RunConfig, setup: Setup, context: Context) -> RoundStates | None:
    """Where this node keeps its clients' private states between their rounds: files (client-state-dir set, or
    more than STATES_IN_MEMORY_UP_TO clients), or None: context.state (feddat.federation.client_state)."""
    return node_states(cfg.to_dict(), cfg.client_state_dir, len(setup.clients), context.run_id)


def _initial_state(setup: Setup, cfg: RunConfig, index: int) -> State:
    return setup.worker.initial_state(index, setup.clients[index].head_spec, cfg.seed)


def _client_state(msg: Message, context: Context, setup: Setup, cfg: RunConfig, index: int, upto: int,
                  store: RoundStates | None) -> State:
    """The client's private state: its newest saved state of round `upto` or before in the node's store, or
    (states in memory) context.state; else, in a new run, the worker's initial one."""
    name = setup.clients[index].name
    if store is not None:
        state = store.load(name, upto)
    else:
        state = record_to_state(context.state[STATE_KEY]) if STATE_KEY in context.state else None
    if state is not None:
        return state
    if int(msg.content[CONFIG].get("resumed-from", 0)) > 0:
        raise FedDATError(f"client {name} has no saved state to resume from (client-state-dir: "
                          f"{cfg.client_state_dir})")
    return _initial_state(setup, cfg, index)


def _keep_state(context: Context, store: RoundStates | None, name: str, round_number: int, state: State) -> None:
    """After the client's round: into its file (only there), or into context.state."""
    if store is not None:
        store.save(name, round_number, state)
    else:
        context.state[STATE_KEY] = state_to_record(state)


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
    store = _store(cfg, setup, context)
    if store is not None and store.resumable:
        resumed_from = int(msg.content[CONFIG].get("resumed-from", 0))
        store.start(c.name, resumed_from)
        if resumed_from == 0:  # a client that sits out until an interruption still has a state to resume from
            store.save(c.name, 0, _initial_state(setup, cfg, index))
    return _reply(msg, state_to_record(setup.worker.initial_global(cfg.seed)),
                  {"client-index": index, "num-examples": len(c.train)}, c.name, answers=list(c.answers),
                  task=json.dumps(c.describe()))


@client_app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    cfg, setup, index = _client_context(msg, context)
    c = setup.clients[index]
    store = _store(cfg, setup, context)
    round_idx = int(msg.content[CONFIG]["server-round"]) - 1
    state = _client_state(msg, context, setup, cfg, index, round_idx, store)
    global_state = record_to_state(msg.content[ARRAYS])
    faults = parse_faults(cfg.fault_injection)
    check_crash(faults, c.name, round_idx + 1, int(msg.content[CONFIG].get("attempt", 0)))
    res = setup.worker.fit(c, state, global_state, round_idx, cfg.rounds, cfg.seed, index)
    _keep_state(context, store, c.name, round_idx + 1, res.state)
    if (late := delay(faults, c.name, round_idx + 1)) > 0:
        time.sleep(late)
    metrics = {"num-examples": res.num_examples, "client-index": index}
    metrics.update({f"train.{k}": float(v) for k, v in res.metrics.items()})
    update = corrupt(res.update, global_state, faults, c.name, round_idx + 1)
    return _reply(msg, state_to_record(update), metrics, c.name)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, setup, index = _client_context(msg, context)
    c = setup.clients[index]
    method = setup.worker.method
    final = bool(msg.content[CONFIG].get("final", False))
    store = _store(cfg, setup, context)
    state = _client_state(msg, context, setup, cfg, index, int(msg.content[CONFIG]["server-round"]), store)
    if final and store is not None:
        store.finish(c.name)  # a temporary store: the client's last use of its state
    global_state = record_to_state(msg.content[ARRAYS])
    evals = evaluate_client(setup, c, state, global_state, reported_views(method) if final else None)
    main = evals[method.predict_view]
    metrics = {"client-index": index, "num-examples": len(c.test), "score": main["score"]}
    if final:
        metrics.update({f"score.{v}": e["score"] for v, e in evals.items()})
        metrics["scores"] = [float(x) for x in main["scores"].tolist()]
        metrics.update({f"breakdown.{k}": float(v) for k, v in main.get("breakdown", {}).items()})
        metrics["val-score"] = evaluate_client(setup, c, state, global_state, (method.predict_view,),
                                               split="val")[method.predict_view]["score"]  # for tuning
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


def short_reason(reason: str) -> str:
    """The gist of a ClientApp's error reply (Flower sends the whole remote traceback, with process ids)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    said = re.findall(r"Message: (.*)", text)
    line = said[-1] if said else next((x for x in reversed(text.splitlines()) if x.strip()), text)
    return line.strip().rstrip("'>").strip()[:300]


def _errors(replies: list[Message], label=None) -> list[str]:
    """The error replies' reasons, each once, with whom they concern (`label(reply)`; default: the sender)."""
    label = label or (lambda m: f"node {m.metadata.src_node_id}")
    by_reason: dict[str, list[str]] = {}
    for m in replies:
        if m.has_error():
            by_reason.setdefault(short_reason(m.error.reason), []).append(label(m))
    return [f"{', '.join(who)}: {reason}" for reason, who in by_reason.items()]


class FedDATStrategy(Strategy):
    """Sends the global adapter to every client, aggregates with our `aggregate()`, scores on evaluation rounds
    and fills a `History` as the in-process engine does."""

    def __init__(self, cfg: RunConfig, nodes: dict[int, int], names: list[str], history: History,
                 global_state: State | None, bar: tqdm | None = None, export: bool = False,
                 timeout: float = TIMEOUT_S, out_dir: Path | None = None, resumed_from: int = 0):
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.nodes = nodes                  # node id -> client index
        self.names = names                  # client names by index
        self.history = history
        self.global_state = global_state    # the current aggregate, as tensors (None when nothing travels)
        self.run_record = config_to_record(cfg)
        self.bar = bar
        self.final_evals: dict[str, dict] | None = None
        self.final_val_evals: dict[str, dict] | None = None  # the predicting view on the validation splits
        self.export = export                # ask the clients for their models in the final evaluation
        self.exports: dict[str, tuple[State, dict]] = {}   # client name -> (tensors, client.json)
        self.timeout = timeout              # seconds to wait for the replies of one send
        self.out_dir = out_dir              # where the server checkpoints every round (None: nowhere)
        self.offset = resumed_from          # rounds done before this start: Flower counts from 1 again
        self._round_start = 0.0
        self._grid: Grid | None = None
        self._arrays = ArrayRecord()
        self._round: RoundCollector | None = None
        self._outgoing: list[Message] = []  # the messages of the current send (their ids identify the replies)
        self._sampled: list[str] = list(names)  # the clients asked to train this round

    def summary(self) -> None:
        log.info("FedDAT strategy: method %s, %d clients, %d rounds, aggregation %s of %s%s", self.cfg.method,
                 len(self.names), self.cfg.rounds, self.cfg.aggregation, self.method.shared or "nothing",
                 f", central DP (clip {self.cfg.dp_clip}, noise {self.cfg.dp_noise_multiplier})" if self.cfg.dp else "")

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, kind: str,
                  names: Iterable[str] | None = None) -> list[Message]:
        """One message per client (or per client in `names`), in client order."""
        config["server-round"] = server_round
        config["resumed-from"] = self.offset
        record = RecordDict({ARRAYS: arrays, CONFIG: config, RUN_CONFIG: self.run_record})
        wanted = set(self.names if names is None else names)
        self._outgoing = [Message(content=record, dst_node_id=node, message_type=kind, group_id=str(server_round))
                          for node in sorted(self.nodes, key=self.nodes.get) if self.names[self.nodes[node]] in wanted]
        return self._outgoing

    def _reply_node(self, m: Message) -> int | None:
        """The node a reply answers for: its sender, or, for the error the SuperLink sends in the name of a node
        it counts as gone ("Node Unavailable"), the node the message went to."""
        if m.metadata.src_node_id in self.nodes:
            return m.metadata.src_node_id
        return next((sent.metadata.dst_node_id for sent in self._outgoing
                     if sent.metadata.message_id == m.metadata.reply_to_message_id), None)

    def _label(self, m: Message) -> str:
        node = self._reply_node(m)
        return f"client {self.names[self.nodes[node]]} (node {node})" if node in self.nodes else \
            f"node {m.metadata.src_node_id}"

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
        return sorted(ok, key=lambda m: int(m.content[METRICS]["client-index"])), _errors(replies, self._label)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        self._round_start = time.time()
        self._grid, self._arrays = grid, arrays
        if self.bar is not None:
            self.bar.set_description(f"{self.cfg.method} round {server_round}/{self.cfg.rounds}")
        if self.cfg.secure_aggregation:
            return []  # the round's messages are SecAgg+'s, sent from aggregate_train
        from feddat.federation.sampling import sample_clients

        self._sampled = [self.names[i] for i in sample_clients(self.cfg.seed, server_round - 1, len(self.names),
                                                               self.cfg.round_size())]
        return self._messages(server_round, arrays, config, MessageType.TRAIN, self._sampled)

    def _collect(self, collector: RoundCollector, replies: Iterable[Message], asked: list[str]) -> None:
        """Hand every train reply to the round's collector: an answer, or the error a client raised; the
        clients asked that sent nothing within the timeout are missing."""
        heard = set()
        for m in replies:
            index = self.nodes.get(self._reply_node(m))
            if index is None:
                log.warning("round %d: ignoring a reply from unknown node %s", collector.round_idx + 1,
                            m.metadata.src_node_id)
                continue
            name = self.names[index]
            heard.add(name)
            if m.has_error():
                collector.failed(name, f"failed: {short_reason(m.error.reason)}")
                continue
            metrics = m.content[METRICS]
            if int(metrics["client-index"]) != index:
                collector.failed(name, f"its node claims to serve client {int(metrics['client-index'])}")
                continue
            update = (record_to_state(m.content[ARRAYS]) if ARRAYS in m.content else None) if self.method.shared \
                else None
            collector.answered(name, {k[len("train."):]: v for k, v in metrics.items() if k.startswith("train.")},
                               int(metrics["num-examples"]), update)
        for name in asked:
            if name not in heard:
                collector.failed(name, f"timed out: no answer within {self.timeout:g} s")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        secure = self.cfg.secure_aggregation
        asked = self.names if secure else self._sampled
        collector = RoundCollector(self.cfg, asked, self.method.shared is not None and not secure,
                                   self.global_state, server_round - 1)
        if secure:
            new = self._secure_round(collector, server_round)
        else:
            self._collect(collector, replies, asked)
            while collector.retry():
                asked = collector.to_retry()
                config = ConfigRecord({"attempt": collector.attempts - 1})
                msgs = self._messages(server_round, self._arrays, config, MessageType.TRAIN, asked)
                self._collect(collector, self._grid.send_and_receive(msgs, timeout=self.timeout), asked)
            self._round = collector
            new = collector.aggregate()  # FedDATError when too few clients gave a usable result
        arrays = None
        if self.method.shared:
            self.global_state = new
            arrays = state_to_record(new)
        train, sizes = collector.train, collector.sizes
        total = sum(sizes.values())
        means = {f"train.{k}": sum(train[n][k] * sizes[n] for n in train) / total for k in next(iter(train.values()))}
        return arrays, MetricRecord(means)

    def _secure_round(self, collector: RoundCollector, server_round: int) -> State:
        """A training round whose updates are aggregated with SecAgg+ (feddat.federation.secagg): the server
        learns each client's metrics and the mean change of the global adapter, not the updates."""
        from feddat.federation.aggregate import update_bytes
        from feddat.federation.secagg import RESUMED_KEY, ROUND_KEY, RUN_CONFIG_KEY, new_global, secure_round

        config = {RUN_CONFIG_KEY: json.dumps(dict(self.run_record)), ROUND_KEY: server_round,
                  RESUMED_KEY: self.offset}
        result = secure_round(self._grid, sorted(self.nodes, key=self.nodes.get), self.global_state, config,
                              self.cfg, server_round, self.timeout)
        for node, metrics in result.answered.items():
            index = self.nodes.get(node)
            if index is None or int(metrics["client-index"]) != index:
                raise FedDATError(f"round {server_round}: the SecAgg+ sum holds the update of node {node}, which "
                                  f"claims client {metrics.get('client-index')}: the round cannot be used")
            train = {k[len("train."):]: float(v) for k, v in metrics.items() if k.startswith("train.")}
            collector.answered(self.names[index], train, int(metrics["num-examples"]), None)
        dropped = "; ".join(result.failures) or "no masked update reached the sum"
        for name in self.names:
            if name not in collector.train:
                collector.failed(name, f"dropped out of the SecAgg+ round ({short_reason(dropped)})")
        self._round = collector
        collector.aggregate()  # FedDATError when fewer than min-clients took part
        if result.mean_change is None:
            raise FedDATError(f"round {server_round} failed: secure aggregation did not complete: {dropped}")
        collector.sent = {name: update_bytes(self.global_state) for name in collector.train}
        collector.info["secure_aggregation"] = {"protocol": "SecAgg+", "clients": sorted(collector.train)}
        return new_global(self.global_state, result.mean_change)

    def _evaluates(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.offset
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
        server_round += self.offset
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
                self.final_val_evals = {name: {self.method.predict_view: {"score": float(metrics["val-score"])}}
                                        for name, metrics in named.items()}
                if self.export:
                    self.exports = {name: self._export(m) for m in ok
                                    for name in [self.names[int(m.content[METRICS]["client-index"])]]}
        collector = self._round
        extra = collector.extra()
        if self.cfg.samples_clients:
            extra["sampled_clients"] = list(self._sampled)
        self.history.add_round(server_round - 1, collector.train, scores, collector.bytes_sent(),
                               time.time() - self._round_start, extra)
        if self.out_dir is not None:
            # the server's part of the checkpoint; the clients keep theirs in their client-state-dir
            save_checkpoint(self.out_dir, server_round, self.cfg.to_dict(), self.global_state, {}, {},
                            self.history.data)
        if self.bar is not None:
            self.bar.update(1)
            if scores is not None:
                self.bar.write(f"round {server_round}: mean test score {sum(scores.values()) / len(scores):.4f}")
        return None if scores is None else MetricRecord({"score": sum(scores.values()) / len(scores)})


def _same(a: State | None, b: State | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _describe(grid: Grid, node_ids: list[int], cfg: RunConfig, n: int, resumed_from: int = 0):
    """Ask every node which client it serves: node->index map, names, label spaces, the starting global adapter
    (and, with client-state-dir, have it set its saved states up for a new or resumed run)."""
    record = RecordDict({RUN_CONFIG: config_to_record(cfg), CONFIG: ConfigRecord({"resumed-from": resumed_from})})
    replies = list(grid.send_and_receive([Message(content=record, dst_node_id=node, message_type=MessageType.QUERY)
                                          for node in node_ids], timeout=TIMEOUT_S))
    nodes, names, answers, tasks, initial = {}, [None] * n, [None] * n, [None] * n, None
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
        tasks[index] = json.loads(str(m.content[CLIENT]["task"]))
    missing = [i for i in range(n) if i not in nodes.values()]
    if missing:
        raise FedDATError(f"no SuperNode serves client(s) {missing}: " + ("; ".join(_errors(replies)) or "no reply"))
    return nodes, names, dict(zip(names, answers)), dict(zip(names, tasks)), initial


def check_resumable(cfg: RunConfig, resume: Checkpoint) -> None:
    if not cfg.client_state_dir:
        raise FedDATError("this Flower run kept its clients' private state in memory or in temporary files only "
                          "(client-state-dir unset): it cannot be resumed")
    if resume.round >= cfg.rounds:
        raise FedDATError(f"{resume.path} is the checkpoint of the last round: the run is complete")


def serve(grid: Grid, cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
          t_start: float | None = None, resume: Checkpoint | None = None) -> dict:
    """The whole run on the server side; returns History.data. With out_dir: saves results.json, the
    clients' models (clients/), the server's checkpoint after every round (checkpoint/) and the tracker's logs
    there. With `resume` (a server checkpoint of this config): go on after its round; the clients read their
    private state of that round from their client-state-dir."""
    from feddat.eval.tracking import open_tracker

    t_start = time.time() if t_start is None else t_start
    cfg = replace(cfg, engine="flower").validate()
    out_dir = Path(out_dir) if out_dir is not None else None
    tracker = open_tracker(cfg.tracker, out_dir, cfg.to_dict())
    ok = False
    try:
        data = _serve(grid, cfg, out_dir, progress, t_start, tracker, resume)
        ok = True
        return data
    finally:
        if tracker is not None:
            tracker.close(ok)


def _serve(grid: Grid, cfg: RunConfig, out_dir: Path | None, progress: bool, t_start: float, tracker,
           resume: Checkpoint | None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = get_method(cfg.method)
    n = len(cfg.client_names())
    if resume is not None:
        check_resumable(cfg, resume)
    done = resume.round if resume is not None else 0
    nodes, names, label_spaces, tasks, initial = _describe(grid, _wait_for_nodes(grid, n), cfg, n, done)
    history = History(cfg.to_dict(), names, label_spaces, tasks)
    if (privacy := privacy_report(cfg)) is not None:
        history.data["privacy"] = privacy
    if resume is not None:
        check_fits(resume, initial, {})
        initial = resume.global_state
        history.data["rounds"] = list(resume.history["rounds"])
    history.attach(tracker)
    bar = tqdm(total=cfg.rounds - done, desc=cfg.method, unit="round", disable=not progress)
    timeout = cfg.round_timeout or TIMEOUT_S
    strategy = FedDATStrategy(cfg, nodes, names, history, initial, bar, export=out_dir is not None,
                              timeout=timeout, out_dir=out_dir, resumed_from=done)
    try:
        strategy.start(grid, state_to_record(initial), num_rounds=cfg.rounds - done, timeout=timeout,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    finally:
        bar.close()
    if strategy.final_evals is None:
        raise FedDATError("the run ended without a final evaluation")
    finish_history(history, method, strategy.final_evals, time.time() - t_start, strategy.final_val_evals)
    if out_dir is not None:
        from feddat.federation.export import save_clients

        missing = [n for n in names if n not in strategy.exports]
        if missing:
            raise FedDATError(f"no saved model came back from client(s) {', '.join(missing)}")
        save_clients(out_dir, strategy.exports)
        history.save(out_dir)
    return history.data


def make_server_app(cfg: RunConfig | None = None, out_dir: Path | None = None, progress: bool = True,
                    sink: dict | None = None, t_start: float | None = None,
                    resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (cfg None) for the run config Flower passes (`flwr run`; a non-empty
    `resume-dir` there resumes the run in that directory with the config saved in its checkpoint)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, out, ck = cfg, out_dir, resume
        if cfg is None:
            values = dict(context.run_config)
            resume_dir = values.get("resume-dir", "") or values.get("resume_dir", "")
            run_cfg, out = config_from_values(values)
            if resume_dir:
                from feddat.federation.checkpoint import RESUME_MAY_CHANGE, load_checkpoint, resume_config

                ck = load_checkpoint(Path(resume_dir))
                run_cfg = resume_config(ck.config, {k: getattr(run_cfg, k) for k in RESUME_MAY_CHANGE})
                out = out or Path(resume_dir)
        try:
            data = serve(grid, run_cfg, out, progress, t_start, ck)
        except FedDATError as e:
            if sink is not None:
                sink["error"] = e  # run_flower raises it: the simulation itself only logs it
            raise
        finally:  # the clients' temporary state files on this machine (a simulation's), whatever the end
            remove_temporary_node_dirs(context.run_id)
        if sink is not None:
            sink["results"] = data

    return app


server_app = make_server_app()


# ----- Python entry -----
def run_flower(cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
               resume: Checkpoint | None = None) -> dict:
    """Run on Flower's simulation engine (Ray) in this process: one SuperNode per client, one Ray worker (one
    backbone) serving them in turn. Returns the results dict of `inprocess.run` for the same config. With
    `resume` (the server checkpoint of an interrupted run of this config, which set client-state-dir): go on
    after its round."""
    from flwr.simulation import run_simulation

    t_start = time.time()
    cfg = replace(cfg, engine="flower").validate()
    if resume is not None:
        check_resumable(cfg, resume)
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
        run_simulation(server_app=make_server_app(cfg, out_dir, progress, sink, t_start, resume), client_app=client_app,
                       num_supernodes=len(cfg.client_names()), backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
    if "error" in sink:
        raise sink["error"]
    if "results" not in sink:
        raise FedDATError("the Flower simulation ended without results; see its log above")
    return sink["results"]
