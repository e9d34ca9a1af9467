"""What the drivers of a run share: the per-process `Setup`, scoring clients and rounds, restoring from a
checkpoint, the final report and the clients' saved models.

The in-process engine (feddat.federation.inprocess), the pooled references' driver (feddat.federation.pooled)
and the Flower apps (feddat.federation.flower) all import this module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddat.config import RunConfig
from feddat.data.benchmarks import ClientData
from feddat.eval.results import History, item_var
from feddat.federation.checkpoint import Checkpoint, check_fits
from feddat.federation.export import FORMAT, backbone_record, write_client
from feddat.federation.worker import State, Worker


NODES_NEED_SUPERNODES = ("nodes (each SuperNode brings its own data) needs SuperNodes of their own: feddat deploy "
                         "--client-data, or flower-supernode --node-config 'data=PATH' on each party's machine; to "
                         "simulate on your folders in one process, use --clients-dir or --client")


@dataclass
class Setup:
    cfg: RunConfig
    clients: list[ClientData]
    worker: Worker
    started: float = field(default_factory=time.time)  # when it was built (a node's own report's wall time)


def evaluate_client(setup: Setup, client: ClientData, state: State, global_state: State | None, views=None,
                    split: str = "test") -> dict[str, dict]:
    """One client's scores ({view: {"score", "scores", "predictions"}}); engines call this per client."""
    return setup.worker.evaluate(client, state, global_state, split, views,
                                 newest_global=setup.cfg.eval_frozen == "newest")


def evaluate_all(setup: Setup, states: dict[str, State], global_state: State | None, views=None,
                 split: str = "test") -> dict[str, dict]:
    return {c.name: evaluate_client(setup, c, states[c.name], global_state, views, split) for c in setup.clients}


def evaluate_round(setup: Setup, states, global_state: State | None, r: int) -> tuple[dict, dict | None]:
    """Every client scored after round `r`: (the predicting view's score per client; the evaluations over every
    reported view when `r` is the last round, which the final report then reuses rather than redoes)."""
    method = setup.worker.method
    last = r + 1 == setup.cfg.rounds
    evals = evaluate_all(setup, states, global_state, reported_views(method) if last else None)
    scores = {c: e[method.predict_view]["score"] for c, e in evals.items()}
    return scores, evals if last else None


def reported_views(method) -> tuple[str, ...]:
    """The views the final report scores: the predicting one first, then those reported for information."""
    return (method.predict_view,) + method.report_views


def finish_history(history: History, method, evals: dict[str, dict], wall: float,
                   val_evals: dict[str, dict] | None = None) -> None:
    """Fill the final report from per-client evaluations over `reported_views(method)`, in client order;
    `val_evals` (the predicting view on the validation splits) adds `val_clients` and `val_avg_score`."""
    views = reported_views(method)
    main = method.predict_view
    history.finish(
        val={c: e[main]["score"] for c, e in val_evals.items()} if val_evals else None,
        breakdown={c: e[main].get("breakdown", {}) for c, e in evals.items()},
        clients={c: e[main]["score"] for c, e in evals.items()},
        item_vars={c: client_item_var(e[main]) for c, e in evals.items()},
        views={v: {c: e[v]["score"] for c, e in evals.items()} for v in views},
        wall_seconds=wall,
    )


def client_item_var(evaluation: dict) -> float:
    """A client's `item_var` from its evaluation of one view: its per-item scores, or (a client that keeps them
    to itself) the `item_var` it reported."""
    if "scores" in evaluation:
        return item_var(evaluation["scores"].tolist())
    return float(evaluation["item_var"])


def client_export(setup: Setup, index: int, state: State,
                  global_state: State | None) -> tuple[State, dict[str, Any]]:
    """(tensors, client.json content) of client `index` of a Setup (the engines' per-process objects), for
    `feddat.federation.export.write_client`."""
    cfg: RunConfig = setup.cfg
    worker = setup.worker
    method = worker.method
    client = setup.clients[index]
    tensors = worker.export(state, global_state, client.head_spec, cfg.eval_frozen == "newest")
    meta = {
        "format": FORMAT,
        "client": client.name,
        "method": method.name,
        "predict_view": method.predict_view,
        "views": list(reported_views(method)),
        "eval_frozen": cfg.eval_frozen,
        "backbone": backbone_record(cfg.model_path, worker.model.backbone),
        "adapters": {"names": list(method.adapters), "shared": method.shared, "reduction": cfg.reduction,
                     "bottleneck": worker.bottleneck, "dim": worker.dim, "layers": len(worker.model.slots)},
        "head": {"task": client.task, "dim": worker.dim, "n_answers": len(client.answers)},
        "local": dataclasses.asdict(worker.local),
        "method_config": dataclasses.asdict(method.config),
        "answers": list(client.answers),
        "run": {"benchmark": cfg.benchmark, "seed": cfg.seed, "rounds": cfg.rounds},
    }
    return tensors, meta


def save_client_models(setup: Setup, out_dir: Path, states: dict[str, State], global_state: State | None) -> None:
    """Every client's personalised model under out_dir/clients/<client>/ (see feddat.federation.export)."""
    for i, c in sorted(enumerate(setup.clients), key=lambda ic: ic[1].name):  # one at a time: memory stays flat
        write_client(out_dir, *client_export(setup, i, states[c.name], global_state))


def finish_run(setup: Setup, core, states, global_state, t_start: float, evals: dict[str, dict] | None = None) -> dict:
    """The final evaluation (reusing the last round's test `evals` over `reported_views` of these very states,
    when given; the validation splits for tuning), then (with an out dir) every client's model, then the
    report (`core`: the run's feddat.federation.core.RunCore)."""
    method = setup.worker.method
    val_evals = evaluate_all(setup, states, global_state, (method.predict_view,), split="val")
    if evals is None:
        evals = evaluate_all(setup, states, global_state, reported_views(method))
    wall = time.time() - t_start
    if core.out_dir is not None:
        save_client_models(setup, core.out_dir, states, global_state)
    return core.finish(method, evals, wall, val_evals)


def restore(resume: Checkpoint | None, global_state, states, order_rng: np.random.Generator,
            history: History) -> tuple:
    """(global state, first round to run): from `resume` if given (its client states, client-order and torch RNG
    states and rounds so far are put back in place), else (global_state, 0)."""
    if resume is None:
        return global_state, 0
    check_fits(resume, global_state, states)
    states.update(resume.states)
    order_rng.bit_generator.state = resume.order_rng
    torch.set_rng_state(resume.torch_rng)
    history.data["rounds"] = list(resume.history["rounds"])
    return resume.global_state, resume.round
