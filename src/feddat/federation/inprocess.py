"""The embedded engine: every client in one process, one after another; fast and deterministic."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feddat.algorithms.registry import get_method
from feddat.config import RunConfig
from feddat.data.benchmarks import RealData
from feddat.data.clients import load_benchmark
from feddat.data.folders import load_named_folders, load_partitioned_folders, parse_columns
from feddat.errors import FedDATError
from feddat.eval.tracking import open_tracker
from feddat.fault_spec import Fault, parse_faults
from feddat.federation.checkpoint import Checkpoint
from feddat.federation.client_state import open_states
from feddat.federation.core import RunCore
from feddat.federation.faults import check_crash, corrupt, delay
from feddat.federation.pooled import run_pooled
from feddat.federation.rounds import NODES_NEED_SUPERNODES, Setup, evaluate_round, finish_run, restore
from feddat.federation.server import RoundCollector
from feddat.federation.worker import State, Worker
from feddat.models.backbone import load_backbone
from feddat.seeding import mix_seed


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDDAT_CACHE", Path.home() / ".cache" / "feddat"))


def build(cfg: RunConfig) -> Setup:
    """Backbone, data and the per-process worker for a validated config."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backbone, tokenizer = load_backbone(cfg.model_path, cfg.device, cfg.backbone)
    text_len = backbone.config.max_position_embeddings
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.own_data:  # the user's client folders (feddat.data.folders), read lazily
        clients = load_own_data(cfg, tokenizer, text_len, int(backbone.config.image_size), cache / "datasets")
    else:
        clients = load_benchmark(cfg.benchmark, cfg.seed, cfg.sizes, tokenizer, text_len, cache,
                                 partition=cfg.partition_spec, real=real_data(cfg, backbone),
                                 clients=len(cfg.client_names()))
    worker = Worker(get_method(cfg.method, cfg.to_dict()), backbone, cfg.reduction, cfg.local, cfg.device)
    return Setup(cfg, clients, worker)


def load_own_data(cfg: RunConfig, tokenizer, text_len: int, image_size: int, cache_dir: Path) -> list:
    """The run's clients from your own folders: one per folder, or (a partition) their items pooled and split
    over num-clients clients; the first `clients` of them."""
    names = cfg.client_names()
    if cfg.partition_spec is not None:
        clients = load_partitioned_folders(cfg.client_folders(), cfg.partition_spec, tokenizer, text_len, image_size,
                                           cfg.seed, parse_columns(cfg.columns), cfg.skip_bad_records,
                                           cache_dir=cache_dir)
        return clients[:len(names)]
    return load_named_folders(cfg.client_folders()[:len(names)], tokenizer, text_len, image_size, cfg.seed,
                              parse_columns(cfg.columns), cfg.skip_bad_records, cache_dir=cache_dir)


def real_data(cfg: RunConfig, backbone):
    """Where the run reads its real datasets (None: a generated benchmark), at the backbone's image size."""
    if not cfg.data_dir:
        return None
    return RealData(cfg.data_dir, int(backbone.config.image_size), cfg.skip_bad_records)


def run(cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
        resume: Checkpoint | None = None) -> dict:
    """Train and score every client. With out_dir: results.json, the saved client models (clients/), a
    checkpoint after every round (checkpoint/) and the tracker's logs go there. With `resume` (a checkpoint
    of a run of this config, `feddat.federation.checkpoint.load_checkpoint`): go on after its last round."""
    if cfg.nodes:
        raise FedDATError(NODES_NEED_SUPERNODES)
    if cfg.secure_aggregation:
        raise FedDATError("secure-aggregation needs the Flower engine (feddat run --engine flower, flwr run or "
                          "feddat deploy): in one process there is nothing to hide the updates from")
    t_start = time.time()
    out_dir = Path(out_dir) if out_dir is not None else None
    tracker = open_tracker(cfg.tracker, out_dir, cfg.to_dict())
    ok = False
    try:
        data = _run(cfg, out_dir, progress, tracker, t_start, resume)
        ok = True
        return data
    finally:
        if tracker is not None:
            tracker.close(ok)


