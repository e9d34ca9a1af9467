"""Results as data (results.json), and views of them: the terminal table and curves.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def item_var(scores: list[float]) -> float:
    """One client's part of the mean score's variance: the sample variance of its test items' scores over their
    number (what a client reports instead of its per-item scores, `item_se`)."""
    n = len(scores)
    m = sum(scores) / n
    return sum((x - m) ** 2 for x in scores) / max(n - 1, 1) / n


def item_se(item_vars: list[float]) -> float:
    """Standard error of the mean-over-clients score from the clients' `item_var`s (binomial/sample variance per
    client)."""
    return math.sqrt(sum(item_vars)) / len(item_vars)


class History:
    """Everything a run reports, filled round by round by whichever driver runs it.

    Listeners (experiment trackers, `feddat.eval.tracking`) see what is recorded as it is recorded:
    `on_start(data)` when attached, `on_round(entry)` for every round entry, `on_finish(data)` after the final
    report; so every engine reports the same numbers under the same names.
    """

    def __init__(self, config: dict[str, Any], clients: list[str], label_spaces: dict[str, list[str]],
                 tasks: dict[str, dict[str, str]] | None = None):
        """`tasks`: {client: {"task": kind, "metric": "vqa-score" or "accuracy"}} (default: VQA accuracy)."""
        tasks = tasks or {c: {"task": "vqa", "metric": "accuracy"} for c in clients}
        self.data: dict[str, Any] = {"config": config, "clients": clients, "label_spaces": label_spaces,
                                     "tasks": tasks, "rounds": [], "final": None, "wall_seconds": None}
        self.listeners: list[Any] = []

    def attach(self, listener) -> None:
        """Add a listener (None is ignored) and give it the run's config and clients."""
        if listener is not None:
            self.listeners.append(listener)
            listener.on_start(self.data)

    def add_round(self, round_idx: int, train: dict[str, dict], scores: dict[str, float] | None,
                  bytes_sent: dict[str, int], seconds: float, extra: dict[str, Any] | None = None) -> None:
        """One round entry; `extra` adds the server's record of faults and screening (`missing_clients`,
        `rejected_clients`: {client: reason}, `update_norms`, `attempts`, `aggregated_clients`, `dp`)."""
        entry = {"round": round_idx, "train": train, "bytes_sent": bytes_sent, "seconds": round(seconds, 3)}
        if scores is not None:
            entry["test"] = scores
            entry["avg_score"] = sum(scores.values()) / len(scores)
        entry.update(extra or {})
        self.data["rounds"].append(entry)
        for listener in self.listeners:
            listener.on_round(entry)

    def finish(self, clients: dict[str, float], item_vars: dict[str, float], views: dict[str, dict[str, float]],
               wall_seconds: float, breakdown: dict[str, dict[str, float]] | None = None,
               val: dict[str, float] | None = None) -> None:
        """The final scores on the test splits (`item_vars`: each client's `item_var`, for the standard error);
        `val` (the predicting view's per-client scores on the validation splits, what hyperparameter search
        selects on) adds `val_clients` and `val_avg_score`."""
        avg = sum(clients.values()) / len(clients)
        self.data["final"] = {
            "clients": clients,
            "avg_score": avg,
            "avg_score_se": item_se(list(item_vars.values())),
            "views": {v: {"clients": s, "avg_score": sum(s.values()) / len(s)} for v, s in views.items()},
            "breakdown": breakdown or {},
        }
        if val:
            self.data["final"]["val_clients"] = val
            self.data["final"]["val_avg_score"] = sum(val.values()) / len(val)
        self.data["wall_seconds"] = round(wall_seconds, 2)
        for listener in self.listeners:
            listener.on_finish(self.data)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(out_dir / "results.json")


def client_table(results: dict[str, Any]) -> str:
    """A per-client table of the final scores of every reported view."""
    final = results["final"]
    views = list(final["views"])
    header = ["client"] + views
    rows = [[c] + [f"{final['views'][v]['clients'][c]:.4f}" for v in views] for c in results["clients"]]
    rows.append(["mean"] + [f"{final['views'][v]['avg_score']:.4f}" for v in views])
    tasks = results.get("tasks") or {}
    if any(t.get("metric") != "accuracy" for t in tasks.values()):  # say how each client is scored
        header.append("metric")
        for r in rows[:-1]:
            r.append(f"{tasks[r[0]]['task']}: {tasks[r[0]]['metric']}")
        rows[-1].append("")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))
    sent = results["rounds"][-1]["bytes_sent"] if results["rounds"] else {}
    per_client = max(sent.values()) if sent else 0
    cfg = results["config"]
    data = (f"the {cfg['nodes']} SuperNodes' own data" if cfg.get("nodes") else cfg.get("clients_dir")
            or ("your client folders" if cfg.get("client_data") else cfg["benchmark"]))
    foot = (f"{cfg['method']} on {data}: mean score "
            f"{final['avg_score']:.4f} ± {final['avg_score_se']:.4f} (s.e. over test items), "
            f"{per_client:,} bytes sent per client per round, {results['wall_seconds']:.0f} s")
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + ["", foot])


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in results["rounds"] if "test" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in results["clients"]:
        ax.plot([r["round"] + 1 for r in rounds], [r["test"][c] for r in rounds], alpha=0.6, label=c)
    ax.plot([r["round"] + 1 for r in rounds], [r["avg_score"] for r in rounds], color="black", lw=2.5, label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel("test score")
    ax.set_title(f"{results['config']['method']} on {results['config']['benchmark']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
