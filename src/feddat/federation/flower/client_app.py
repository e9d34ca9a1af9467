"""The ClientApp of the Flower engine: `describe` (query), `train` and `evaluate` for the client a node serves.

Each node builds one `Setup` (backbone, data, worker) per process, whatever the number of clients it serves; a
client's private state lives in the node's store or in `context.state` (feddat.federation.client_state). The
messages are described in feddat.federation.flower.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddat.config import RunConfig, normalise
from feddat.data.benchmarks import ClientData
from feddat.errors import FedDATError
from feddat.eval.results import History
from feddat.federation.client_state import NODE_LOCAL, RoundStates, node_states
from feddat.fault_spec import parse_faults
from feddat.federation.faults import check_crash, corrupt, delay
from feddat.federation.flower.records import (ARRAYS, CLIENT, CONFIG, METRICS, MODEL_META, RUN_CONFIG, STATE_KEY,
                                              config_from_values, record_to_state, state_to_record)
from feddat.federation.flower.secagg import secure_aggregation_mod
from feddat.federation.inprocess import build
from feddat.federation.export import write_client
from feddat.federation.rounds import (Setup, client_export, client_item_var, evaluate_client, finish_history,
                                      reported_views)
from feddat.federation.worker import State

log = logging.getLogger(__name__)

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
                          "(simulation sets partition-id itself), or, to bring its own data, 'data=PATH' with a "
                          "run that sets nodes")
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise FedDATError(f"{key} must be an integer, got {value!r}") from None
    if not 0 <= index < n_clients:
        raise FedDATError(f"{key}={index} is out of range: the run has {n_clients} clients (0..{n_clients - 1})")
    return index


def node_data_config(cfg: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """The config this node runs. In a run with `nodes` (every party brings its own data) the server's config,
    with this node's own client folder (node config `data=PATH`, named `name=` or by the folder) as its one
    client; otherwise `cfg` itself."""
    data = str(node_config.get("data", "") or "")
    if not cfg.nodes:
        if data:
            raise FedDATError(f"this SuperNode brings its own data (node config data={data}), but the run takes its "
                              "clients from the server's config: start the run with nodes=<number of SuperNodes>")
        return cfg
    if not data:
        raise FedDATError("in this run every SuperNode brings its own data: start it with --node-config "
                          "'data=PATH' (its client folder, docs/own-data.md; optional name=NAME, out=DIR)")
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise FedDATError(f"node config data={data}: no such file or folder on this node")
    name = str(node_config.get("name", "") or path.name)
    if not name or any(ch in name for ch in ",=/") or name.startswith("."):
        raise FedDATError(f"node config name={name!r}: a client name is a folder-like word (no ',', '=' or '/')")
    if "," in str(path):
        raise FedDATError(f"node config data={data}: the path may not hold a comma; move or link the folder")
    return replace(cfg, client_data=f"{name}={path}").validate()


@dataclass
class Served:
    """What one message concerns on this node: the config it runs, the process's Setup, the client and its index
    in the federation (which seeds it; with `nodes`, the server's numbering, absent from its first query)."""

    cfg: RunConfig
    setup: Setup
    client: ClientData
    index: int | None

    @property
    def own_data(self) -> bool:
        """Whether this node brings its own data: then no record, label, model or per-item score leaves it."""
        return bool(self.cfg.nodes)


def _show_our_log() -> None:
    """A SuperNode prints Flower's log only: a node with its own data also prints ours (the folder it serves,
    what it read and skipped) through Flower's console handler, for the party that runs it."""
    ours, flwr = logging.getLogger("feddat"), logging.getLogger("flwr")
    if not ours.handlers and flwr.handlers:
        for handler in flwr.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def _served(msg: Message, context: Context) -> Served:
    values = dict(msg.content[RUN_CONFIG])
    for key, v in context.node_config.items():
        if key.replace("-", "_") in NODE_LOCAL:  # node-local keys, dashes or underscores as the node gives them
            values.update(normalise({key: v}))
    cfg, _ = config_from_values(values)
    cfg = node_data_config(cfg, context.node_config)
    if cfg.nodes:
        _show_our_log()
    setup = get_setup(cfg)
    if cfg.nodes:
        given = msg.content[CONFIG].get("client-index") if CONFIG in msg.content else None
        return Served(cfg, setup, setup.clients[0], None if given is None else int(given))
    index = client_index(context.node_config, len(setup.clients))
    return Served(cfg, setup, setup.clients[index], index)


def _store(s: Served, context: Context) -> RoundStates | None:
    """Where this node keeps its clients' private states between their rounds: files (client-state-dir set, or
    more than STATES_IN_MEMORY_UP_TO clients), or None: context.state (feddat.federation.client_state)."""
    return node_states(s.cfg.to_dict(), s.cfg.client_state_dir, s.cfg.n_clients, context.run_id)


def _initial_state(s: Served) -> State:
    return s.setup.worker.initial_state(s.index, s.client.head_spec, s.cfg.seed)


def _client_state(msg: Message, context: Context, s: Served, upto: int, store: RoundStates | None) -> State:
    """The client's private state: its newest saved state of round `upto` or before in the node's store, or
    (states in memory) context.state; else, in a new run, the worker's initial one."""
    name = s.client.name
    if store is not None:
        state = store.load(name, upto)
    else:
        state = record_to_state(context.state[STATE_KEY]) if STATE_KEY in context.state else None
    if state is not None:
        return state
    if int(msg.content[CONFIG].get("resumed-from", 0)) > 0:
        raise FedDATError(f"client {name} has no saved state to resume from (client-state-dir: "
                          f"{s.cfg.client_state_dir})")
    return _initial_state(s)


def _keep_state(context: Context, store: RoundStates | None, name: str, round_number: int, state: State) -> None:
    """After the client's round: into its file (only there), or into context.state."""
    if store is not None:
        store.save(name, round_number, state)
    else:
        context.state[STATE_KEY] = state_to_record(state)


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict, **client: Any) -> Message:
    """A reply: `metrics` (numbers), the arrays if any, and a "client" record only with `client` values (the
    query's name and description, a final evaluation's saved model)."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if client:
        content[CLIENT] = ConfigRecord(client)
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def _start_store(msg: Message, context: Context, s: Served) -> None:
    """Have the node's store of private states set up for a new or resumed run (with client-state-dir)."""
    store = _store(s, context)
    if store is not None and store.resumable:
        resumed_from = int(msg.content[CONFIG].get("resumed-from", 0))
        store.start(s.client.name, resumed_from)
        if resumed_from == 0:  # a client that sits out until an interruption still has a state to resume from
            store.save(s.client.name, 0, _initial_state(s))


