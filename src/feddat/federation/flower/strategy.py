"""The server's Strategy of the Flower engine: one round's train and evaluate messages, their replies handed to
the same `RoundCollector` and `History` as the in-process engine's (feddat.federation.server, eval.results)."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from feddat.algorithms.registry import get_method
from feddat.errors import FedDATError
from feddat.federation.aggregate import update_bytes
from feddat.federation.flower.records import (ARRAYS, CLIENT, CONFIG, METRICS, MODEL_META, RUN_CONFIG,
                                              config_to_record, log_received, record_to_state, state_to_record)
from feddat.federation.flower.secagg import (INDEXES_KEY, RESUMED_KEY, ROUND_KEY, RUN_CONFIG_KEY, max_weight,
                                             new_global, secure_round)
from feddat.federation.rounds import reported_views
from feddat.federation.core import RunCore
from feddat.federation.server import RoundCollector
from feddat.federation.worker import State

log = logging.getLogger(__name__)

TIMEOUT_S = 3600.0  # seconds the server waits for the replies of one send (a run's round-timeout overrides it)


def short_reason(reason: str) -> str:
    """The gist of a ClientApp's error reply (Flower sends the whole remote traceback, with process ids)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    said = re.findall(r"Message: (.*)", text)
    line = said[-1] if said else next((x for x in reversed(text.splitlines()) if x.strip()), text)
    return line.strip().rstrip("'>").strip()[:300]


