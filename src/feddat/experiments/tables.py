"""A comparison's results as the paper tabulates them: read from the runs' results.json (one per method and
seed, feddat.experiments.sweep) into

- DIR/table.json: per method the per-client and average final test scores as mean, standard deviation and
  standard error over seeds, the validation average, trainable and communicated parameters, bytes sent per
  client per round, and the average score per round (mean over seeds) that compare.png draws;
- DIR/table.md: the table (rows methods; columns clients and the average, mean ± std over seeds);
- DIR/compare.png: the average test score per round, one line per method.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddat.algorithms.registry import get_method
from feddat.config import RunConfig
from feddat.eval.results import mean_and_se
from feddat.federation.worker import Worker
from feddat.models.backbone import load_backbone
from feddat.models.vl import AnswerHead


def mean_std_se(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation and standard error over seeds (None for the last two with one seed)."""
    m, se = mean_and_se(values)
    std = se * math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": m, "std": std, "se": None if math.isnan(se) else se}


def parameter_counts(cfg: RunConfig, label_spaces: dict[str, list[str]], backbone=None) -> dict[str, Any]:
    """What a method trains and sends, counted on the model its config builds: `trainable_params` (the
    optimised tensors of one client's local training, its head included, mean over clients' heads),
    `head_params` (mean over clients), `communicated_params` (the update's elements; None for a pooled
    reference, which sends no update)."""
    method = get_method(cfg.method, cfg.to_dict())
    if backbone is None:
        backbone, _ = load_backbone(cfg.model_path, "cpu", cfg.backbone)
    worker = Worker(method, copy.deepcopy(backbone), cfg.reduction, cfg.local, "cpu")
    trainable, heads = [], []
    with torch.random.fork_rng(devices=[]):
        for answers in label_spaces.values():
            head = AnswerHead(worker.dim, len(answers))
            params = {id(p): p for g in method.param_groups(worker.model, head, cfg.local) for p in g["params"]}
            trainable.append(sum(p.numel() for p in params.values()))
            heads.append(sum(p.numel() for p in head.parameters()))
        update = worker.initial_global(cfg.seed)
    return {"trainable_params": round(sum(trainable) / len(trainable)),
            "head_params": round(sum(heads) / len(heads)),
            "communicated_params": None if method.pooled else sum(v.numel() for v in (update or {}).values())}


def mean_curve(results: list[dict]) -> dict[str, list]:
    """The average test score per scored round, mean over the runs (rounds scored in every run)."""
    per_run = [{r["round"] + 1: r["avg_score"] for r in res["rounds"] if "avg_score" in r} for res in results]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    return {"rounds": rounds, "avg_score": [sum(p[r] for p in per_run) / len(per_run) for r in rounds]}


def method_row(results: list[dict]) -> dict[str, Any]:
    """One method's row from its runs' results.json (one per seed)."""
    clients = results[0]["clients"]
    avg = [r["final"]["avg_score"] for r in results]
    vals = [r["final"].get("val_avg_score") for r in results]
    comm = results[0].get("communication")
    last = results[0]["rounds"][-1]["bytes_sent"] if results[0]["rounds"] else {}
    row = {
        "status": "ok",
        "seeds": [r["config"]["seed"] for r in results],
        "avg_score": mean_std_se(avg),
        "avg_score_per_seed": avg,
        "val_avg_score": mean_std_se(vals) if None not in vals else None,
        "clients": {c: mean_std_se([r["final"]["clients"][c] for r in results]) for c in clients},
        "bytes_per_client_per_round": None if comm else max(last.values(), default=0),
        "wall_seconds": sum(r["wall_seconds"] for r in results) / len(results),
        "curve": mean_curve(results),
    }
    if comm:  # a pooled reference: what it took is the raw data, once
        raw = comm["raw_data_bytes"]
        row["communication"] = comm["kind"]
        row["raw_data_bytes_per_client"] = round(sum(raw.values()) / len(raw))
    views = results[0]["final"].get("views", {})
    if len(views) > 1:
        row["views"] = {v: mean_std_se([r["final"]["views"][v]["avg_score"] for r in results]) for v in views}
    return row