client_app = ClientApp()


@client_app.query()
def describe(msg: Message, context: Context) -> Message:
    """The run's start. A node serving a client of the server's config: its index, name, label space and task,
    the starting global adapter, whether it keeps its private states on disk (its store set up). A node with its own data, first query: its name, training
    count, task kind, the starting global adapter and whether it keeps its states on disk; second query (with the index the server gave it): its
    store set up."""
    s = _served(msg, context)
    c = s.client
    store = _store(s, context)
    keeps = int(store is not None and store.resumable)  # its private states on disk: a run can be resumed
    if s.own_data:
        if s.index is None:
            log.info("serving client %s from %s", c.name, s.cfg.client_folders()[0][1])
            return _reply(msg, state_to_record(s.setup.worker.initial_global(s.cfg.seed)),
                          {"num-examples": len(c.train), "keeps-state": keeps}, name=c.name,
                          task=json.dumps(c.describe()))
        _start_store(msg, context, s)
        return _reply(msg, None, {"client-index": s.index})
    _start_store(msg, context, s)
    return _reply(msg, state_to_record(s.setup.worker.initial_global(s.cfg.seed)),
                  {"client-index": s.index, "num-examples": len(c.train), "keeps-state": keeps}, name=c.name,
                  answers=list(c.answers), task=json.dumps(c.describe()))


