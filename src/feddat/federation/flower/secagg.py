"""Secure aggregation of the shared adapter with Flower's SecAgg+ (`secure_aggregation = true`).

Flower ships SecAgg+ for its legacy engine only: `SecAggPlusWorkflow` (flwr/server/workflow/secure_aggregation/)
takes a `LegacyContext` whose legacy strategy sampled clients (`configure_fit`) and receives the unmasked mean
(`aggregate_fit`); the ClientApp side, `secaggplus_mod` (flwr/client/mod/secure_aggregation/), answers the
protocol's four stages itself and, in the third, calls the app's train function with a legacy FitIns record
(`fitins.parameters`, `fitins.config`) and expects a legacy FitRes record back. This module is the glue:

- server (`secure_round`): inside our Message-API strategy's `aggregate_train`, runs the workflow over the
  round's nodes with a small legacy strategy that sends the global adapter (in sorted key order) and the run
  config as FitIns, and takes the unmasked weighted mean of the clients' changes of the global adapter;
- client (`secure_aggregation_mod`, on the ClientApp's train function): hands the protocol's messages to
  `secaggplus_mod`, translating its FitIns into our train message and our reply into a FitRes whose parameters
  are the change of the global adapter and whose weight is the sample count capped at the largest count the
  clients reported at the start (SecAgg+'s `max_weight`), or 1 for `aggregation = "equal"`.

The server never sees one client's update, so what it checks per update elsewhere is impossible here: the
config refuses secure aggregation with the robust rules, `max-update-norm`, central DP and round retries. The
mean is checked (keys, shapes, finite values) before it becomes the global adapter. SecAgg+ quantises each
value to 2**22 levels over [-8, 8] (the workflow's defaults), so the aggregate differs from the exact mean by
about 4e-6 per coordinate; a change outside [-8, 8] would be clipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.federation.flower.records import ARRAYS, CONFIG, METRICS, RUN_CONFIG, record_to_state

# Flower's SecAgg+ and legacy-compat modules (flwr.server.workflow, flwr.client.mod, flwr.compat, flwr.common) are
# imported where they are used: only a run with secure aggregation needs them.

State = dict[str, torch.Tensor]

NUM_SHARES = 1.0              # every client shares its secrets with every other
RECONSTRUCTION_THRESHOLD = 0.7  # of the shares, needed to unmask (with 3 clients: 2, so one may drop out)
RUN_CONFIG_KEY = "feddat.run-config"
ROUND_KEY = "feddat.server-round"
RESUMED_KEY = "feddat.resumed-from"
KEYS_KEY = "feddat.keys"
MAX_WEIGHT_KEY = "feddat.max-weight"
INDEXES_KEY = "feddat.client-indexes"  # with nodes: {node id: the client index the server gave that node}


# ----- server -----
@dataclass
class _Proxy:
    node_id: int


class _Nodes:
    """What the workflow asks of a legacy client manager."""

    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n


@dataclass
class SecureResult:
    """One SecAgg+ round as the server sees it."""
    mean_change: State | None              # weighted mean of the clients' changes of the global adapter
    answered: dict[int, dict[str, Any]]    # node id -> the client's metrics (num-examples, client-index, train.*)
    failures: list[str]                    # what went wrong with the others


class _LegacyRound:
    """The two hooks SecAggPlusWorkflow calls on a legacy strategy."""

    def __init__(self, node_ids: list[int], global_state: State, config: dict[str, Any]):
        self.node_ids, self.global_state, self.config = node_ids, global_state, config
        self.keys = sorted(global_state)
        self.result: SecureResult | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, ndarrays_to_parameters

        arrays = [self.global_state[k].detach().cpu().numpy() for k in self.keys]
        fitins = FitIns(ndarrays_to_parameters(arrays), dict(self.config, **{KEYS_KEY: json.dumps(self.keys)}))
        return [(_Proxy(n), fitins) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        answered = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        mean = None
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            if len(arrays) != len(self.keys):
                raise FedDATError(f"secure aggregation returned {len(arrays)} arrays for the adapter's "
                                  f"{len(self.keys)} tensors")
            mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64).copy()) for k, a in zip(self.keys, arrays)}
        self.result = SecureResult(mean, answered, [str(f) for f in failures])
        return None, {}


def secure_round(grid, node_ids: list[int], global_state: State, config: dict[str, Any], cfg: RunConfig,
                 server_round: int, timeout: float, weight_bound: int) -> SecureResult:
    """Run SecAgg+ once over `node_ids` (the clients of the round); `config` travels to every client's train
    function, with `weight_bound` (`max_weight`), the most one client's weight may be. The result's
    `mean_change` is None when the protocol halted (too few clients went on)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    strategy = _LegacyRound(node_ids, global_state, dict(config, **{MAX_WEIGHT_KEY: weight_bound}))
    state = RecordDict({MAIN_PARAMS_RECORD: ArrayRecord(),
                        MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy,
                            client_manager=_Nodes(len(node_ids)))
    workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=float(weight_bound),
                                  timeout=timeout)
    workflow(grid, context)
    return strategy.result or SecureResult(None, {}, ["the SecAgg+ protocol halted: too few clients went on "
                                                      "(see the ServerApp's log)"])