def summarise(runs: dict[str, list[dict]], unavailable: dict[str, str] | None = None,
              order: list[str] | None = None, base: RunConfig | None = None) -> dict:
    """The comparison table as data. With `base`, each method's parameter counts are added (on the model
    its config builds)."""
    unavailable = unavailable or {}
    order = order or list(runs) + [m for m in unavailable if m not in runs]
    first = next(iter(runs.values()), None)
    table: dict[str, Any] = {
        "benchmark": base.benchmark if base else (first[0]["config"]["benchmark"] if first else None),
        "clients": first[0]["clients"] if first else [],
        "seeds": sorted({s for res in runs.values() for s in (r["config"]["seed"] for r in res)}),
        "scores": "final test score of each method's predicting view; mean, std and s.e. over seeds",
        "methods": {},
    }
    backbone = None
    if base is not None and runs:
        backbone, _ = load_backbone(base.model_path, "cpu", base.backbone)
    for method in order:
        if method in unavailable:
            table["methods"][method] = {"status": "unavailable", "reason": unavailable[method]}
            continue
        row = method_row(runs[method])
        if backbone is not None:
            row.update(parameter_counts(replace(base, method=method), runs[method][0]["label_spaces"], backbone))
        table["methods"][method] = row
    return table


def _pm(stat: dict[str, float | None], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


CLIENT_COLUMNS_UP_TO = 12  # more clients than this: table.md shows the spread over clients, not a column each


def _spread(row: dict, clients: list[str]) -> list[str]:
    """The median client's and the 10th-percentile client's score (each client's mean over seeds)."""
    means = np.array([row["clients"][c]["mean"] for c in clients])
    return [f"{np.median(means):.4f}", f"{np.percentile(means, 10):.4f}"]


def markdown_table(table: dict) -> str:
    clients = table["clients"]
    seeds = ", ".join(map(str, table["seeds"]))
    wide = len(clients) > CLIENT_COLUMNS_UP_TO
    columns = ["median client", "10th-percentile client"] if wide else clients
    lines = [f"Final test score, mean ± std over seeds {seeds} (s.e. in table.json); parameters per client.", "",
             "| method | " + " | ".join(columns) + " | average | trainable params | communicated params "
             "| bytes/client/round |",
             "|---" * (len(columns) + 5) + "|"]
    if wide:
        lines[0] += (f" {len(clients)} clients: each client's mean over seeds, summarised by its median and 10th "
                     "percentile; every client's score is in table.json.")
    notes = []
    for method, row in table["methods"].items():
        if row["status"] != "ok":
            lines.append(f"| {method} | " + " | ".join("—" for _ in columns) + " | not run | — | — | — |")
            done = "did not finish" if " failed: " in row["reason"] else "was not run"
            notes.append(f"- {method} {done}: {row['reason']}")
            continue
        cells = " | ".join(_spread(row, clients) if wide else [_pm(row["clients"][c]) for c in clients])
        if row["bytes_per_client_per_round"] is None:
            sent = f"n/a (raw data: {row['raw_data_bytes_per_client']:,} B once)"
        else:
            sent = f"{row['bytes_per_client_per_round']:,}"
        lines.append(f"| {method} | {cells} | {_pm(row['avg_score'])} | {_count(row.get('trainable_params'))} | "
                     f"{_count(row.get('communicated_params'))} | {sent} |")
        if row.get("communication"):
            notes.append(f"- {method}: {row['communication']} (not a federated method: an upper reference)")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_comparison(table: dict, path: Path) -> None:
    """The average test score per round, mean over seeds, one line per method (from the table's curves)."""
    import matplotlib  # imported when a plot is drawn, so that reading tables does not set up a plotting backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20").colors
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v")
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for k, (method, row) in enumerate(table["methods"].items()):
        if row["status"] == "ok" and row["curve"]["rounds"]:
            # a colour, line style and marker of its own for each method, so twenty lines stay apart
            ax.plot(row["curve"]["rounds"], row["curve"]["avg_score"], color=colours[k % len(colours)],
                    linestyle=styles[k // len(colours) % len(styles)], marker=markers[k % len(markers)], ms=4,
                    lw=2.5 if method == "feddat" else 1.3, label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("average test score (mean over seeds)")
    ax.set_title(f"{table['benchmark']}, seeds {', '.join(map(str, table['seeds']))}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(table: dict, out: Path) -> None:
    """DIR/table.json, DIR/table.md and DIR/compare.png."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "table.json.tmp"
    tmp.write_text(json.dumps(table, indent=2))
    tmp.replace(out / "table.json")
    (out / "table.md").write_text(markdown_table(table))
    plot_comparison(table, out / "compare.png")