@client_app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    s = _served(msg, context)
    c, cfg = s.client, s.cfg
    store = _store(s, context)
    round_idx = int(msg.content[CONFIG]["server-round"]) - 1
    state = _client_state(msg, context, s, round_idx, store)
    global_state = record_to_state(msg.content[ARRAYS])
    faults = parse_faults(cfg.fault_injection)
    check_crash(faults, c.name, round_idx + 1, int(msg.content[CONFIG].get("attempt", 0)))
    res = s.setup.worker.fit(c, state, global_state, round_idx, cfg.rounds, cfg.seed, s.index)
    _keep_state(context, store, c.name, round_idx + 1, res.state)
    if (late := delay(faults, c.name, round_idx + 1)) > 0:
        time.sleep(late)
    metrics = {"num-examples": res.num_examples, "client-index": s.index}
    metrics.update({f"train.{k}": float(v) for k, v in res.metrics.items()})
    update = corrupt(res.update, global_state, faults, c.name, round_idx + 1)
    return _reply(msg, state_to_record(update), metrics)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s = _served(msg, context)
    c, setup = s.client, s.setup
    method = setup.worker.method
    final = bool(msg.content[CONFIG].get("final", False))
    store = _store(s, context)
    state = _client_state(msg, context, s, int(msg.content[CONFIG]["server-round"]), store)
    if final and store is not None:
        store.finish(c.name)  # a temporary store: the client's last use of its state
    global_state = record_to_state(msg.content[ARRAYS])
    evals = evaluate_client(setup, c, state, global_state, reported_views(method) if final else None)
    main = evals[method.predict_view]
    metrics = {"client-index": s.index, "num-examples": len(c.test), "score": main["score"]}
    if not final:
        return _reply(msg, None, metrics)
    metrics.update({f"score.{v}": e["score"] for v, e in evals.items()})
    metrics.update({f"breakdown.{k}": float(v) for k, v in main.get("breakdown", {}).items()})
    val = evaluate_client(setup, c, state, global_state, (method.predict_view,), split="val")
    metrics["val-score"] = val[method.predict_view]["score"]  # for tuning
    if s.own_data:  # aggregates only leave the node; its model and per-item scores stay on its disk
        metrics["item-var"] = client_item_var(main)
        save_node_client(s, context.node_config, state, global_state, evals, val)
        return _reply(msg, None, metrics)
    metrics["scores"] = [float(x) for x in main["scores"].tolist()]
    if bool(msg.content[CONFIG].get("export", False)):
        tensors, meta = client_export(setup, s.index, state, global_state)
        return _reply(msg, state_to_record(tensors), metrics, name=c.name, **{MODEL_META: json.dumps(meta)})
    return _reply(msg, None, metrics)


def save_node_client(s: Served, node_config: Mapping[str, Any], state: State, global_state: State | None,
                     evals: dict[str, dict], val: dict[str, dict]) -> None:
    """A node with its own data keeps its personalised model on its own disk: under node config `out=DIR`,
    `clients/<name>/` and a results.json of this client alone (what `feddat eval` / `feddat predict --run DIR`
    and `feddat.load_client` read). Without `out` the model is not kept (a warning says so)."""
    out = str(node_config.get("out", "") or "")
    c = s.client
    if not out:
        log.warning("client %s: the node config sets no out=DIR, so its personalised model is not saved", c.name)
        return
    out_dir = Path(out).expanduser()
    write_client(out_dir, *client_export(s.setup, 0, state, global_state))
    method = s.setup.worker.method
    history = History(s.cfg.to_dict(), [c.name], {c.name: list(c.answers)}, {c.name: c.describe()})
    finish_history(history, method, {c.name: evals}, time.time() - s.setup.started, {c.name: val})
    history.save(out_dir)
    log.info("client %s: saved its personalised model and scores in %s", c.name, out_dir)
