"""The ClientApp of the Flower engine: `describe` (query), `train` and `evaluate` for the client a node serves.

Each node builds one `Setup` (backbone, data, worker) per process, whatever the number of clients it serves; a
client's private state lives in the node's store or in `context.state` (feddat.federation.client_state). The
messages are described in feddat.federation.flower.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddat.config import RunConfig, normalise
from feddat.errors import FedDATError
from feddat.federation.client_state import NODE_LOCAL, RoundStates, node_states
from feddat.fault_spec import parse_faults
from feddat.federation.faults import check_crash, corrupt, delay
from feddat.federation.flower.records import (ARRAYS, CLIENT, CONFIG, METRICS, MODEL_META, RUN_CONFIG, STATE_KEY,
                                              config_from_values, record_to_state, state_to_record)
from feddat.federation.flower.secagg import secure_aggregation_mod
from feddat.federation.inprocess import build
from feddat.federation.rounds import Setup, client_export, evaluate_client, reported_views
from feddat.federation.worker import State

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
        if key.replace("-", "_") in NODE_LOCAL:  # node-local keys, dashes or underscores as the node gives them
            values.update(normalise({key: v}))
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
        tensors, meta = client_export(setup, index, state, global_state)
        return _reply(msg, state_to_record(tensors), metrics, c.name, **{MODEL_META: json.dumps(meta)})
    return _reply(msg, None, metrics, c.name)