def _train_client(setup: Setup, collector: RoundCollector, faults: list[Fault], states: dict[str, State],
                  global_state: State | None, r: int, i: int, bar) -> None:
    """One client's round as the server sees it: an answer (update screened), or a failure or timeout."""
    cfg, c = setup.cfg, setup.clients[i]
    try:
        check_crash(faults, c.name, r + 1, collector.attempts - 1)
        t0 = time.perf_counter()
        res = setup.worker.fit(c, states[c.name], global_state, r, cfg.rounds, cfg.seed, i, bar)
        elapsed = time.perf_counter() - t0 + delay(faults, c.name, r + 1)
    except Exception as e:  # a client's failure is the round's business, not the run's
        collector.failed(c.name, f"failed: {type(e).__name__}: {e}")
        return
    states[c.name] = res.state  # the client trained: it keeps its state even if its answer comes too late
    if cfg.round_timeout and elapsed > cfg.round_timeout:
        collector.failed(c.name, f"timed out: no answer within round-timeout={cfg.round_timeout:g} s")
        return
    collector.answered(c.name, res.metrics, res.num_examples, corrupt(res.update, global_state, faults, c.name, r + 1))


def open_client_states(setup: Setup):
    """Every client's private state, starting from the worker's initial ones: a dict, or (many clients, or
    client_state_dir set) one file per client (feddat.federation.client_state)."""
    cfg, clients = setup.cfg, setup.clients
    index = {c.name: i for i, c in enumerate(clients)}
    return open_states(cfg.to_dict(), cfg.client_state_dir, list(index), lambda name: setup.worker.initial_state(
        index[name], clients[index[name]].head_spec, cfg.seed))


def _run(cfg: RunConfig, out_dir: Path | None, progress: bool, tracker, t_start: float,
         resume: Checkpoint | None) -> dict:
    setup = build(cfg)
    states = open_client_states(setup)
    try:
        if setup.worker.method.pooled:  # a centralised reference: one trainer over the pooled data
            return run_pooled(setup, states, out_dir, progress, tracker, t_start, resume)
        return _rounds(setup, states, out_dir, progress, tracker, t_start, resume)
    finally:
        if hasattr(states, "close"):
            states.close()


def _rounds(setup: Setup, states, out_dir: Path | None, progress: bool, tracker, t_start: float,
            resume: Checkpoint | None) -> dict:
    """The federated rounds in this process; one round reads top to bottom in the loop (see
    feddat.federation.core for the phases every engine shares)."""
    cfg, worker, clients = setup.cfg, setup.worker, setup.clients
    names = [c.name for c in clients]
    faults = parse_faults(cfg.fault_injection, names, cfg.rounds)
    torch.manual_seed(cfg.seed)
    global_state = worker.initial_global(cfg.seed)
    core = RunCore.open(cfg, names, {c.name: c.answers for c in clients}, {c.name: c.describe() for c in clients},
                        out_dir, train_counts={c.name: len(c.train) for c in clients})
    order_rng = np.random.default_rng(mix_seed(cfg.seed, 0x0DE))
    global_state, first = restore(resume, global_state, states, order_rng, core.history)
    core.history.attach(tracker)
    steps = sum(worker.steps_per_round(len(clients[i].train)) for r in range(first, cfg.rounds)
                for i in core.sampled(r))
    bar = core.bar = tqdm(total=steps, desc=f"{cfg.method}", unit="step", disable=not progress)
    final_evals = None  # stays None when a resumed run has no round left: the report then scores afresh
    if resume is not None:
        bar.write(f"resuming after round {first} from {resume.path}")
    for r in range(first, cfg.rounds):
        t_round = time.time()
        # 1. who trains, in a seeded order (the others sit the round out, keeping their state)
        order = [int(i) for i in order_rng.permutation(len(clients))]
        sampled = core.sampled(r)
        if cfg.samples_clients:
            chosen = set(sampled)
            order = [i for i in order if i in chosen]
        # 2. each trains and answers; the collector screens the answers and asks the missing ones again
        collector = core.collector(r, [names[i] for i in sampled], worker.method.shared is not None, global_state)
        pending = order
        while True:
            for i in pending:
                bar.set_description(f"{cfg.method} round {r + 1}/{cfg.rounds} {clients[i].name}")
                _train_client(setup, collector, faults, states, global_state, r, i, bar)
            if not collector.retry():
                break
            pending = [i for i in order if names[i] in collector.to_retry()]
        # 3. the new global adapter
        global_state = collector.aggregate()
        # 4. scores on evaluation rounds (every view on the last: the final report reuses them)
        scores, final_evals = evaluate_round(setup, states, global_state, r) if core.evaluates(r) else (None, None)
        # 5. the round's record and checkpoint
        core.end_round(r, t_round, scores, global_state, collector, states=states,
                       rng_state=order_rng.bit_generator.state)
    bar.close()
    return finish_run(setup, core, states, global_state, t_start, final_evals)
