"""One run's rounds as the server keeps them, the same for every engine.

A round, top to bottom (the in-process engine, feddat.federation.inprocess, does it in one loop; the Flower
strategy, feddat.federation.flower.strategy, in Flower's configure/aggregate hooks; the pooled references,
feddat.federation.pooled, with one trainer instead of clients):

1. `RunCore.sampled(r)`: the clients that train in round r (all, or `clients-per-round` drawn by seed and round);
2. each of them trains on its own data and answers; `RunCore.collector(r, asked, ...)` gathers the answers,
   failures and timeouts (feddat.federation.server.RoundCollector: screening, retries, `min-clients`);
3. `collector.aggregate()`: the new global adapter (robust rules, central DP);
4. on evaluation rounds (`RunCore.evaluates(r)`), every client is scored with the new global adapter;
5. `RunCore.end_round(...)`: the round's entry in the History (train losses, scores, bytes, faults, the sampled
   clients), the checkpoint after it (the server's part, and the clients' states where the engine holds them),
   and the progress line.

`RunCore.open` starts the History (with the privacy report when DP is on) and `RunCore.finish` writes the final
report; where the clients are trained and scored is the engine's business.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from feddat.config import RunConfig
from feddat.eval.results import History
from feddat.federation.checkpoint import save_checkpoint
from feddat.federation.rounds import finish_history
from feddat.federation.sampling import sample_clients
from feddat.federation.server import RoundCollector, ServerRules, privacy_report
from feddat.federation.worker import State


class RunCore:
    """The server's side of one run: which clients train, how their answers are gathered, what each round
    records and checkpoints, and the final report."""

    def __init__(self, cfg: RunConfig, history: History, out_dir: Path | None = None, bar=None):
        self.cfg = cfg
        self.history = history
        self.names: list[str] = list(history.data["clients"])
        self.out_dir = out_dir
        self.bar = bar              # a tqdm bar for progress lines (None: silent)
        self.rules = ServerRules.of(cfg)

    @classmethod
    def open(cls, cfg: RunConfig, names: list[str], label_spaces: dict[str, list[str]],
             tasks: dict[str, dict[str, str]] | None, out_dir: Path | None = None, **data: Any) -> "RunCore":
        """A new run's core: its History (with `privacy` when DP is on, and any further top-level `data`)."""
        history = History(cfg.to_dict(), names, label_spaces, tasks)
        if (privacy := privacy_report(cfg)) is not None:
            history.data["privacy"] = privacy
        history.data.update(data)
        return cls(cfg, history, out_dir)

    # -- a round --
    def sampled(self, r: int) -> list[int]:
        """The indices of the clients that train in round `r` (0-based): all, unless clients-per-round draws."""
        return sample_clients(self.cfg.seed, r, len(self.names), self.cfg.round_size())

    def collector(self, r: int, asked: list[str], screens: bool, global_state: State | None) -> RoundCollector:
        """Round `r`'s collector of the answers of the clients `asked` (`screens`: each answer carries an update
        of the shared adapter to check and aggregate)."""
        return RoundCollector(self.rules, asked, screens, global_state, r)

    def evaluates(self, r: int) -> bool:
        """Whether round `r` ends with every client scored: every eval-every rounds, and the last."""
        return r + 1 == self.cfg.rounds or (r + 1) % self.cfg.eval_every == 0

    def end_round(self, r: int, started: float, scores: dict[str, float] | None, global_state: State | None,
                  collector: RoundCollector | None = None, train: dict | None = None,
                  states: dict[str, State] | None = None, rng_state: dict | None = None) -> None:
        """Record round `r` (begun at time `started`): from its `collector` (or, without clients, the `train`
        losses), the test `scores` if it was scored; then checkpoint it with the new `global_state` (and the
        clients' `states` and the client-order generator's `rng_state`, where the engine holds them)."""
        if collector is not None:
            train, sent, extra = collector.train, collector.bytes_sent(), collector.extra()
            if self.cfg.samples_clients:
                extra["sampled_clients"] = list(collector.names)
        else:
            sent, extra = {name: 0 for name in self.names}, {}
        self.history.add_round(r, train, scores, sent, time.time() - started, extra)
        if self.out_dir is not None:
            save_checkpoint(self.out_dir, r + 1, self.cfg.to_dict(), global_state, states or {}, rng_state or {},
                            self.history.data)
        if self.bar is not None and scores is not None:
            self.bar.write(f"round {r + 1}: mean test score {sum(scores.values()) / len(scores):.4f}")

    # -- the end --
    def finish(self, method, evals: dict[str, dict], wall: float, val_evals: dict[str, dict] | None = None) -> dict:
        """The final report from every client's last evaluation (feddat.federation.rounds.finish_history), saved
        as results.json in the out dir; returns it."""
        finish_history(self.history, method, evals, wall, val_evals)
        if self.out_dir is not None:
            self.history.save(self.out_dir)
        return self.history.data
