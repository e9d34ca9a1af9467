"""The embedded engine: every client in one process, one after another; fast and deterministic."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feddat.algorithms.registry import get_method
from feddat.config import RunConfig
from feddat.data.benchmarks import ClientData, load_benchmark
from feddat.eval.results import History
from feddat.federation.aggregate import update_bytes, validate_update, weighted_mean
from feddat.federation.worker import State, Worker, mix_seed
from feddat.models.backbone import load_backbone


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDDAT_CACHE", Path.home() / ".cache" / "feddat"))


@dataclass
class Setup:
    cfg: RunConfig
    clients: list[ClientData]
    worker: Worker


def build(cfg: RunConfig) -> Setup:
    """Backbone, data and the per-process worker for a validated config."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backbone, tokenizer = load_backbone(cfg.model_path, cfg.device)
    text_len = backbone.config.max_position_embeddings
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    clients = load_benchmark(cfg.benchmark, cfg.seed, cfg.sizes, tokenizer, text_len, cache)
    worker = Worker(get_method(cfg.method), backbone, cfg.reduction, cfg.local, cfg.device, cfg.warmup)
    return Setup(cfg, clients, worker)


def aggregate(cfg: RunConfig, updates: dict[str, State], num_examples: dict[str, int], reference: State) -> State:
    """Validate every update against the current global adapter, then FedAvg them."""
    names = sorted(updates)
    for name in names:
        validate_update(updates[name], reference, name)
    weights = [float(num_examples[n]) if cfg.aggregation == "samples" else 1.0 for n in names]
    return weighted_mean([updates[n] for n in names], weights)


def evaluate_client(setup: Setup, client: ClientData, state: State, global_state: State | None, views=None,
                    split: str = "test") -> dict[str, dict]:
    """One client's scores ({view: {"score", "scores", "predictions"}}); engines call this per client."""
    return setup.worker.evaluate(client, state, global_state, split, views,
                                 newest_global=setup.cfg.eval_frozen == "newest")


def evaluate_all(setup: Setup, states: dict[str, State], global_state: State | None, views=None,
                 split: str = "test") -> dict[str, dict]:
    return {c.name: evaluate_client(setup, c, states[c.name], global_state, views, split) for c in setup.clients}


def reported_views(method) -> tuple[str, ...]:
    """The views the final report scores: the predicting one first, then those reported for information."""
    return (method.predict_view,) + method.report_views


def finish_history(history: History, method, evals: dict[str, dict], wall: float) -> None:
    """Fill the final report from per-client evaluations over `reported_views(method)`, in client order."""
    views = reported_views(method)
    main = method.predict_view
    history.finish(
        breakdown={c: e[main].get("breakdown", {}) for c, e in evals.items()},
        clients={c: e[main]["score"] for c, e in evals.items()},
        per_item={c: e[main]["scores"].tolist() for c, e in evals.items()},
        views={v: {c: e[v]["score"] for c, e in evals.items()} for v in views},
        wall_seconds=wall,
    )


def final_report(setup: Setup, history: History, states, global_state, wall: float) -> None:
    method = setup.worker.method
    evals = evaluate_all(setup, states, global_state, reported_views(method))
    finish_history(history, method, evals, wall)


def save_client_models(setup: Setup, out_dir: Path, states: dict[str, State], global_state: State | None) -> None:
    """Every client's personalised model under out_dir/clients/<client>/ (see feddat.federation.export)."""
    from feddat.federation.export import client_export, save_clients

    save_clients(out_dir, {c.name: client_export(setup, i, states[c.name], global_state)
                           for i, c in enumerate(setup.clients)})


def run(cfg: RunConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Train and score every client. With out_dir: results.json, the saved client models (clients/) and the
    tracker's logs go there."""
    from feddat.eval.tracking import open_tracker

    t_start = time.time()
    out_dir = Path(out_dir) if out_dir is not None else None
    tracker = open_tracker(cfg.tracker, out_dir, cfg.to_dict())
    ok = False
    try:
        data = _run(cfg, out_dir, progress, tracker, t_start)
        ok = True
        return data
    finally:
        if tracker is not None:
            tracker.close(ok)


def _run(cfg: RunConfig, out_dir: Path | None, progress: bool, tracker, t_start: float) -> dict:
    setup = build(cfg)
    worker, clients = setup.worker, setup.clients
    torch.manual_seed(cfg.seed)
    states = {c.name: worker.initial_state(i, len(c.answers), cfg.seed) for i, c in enumerate(clients)}
    global_state = worker.initial_global(cfg.seed)
    history = History(cfg.to_dict(), [c.name for c in clients], {c.name: c.answers for c in clients})
    history.attach(tracker)
    steps = cfg.rounds * sum(worker.steps_per_round(len(c.train)) for c in clients)
    bar = tqdm(total=steps, desc=f"{cfg.method}", unit="step", disable=not progress)
    order_rng = np.random.default_rng(mix_seed(cfg.seed, 0x0DE))
    for r in range(cfg.rounds):
        t_round = time.time()
        train, updates, sizes = {}, {}, {}
        for i in order_rng.permutation(len(clients)):
            c = clients[i]
            bar.set_description(f"{cfg.method} round {r + 1}/{cfg.rounds} {c.name}")
            res = worker.fit(c, states[c.name], global_state, r, cfg.rounds, cfg.seed, int(i), bar)
            states[c.name] = res.state
            train[c.name] = res.metrics
            sizes[c.name] = res.num_examples
            if res.update is not None:
                updates[c.name] = res.update
        bytes_sent = {n: update_bytes(u) for n, u in updates.items()} or {c.name: 0 for c in clients}
        if updates:
            global_state = aggregate(cfg, updates, sizes, global_state)
        scores = None
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
            evals = evaluate_all(setup, states, global_state)
            scores = {c: e[worker.method.predict_view]["score"] for c, e in evals.items()}
            bar.write(f"round {r + 1}: mean test score {sum(scores.values()) / len(scores):.4f}")
        history.add_round(r, train, scores, bytes_sent, time.time() - t_round)
    bar.close()
    final_report(setup, history, states, global_state, time.time() - t_start)
    if out_dir is not None:
        save_client_models(setup, out_dir, states, global_state)
        history.save(out_dir)
    return history.data
