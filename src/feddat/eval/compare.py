"""Run several methods over several seeds and tabulate them: mean over seeds, its standard error, per client.

Each finished run is stored as DIR/<method>/seed<k>/results.json and is not redone when the comparison is
started again, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from feddat.config import RunConfig
from feddat.eval.results import mean_and_se


def run_comparison(base: RunConfig, methods: list[str], seeds: list[int], out: Path, progress: bool = True,
                   log=print) -> dict:
    from feddat.federation.inprocess import run

    runs: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            run_dir = out / method / f"seed{seed}"
            path = run_dir / "results.json"
            if path.exists():
                result = json.loads(path.read_text())
            else:
                cfg = replace(base, method=method, seed=seed).validate()
                result = run(cfg, run_dir, progress=progress)
                log(f"{method} seed {seed}: {result['final']['avg_score']:.4f}")
            runs.setdefault(method, []).append(result)
    table = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "table.md").write_text(markdown_table(table))
    return table


def summarise(runs: dict[str, list[dict]]) -> dict:
    table = {"methods": {}}
    for method, results in runs.items():
        clients = results[0]["clients"]
        avg = [r["final"]["avg_score"] for r in results]
        m, se = mean_and_se(avg)
        row = {
            "seeds": [r["config"]["seed"] for r in results],
            "avg_score": m,
            "avg_score_se": se,
            "avg_score_per_seed": avg,
            "clients": {c: mean_and_se([r["final"]["clients"][c] for r in results])[0] for c in clients},
            "bytes_per_client_per_round": max(results[0]["rounds"][-1]["bytes_sent"].values()),
            "wall_seconds": sum(r["wall_seconds"] for r in results) / len(results),
        }
        views = results[0]["final"].get("views", {})
        if len(views) > 1:
            row["views"] = {v: mean_and_se([r["final"]["views"][v]["avg_score"] for r in results])[0] for v in views}
        table["methods"][method] = row
    table["clients"] = clients
    return table


def markdown_table(table: dict) -> str:
    clients = table["clients"]
    head = "| method | " + " | ".join(clients) + " | average ± s.e. (seeds) | bytes/client/round |"
    sep = "|---" * (len(clients) + 3) + "|"
    lines = [head, sep]
    for method, row in table["methods"].items():
        se = row["avg_score_se"]
        se_txt = "" if math.isnan(se) else f" ± {se:.4f}"
        cells = " | ".join(f"{row['clients'][c]:.4f}" for c in clients)
        lines.append(f"| {method} | {cells} | {row['avg_score']:.4f}{se_txt} | {row['bytes_per_client_per_round']:,} |")
    return "\n".join(lines) + "\n"
