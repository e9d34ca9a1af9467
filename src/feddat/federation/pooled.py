"""The driver of pooled references (`Method.pooled`, e.g. `centralised-adapter`): no federation, one trainer.

Every client's training split is pooled; a round is `local_epochs` epochs over the pooled data (in a
seeded random order that mixes the clients), with a fresh AdamW per round and the linear warm-up/decay
schedule over all rounds, as every federated method's local training has. After each round the clients are
scored on their test splits with their own heads (`eval_every`), and a checkpoint is written (the pooled
adapter as the global state, each client's head as its state), so `feddat run --resume` goes on from it.

Nothing travels during training: every round records 0 bytes sent, and `communication` in results.json
records instead what pooling took: each client's raw training data (images at one byte per pixel and
channel, questions and answers in UTF-8), sent once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from feddat.data.benchmarks import ClientData, Split
from feddat.federation.checkpoint import Checkpoint
from feddat.federation.core import RunCore
from feddat.federation.rounds import Setup, evaluate_round, finish_run, restore
from feddat.federation.worker import lr_factor
from feddat.models.vl import AnswerHead, make_head
from feddat.seeding import mix_seed


def raw_data_bytes(client: ClientData) -> int:
    """The size of a client's raw training data: its images (uint8, H x W x 3; both of an image pair), questions
    (and a multiple-choice question's candidates) and answers (VQA with annotators: each distinct answer they
    gave, the answers with a soft score above 0)."""
    split = client.train
    used = split.image_index if split.image_index2 is None else torch.cat([split.image_index, split.image_index2])
    # counted from the shape, not by indexing: a client folder's split decodes its images lazily (data/lazy.py)
    pixels = int(used.unique().numel()) * math.prod(split.pixels.shape[1:])
    text = sum(len(q.encode()) for q in split.questions)
    text += sum(len(c.encode()) for cands in split.candidates or () for c in cands)
    if split.labels.is_floating_point():  # (n, answers) soft scores
        answers = sum(len(client.answers[int(a)].encode()) for a in split.labels.nonzero()[:, 1])
    else:
        answers = sum(len(client.answers[int(y)].encode()) for y in split.labels if int(y) >= 0)
    return pixels + text + answers


def pooled_batch(worker, clients: list[ClientData], owners: np.ndarray, rows: np.ndarray) -> dict[int, dict]:
    """One mini-batch of the pooled data, {client index: its part}: sample k is row `rows[k]` of client
    `owners[k]`'s training split (parts stay apart: clients of different tasks have inputs of different
    shapes)."""
    parts = {}
    for c in sorted(set(owners.tolist())):
        split: Split = clients[c].train
        parts[c] = worker.batch(split, torch.as_tensor(rows[owners == c]))
    return parts


def _heads(worker, clients: list[ClientData], states) -> list[AnswerHead]:
    heads = []
    for c in clients:
        head = make_head(worker.dim, c.head_spec).to(worker.device)
        head.load_state_dict({k[5:]: v for k, v in states[c.name].items() if k.startswith("head.")})
        heads.append(head)
    return heads


def run_pooled(setup: Setup, states, out_dir: Path | None, progress: bool, tracker, t_start: float,
               resume: Checkpoint | None) -> dict:
    """Train a pooled method on every client's training data at once; score, checkpoint and report as the
    in-process engine does for the federated methods."""
    cfg, worker, clients = setup.cfg, setup.worker, setup.clients
    method, local = worker.method, worker.local
    names = [c.name for c in clients]
    torch.manual_seed(cfg.seed)
    global_state = worker.initial_global(cfg.seed)
    core = RunCore.open(cfg, names, {c.name: c.answers for c in clients}, {c.name: c.describe() for c in clients},
                        out_dir, communication={
                            "kind": "not applicable: a centralised reference pools every client's raw training "
                                    "data once",
                            "raw_data_bytes": {c.name: raw_data_bytes(c) for c in clients}})
    order_rng = np.random.default_rng(mix_seed(cfg.seed, 0x9001))
    global_state, first = restore(resume, global_state, states, order_rng, core.history)
    core.history.attach(tracker)
    owners = np.concatenate([np.full(len(c.train), i) for i, c in enumerate(clients)])
    rows = np.concatenate([np.arange(len(c.train)) for c in clients])
    n = len(owners)
    epochs = method.local_epochs(local)
    steps_per_round = epochs * -(-n // local.batch_size)
    bar = core.bar = tqdm(total=steps_per_round * (cfg.rounds - first), desc=cfg.method, unit="step",
                          disable=not progress)
    final_evals = None
    if resume is not None:
        bar.write(f"resuming after round {first} from {resume.path}")
    for r in range(first, cfg.rounds):
        t_round = time.time()
        bar.set_description(f"{cfg.method} round {r + 1}/{cfg.rounds} (pooled)")
        method.load_shared_state(worker.model, global_state)
        heads = _heads(worker, clients, states)
        for h in heads:
            h.train()
        opt = torch.optim.AdamW(method.pooled_param_groups(worker.model, heads, local), betas=(0.9, 0.98),
                                eps=1e-8, weight_decay=local.weight_decay)
        losses, step = [], 0
        for _ in range(epochs):
            perm = order_rng.permutation(n)
            for start in range(0, n, local.batch_size):
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor((r + step / steps_per_round) / cfg.rounds, cfg.warmup)
                idx = perm[start:start + local.batch_size]
                parts = pooled_batch(worker, clients, owners[idx], rows[idx])
                losses.append(method.pooled_step(worker.model, heads, parts, opt)["loss"])
                step += 1
                bar.update(1)
        global_state = {k: v.detach().cpu() for k, v in method.shared_state(worker.model).items()}
        for c, h in zip(clients, heads):
            states[c.name] = {f"head.{k}": v.detach().cpu().clone() for k, v in h.state_dict().items()}
        scores, final_evals = evaluate_round(setup, states, global_state, r) if core.evaluates(r) else (None, None)
        train = {"pooled": {"loss": sum(losses) / max(len(losses), 1), "num_examples": n}}
        core.end_round(r, t_round, scores, global_state, train=train, states=states,
                       rng_state=order_rng.bit_generator.state)
    bar.close()
    return finish_run(setup, core, states, global_state, t_start, final_evals)
