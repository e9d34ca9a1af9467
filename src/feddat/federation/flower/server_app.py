"""The ServerApp of the Flower engine (`server_app`, for `flwr run`; `make_server_app` for a given config), the
server's side of a whole run (`serve`), and `run_flower`, the Flower engine on Flower's simulation in this
process. The messages are described in feddat.federation.flower."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from feddat.algorithms.registry import get_method
from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.eval.tracking import open_tracker
from feddat.fault_spec import parse_faults
from feddat.federation.checkpoint import (RESUME_MAY_CHANGE, Checkpoint, check_fits, load_checkpoint,
                                          resume_config)
from feddat.federation.client_state import remove_temporary_node_dirs
from feddat.federation.core import RunCore
from feddat.federation.export import save_clients
from feddat.federation.flower.client_app import client_app
from feddat.federation.flower.records import (ARRAYS, CLIENT, CONFIG, METRICS, RUN_CONFIG, config_from_values,
                                              config_to_record, log_received, record_to_state, state_to_record)
from feddat.federation.flower.strategy import TIMEOUT_S, FedDATStrategy, reply_errors
from feddat.federation.rounds import NODES_NEED_SUPERNODES
from feddat.federation.worker import State

log = logging.getLogger(__name__)


def _wait_for_nodes(grid: Grid, n: int, own_data: bool = False, timeout: float = TIMEOUT_S) -> list[int]:
    """The connected SuperNodes once there are `n`. With nodes (`own_data`), exactly `n`: a node more is an
    error, not a client left out."""
    start = time.time()
    end, next_note = start + timeout, start + 10
    what = "the run's nodes setting" if own_data else "the benchmark"
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.time() > next_note:
            next_note += 30
            log.warning("waiting for SuperNodes: %d of %d connected (one per client; in a simulation pass "
                        "--federation-config \"num-supernodes=%d\" to flwr run)", len(nodes), n, n)
        if time.time() > end:
            raise FedDATError(f"only {len(nodes)} of the {n} SuperNodes {what} needs connected in {timeout:.0f} s")
        time.sleep(0.2)
    if own_data and len(nodes) > n:
        raise FedDATError(f"{len(nodes)} SuperNodes are connected, but the run is set for nodes={n}: start it with "
                          f"nodes={len(nodes)}, or stop the SuperNodes that should not take part")
    return nodes


def _same(a: State | None, b: State | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _query(grid: Grid, cfg: RunConfig, configs: dict[int, dict], stage: str, out_dir: Path | None = None,
           strict: bool = False) -> list[Message]:
    """One QUERY to each node of `configs` (node id -> its "config" values) with the run config; the replies,
    logged to received.jsonl (`stage`). `strict`: every node must answer without an error."""
    run_record = config_to_record(cfg)
    messages = [Message(content=RecordDict({RUN_CONFIG: run_record, CONFIG: ConfigRecord(config)}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node, config in configs.items()]
    replies = list(grid.send_and_receive(messages, timeout=TIMEOUT_S))
    log_received(out_dir, stage, 0, replies)
    if strict and ((errors := reply_errors(replies)) or len(replies) != len(messages)):
        raise FedDATError("SuperNodes could not start: " + ("; ".join(errors) or "replies missing"))
    return replies


def _common_start(replies: list[Message], who) -> State | None:
    """The starting global adapter every reply without an error carries; FedDATError naming (`who(reply)`) the
    first client that starts from another one."""
    initial, seen = None, False
    for m in replies:
        if m.has_error():
            continue
        state = record_to_state(m.content[ARRAYS])
        if seen and not _same(initial, state):
            raise FedDATError(f"{who(m)} starts from another global adapter than the others: every SuperNode must "
                              "load the same backbone")
        initial, seen = state, True
    return initial


def _describe(grid: Grid, node_ids: list[int], cfg: RunConfig, n: int, resumed_from: int = 0,
              out_dir: Path | None = None):
    """Ask every node which client it serves: node->index map, names, label spaces, the starting global adapter
    (and, with client-state-dir, have it set its saved states up for a new or resumed run)."""
    replies = _query(grid, cfg, {node: {"resumed-from": resumed_from} for node in node_ids}, "describe", out_dir)
    initial = _common_start(replies, lambda m: f"client {int(m.content[METRICS]['client-index'])}")
    nodes, names, answers, tasks, counts, keeps = {}, [None] * n, [None] * n, [None] * n, {}, {}
    for m in replies:
        if m.has_error():
            continue
        index = int(m.content[METRICS]["client-index"])
        if index in nodes.values():
            raise FedDATError(f"two SuperNodes serve client {index}: give each a different client-id")
        nodes[m.metadata.src_node_id] = index
        names[index] = str(m.content[CLIENT]["name"])
        answers[index] = list(m.content[CLIENT]["answers"])
        tasks[index] = json.loads(str(m.content[CLIENT]["task"]))
        counts[names[index]] = int(m.content[METRICS]["num-examples"])
        keeps[names[index]] = bool(m.content[METRICS].get("keeps-state", 0))
    missing = [i for i in range(n) if i not in nodes.values()]
    if missing:
        raise FedDATError(f"no SuperNode serves client(s) {missing}: "
                          + ("; ".join(reply_errors(replies)) or "no reply"))
    return (nodes, names, dict(zip(names, answers)), dict(zip(names, tasks)), initial, {c: counts[c] for c in names},
            keeps)


def _describe_own(grid: Grid, node_ids: list[int], cfg: RunConfig, resumed_from: int = 0, out_dir: Path | None = None):
    """The clients of a run whose SuperNodes bring their own data: ask every node its client's name, training
    count (fixed for the run) and task kind, and the starting global adapter; number the clients in the order
    of their names and tell each node its number (it seeds the client). Nothing else about the data is asked."""
    replies = _query(grid, cfg, {node: {"resumed-from": resumed_from} for node in node_ids}, "describe", out_dir,
                     strict=True)
    by_name: dict[str, Message] = {}
    for m in replies:
        name = str(m.content[CLIENT]["name"])
        if name in by_name:
            raise FedDATError(f"nodes {by_name[name].metadata.src_node_id} and {m.metadata.src_node_id} both bring a "
                              f"client named {name!r}: give one of them another name= in its node config")
        count = m.content[METRICS]["num-examples"]
        if not isinstance(count, int) or count < 1:
            raise FedDATError(f"client {name} (node {m.metadata.src_node_id}) reports {count!r} training items")
        by_name[name] = m
    initial = _common_start(replies, lambda m: f"client {m.content[CLIENT]['name']}")
    names = sorted(by_name)
    nodes = {by_name[name].metadata.src_node_id: i for i, name in enumerate(names)}
    _query(grid, cfg, {node: {"resumed-from": resumed_from, "client-index": index} for node, index in nodes.items()},
           "start", out_dir, strict=True)
    tasks = {name: json.loads(str(by_name[name].content[CLIENT]["task"])) for name in names}
    counts = {name: int(by_name[name].content[METRICS]["num-examples"]) for name in names}
    keeps = {name: bool(by_name[name].content[METRICS].get("keeps-state", 0)) for name in names}
    return nodes, names, {}, tasks, initial, counts, keeps


def check_resumable(cfg: RunConfig, resume: Checkpoint, keeps: dict[str, bool] | None = None) -> None:
    """A run can go on from `resume` unless it is complete or some client kept its private state in memory or
    in temporary files: by the run config (a simulation's nodes use it) or, on SuperNodes, whose node config
    may set client-state-dir, by what they reported (`keeps`: client -> states on disk)."""
    if resume.round >= cfg.rounds:
        raise FedDATError(f"{resume.path} is the checkpoint of the last round: the run is complete")
    lost = [name for name, kept in (keeps or {}).items() if not kept]
    if keeps is None and not cfg.client_state_dir:
        raise FedDATError("this Flower run kept its clients' private state in memory or in temporary files only "
                          "(client-state-dir unset): it cannot be resumed")
    if lost:
        raise FedDATError(f"client(s) {', '.join(lost)} keep their private state in memory or in temporary files "
                          "only (client-state-dir unset on their SuperNode): the run cannot be resumed; start "
                          "their SuperNodes with the client-state-dir of the interrupted run")


def serve(grid: Grid, cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
          t_start: float | None = None, resume: Checkpoint | None = None) -> dict:
    """The whole run on the server side; returns History.data. With out_dir: saves results.json, the
    clients' models (clients/), the server's checkpoint after every round (checkpoint/) and the tracker's logs
    there. With `resume` (a server checkpoint of this config): go on after its round; the clients read their
    private state of that round from their client-state-dir."""
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
    method = get_method(cfg.method, cfg.to_dict())
    n = cfg.n_clients
    if resume is not None:
        check_resumable(cfg, resume, {})
    done = resume.round if resume is not None else 0
    connected = _wait_for_nodes(grid, n, bool(cfg.nodes))
    if cfg.nodes:  # the clients are the nodes, with what they report of themselves
        nodes, names, label_spaces, tasks, initial, counts, keeps = _describe_own(grid, connected, cfg, done,
                                                                                  out_dir)
        parse_faults(cfg.fault_injection, names, cfg.rounds)
    else:
        nodes, names, label_spaces, tasks, initial, counts, keeps = _describe(grid, connected, cfg, n, done, out_dir)
    if resume is not None:
        check_resumable(cfg, resume, keeps)
    core = RunCore.open(cfg, names, label_spaces, tasks, out_dir, train_counts=counts)
    if resume is not None:
        check_fits(resume, initial, {})
        initial = resume.global_state
        core.history.data["rounds"] = list(resume.history["rounds"])
    core.history.attach(tracker)
    bar = core.bar = tqdm(total=cfg.rounds - done, desc=cfg.method, unit="round", disable=not progress)
    timeout = cfg.round_timeout or TIMEOUT_S
    strategy = FedDATStrategy(core, nodes, counts, initial, bar, export=out_dir is not None, timeout=timeout,
                              resumed_from=done)
    try:
        strategy.start(grid, state_to_record(initial), num_rounds=cfg.rounds - done, timeout=timeout,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    finally:
        bar.close()
    if strategy.final_evals is None:
        raise FedDATError("the run ended without a final evaluation")
    wall = time.time() - t_start
    if out_dir is not None and strategy.export:
        missing = [n for n in names if n not in strategy.exports]
        if missing:
            raise FedDATError(f"no saved model came back from client(s) {', '.join(missing)}")
        save_clients(out_dir, strategy.exports)
    return core.finish(method, strategy.final_evals, wall, strategy.final_val_evals)


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


def run_flower(cfg: RunConfig, out_dir: Path | None = None, progress: bool = True,
               resume: Checkpoint | None = None) -> dict:
    """Run on Flower's simulation engine (Ray) in this process: one SuperNode per client, one Ray worker (one
    backbone) serving them in turn. Returns the results dict of `inprocess.run` for the same config. With
    `resume` (the server checkpoint of an interrupted run of this config, which set client-state-dir): go on
    after its round."""
    from flwr.simulation import run_simulation  # Ray: loaded only by a simulation, not by a SuperLink's ServerApp

    t_start = time.time()
    cfg = replace(cfg, engine="flower").validate()
    if cfg.nodes:
        raise FedDATError(NODES_NEED_SUPERNODES)
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