def reply_errors(replies: list[Message], label=None) -> list[str]:
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

    def __init__(self, core: RunCore, nodes: dict[int, int], counts: dict[str, int], global_state: State | None,
                 bar: tqdm | None = None, export: bool = False, timeout: float = TIMEOUT_S, resumed_from: int = 0):
        cfg = self.cfg = core.cfg
        self.core = core                    # the run's rounds: sampling, collecting, recording, checkpoints
        self.method = get_method(cfg.method, cfg.to_dict())
        self.nodes = nodes                  # node id -> client index
        self.names = core.names             # client names by index
        self.counts = counts                # client name -> training count, reported once at the start
        self.own_data = bool(cfg.nodes)     # the nodes bring their own data: only aggregates come back
        self.global_state = global_state    # the current aggregate, as tensors (None when nothing travels)
        self.run_record = config_to_record(cfg)
        self.bar = bar
        self.final_evals: dict[str, dict] | None = None
        self.final_val_evals: dict[str, dict] | None = None  # the predicting view on the validation splits
        self.export = export and not self.own_data  # ask the clients for their models in the final evaluation
        self.exports: dict[str, tuple[State, dict]] = {}   # client name -> (tensors, client.json)
        self.timeout = timeout              # seconds to wait for the replies of one send
        self.out_dir = core.out_dir         # where the server logs what it received (None: nowhere)
        self.offset = resumed_from          # rounds done before this start: Flower counts from 1 again
        self._round_start = 0.0
        self._grid: Grid | None = None
        self._arrays = ArrayRecord()
        self._round: RoundCollector | None = None
        self._outgoing: list[Message] = []  # the messages of the current send (their ids identify the replies)
        self._sampled: list[str] = list(self.names)  # the clients asked to train this round

    def summary(self) -> None:
        log.info("FedDAT strategy: method %s, %d clients, %d rounds, aggregation %s of %s%s", self.cfg.method,
                 len(self.names), self.cfg.rounds, self.cfg.aggregation, self.method.shared or "nothing",
                 f", central DP (clip {self.cfg.dp_clip}, noise {self.cfg.dp_noise_multiplier})" if self.cfg.dp else "")

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, kind: str,
                  names: Iterable[str] | None = None) -> list[Message]:
        """One message per client (or per client in `names`), in client order."""
        config["server-round"] = server_round
        config["resumed-from"] = self.offset
        wanted = set(self.names if names is None else names)
        self._outgoing = [Message(content=self._content(arrays, config, node), dst_node_id=node, message_type=kind,
                                  group_id=str(server_round))
                          for node in sorted(self.nodes, key=self.nodes.get) if self.names[self.nodes[node]] in wanted]
        return self._outgoing

    def _content(self, arrays: ArrayRecord, config: ConfigRecord, node: int) -> RecordDict:
        """A message's records; a node with its own data also learns its client index (which seeds it)."""
        if self.own_data:
            config = ConfigRecord({**config, "client-index": self.nodes[node]})
        return RecordDict({ARRAYS: arrays, CONFIG: config, RUN_CONFIG: self.run_record})

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
        return sorted(ok, key=lambda m: int(m.content[METRICS]["client-index"])), reply_errors(replies, self._label)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        self._round_start = time.time()
        self._grid, self._arrays = grid, arrays
        if self.bar is not None:
            self.bar.set_description(f"{self.cfg.method} round {server_round}/{self.cfg.rounds}")
        if self.cfg.secure_aggregation:
            return []  # the round's messages are SecAgg+'s, sent from aggregate_train
        self._sampled = [self.names[i] for i in self.core.sampled(server_round - 1)]
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
                               self.counts[name], update)  # the count reported at the start, fixed for the run
        for name in asked:
            if name not in heard:
                collector.failed(name, f"timed out: no answer within {self.timeout:g} s")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        secure = self.cfg.secure_aggregation
        asked = self.names if secure else self._sampled
        collector = self.core.collector(server_round - 1, asked, self.method.shared is not None and not secure,
                                        self.global_state)
        if secure:
            new = self._secure_round(collector, server_round)
        else:
            replies = list(replies)
            log_received(self.out_dir, "train", server_round, replies)
            self._collect(collector, replies, asked)
            while collector.retry():
                asked = collector.to_retry()
                config = ConfigRecord({"attempt": collector.attempts - 1})
                msgs = self._messages(server_round, self._arrays, config, MessageType.TRAIN, asked)
                replies = list(self._grid.send_and_receive(msgs, timeout=self.timeout))
                log_received(self.out_dir, "train", server_round, replies)
                self._collect(collector, replies, asked)
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
        """A training round whose updates are aggregated with SecAgg+ (feddat.federation.flower.secagg): the server
        learns each client's metrics and the mean change of the global adapter, not the updates."""
        config = {RUN_CONFIG_KEY: json.dumps(dict(self.run_record)), ROUND_KEY: server_round,
                  RESUMED_KEY: self.offset}
        if self.own_data:
            config[INDEXES_KEY] = json.dumps({str(node): index for node, index in self.nodes.items()})
        result = secure_round(self._grid, sorted(self.nodes, key=self.nodes.get), self.global_state, config,
                              self.cfg, server_round, self.timeout, max_weight(self.cfg, self.counts))
        for node, metrics in result.answered.items():
            index = self.nodes.get(node)
            if index is None or int(metrics["client-index"]) != index:
                raise FedDATError(f"round {server_round}: the SecAgg+ sum holds the update of node {node}, which "
                                  f"claims client {metrics.get('client-index')}: the round cannot be used")
            train = {k[len("train."):]: float(v) for k, v in metrics.items() if k.startswith("train.")}
            collector.answered(self.names[index], train, self.counts[self.names[index]], None)
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
        return self.core.evaluates(server_round - 1)

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
        main = out[self.method.predict_view]
        main["breakdown"] = {k[len("breakdown."):]: float(v) for k, v in metrics.items() if k.startswith("breakdown.")}
        if "scores" in metrics:
            main["scores"] = torch.tensor(metrics["scores"], dtype=torch.float64)
        else:  # a node with its own data keeps its per-item scores: the part of the variance they give
            main["item_var"] = float(metrics["item-var"])
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
        replies = list(replies)
        log_received(self.out_dir, "evaluate", server_round, replies)
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
        # the round's record and the server's part of the checkpoint (the clients keep theirs in their
        # client-state-dir)
        self.core.end_round(server_round - 1, self._round_start, scores, self.global_state, self._round)
        if self.bar is not None:
            self.bar.update(1)
        return None if scores is None else MetricRecord({"score": sum(scores.values()) / len(scores)})