def max_weight(cfg: RunConfig, counts: dict[str, int]) -> int:
    """SecAgg+'s bound on one client's weight: the largest training count the clients reported at the start
    (each capped at what the server lets one client claim), or 1 for equal weights."""
    if cfg.aggregation != "samples":
        return 1
    return max(min(c, cfg.max_train_examples) for c in counts.values())


def new_global(global_state: State, mean_change: State) -> State:
    """The new global adapter: the old one plus the securely aggregated mean change; FedDATError unless the
    mean fits the adapter (keys, shapes) and is finite."""
    if set(mean_change) != set(global_state):
        raise FedDATError(f"secure aggregation returned tensors {sorted(mean_change)} for the adapter's "
                          f"{sorted(global_state)}")
    out = {}
    for k, ref in global_state.items():
        change = mean_change[k].reshape(ref.shape) if mean_change[k].numel() == ref.numel() else None
        if change is None:
            raise FedDATError(f"secure aggregation returned {k} of shape {tuple(mean_change[k].shape)}, "
                              f"expected {tuple(ref.shape)}")
        if not torch.isfinite(change).all():
            raise FedDATError(f"the securely aggregated change of {k} holds NaN or infinite values")
        out[k] = (ref.double() + change).to(ref.dtype)
    return out


# ----- client -----
def is_secure(msg) -> bool:
    """Whether a train message belongs to the SecAgg+ protocol."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_mod(msg, context, call_next: Callable):
    """ClientApp mod for the train function: SecAgg+ messages go through Flower's `secaggplus_mod`, which calls
    the train function (translated, `_as_legacy_fit`) in the protocol's third stage; other messages pass."""
    from flwr.client.mod import secaggplus_mod

    if msg.has_error() or not is_secure(msg):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _as_legacy_fit(m, c, call_next))


def _as_legacy_fit(msg, context, call_next: Callable):
    """Our train function on a legacy FitIns record; its reply as a legacy FitRes record whose parameters are
    the change of the global adapter and whose weight is what SecAgg+ multiplies it by."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = json.loads(str(fitins.config[KEYS_KEY]))
    run_config = json.loads(str(fitins.config[RUN_CONFIG_KEY]))
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(global_arrays):
        raise FedDATError(f"secure aggregation sent {len(global_arrays)} arrays for {len(keys)} tensor names")
    config = {"server-round": int(fitins.config[ROUND_KEY]), "resumed-from": int(fitins.config[RESUMED_KEY])}
    if INDEXES_KEY in fitins.config:  # a node with its own data learns its index from the server
        config["client-index"] = int(json.loads(str(fitins.config[INDEXES_KEY]))[str(context.node_id)])
    ours = RecordDict({
        ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, global_arrays)}),
        CONFIG: ConfigRecord(config),
        RUN_CONFIG: ConfigRecord(run_config),
    })
    original = msg.content
    msg.content = ours
    try:
        reply = call_next(msg, context)
    finally:
        msg.content = original
    if reply.has_error():
        return reply
    update = record_to_state(reply.content[ARRAYS]) if ARRAYS in reply.content else None
    if update is None or set(update) != set(keys):
        raise FedDATError("the train function sent no update of the shared adapter to aggregate securely")
    change = [update[k].double().numpy() - np.asarray(a, dtype=np.float64) for k, a in zip(keys, global_arrays)]
    metrics = dict(reply.content[METRICS])
    cfg = RunConfig.from_values(run_config)
    bound = int(fitins.config[MAX_WEIGHT_KEY])
    weight = min(int(metrics["num-examples"]), bound) if cfg.aggregation == "samples" else 1
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(change), weight,
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, bytes))})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
