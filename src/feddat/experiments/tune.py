"""Hyperparameter search on the validation split: a grid per call, the best setting per method.

Every point of the grid (the Cartesian product of `key=v1,v2,...` lists) is a comparison of the methods
over the seeds in DIR/<point>/ (`run_comparison`, so finished runs are reused and interrupted ones resumed).
A setting is scored by `final.val_avg_score` (the predicting view's mean over clients of the score on the
validation splits), mean over seeds; the test scores are reported beside it but never select. Every method
of a call gets the same grid, hence the same number of settings (docs/methods.md, "Search budget").
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from feddat.config import RunConfig, parse_value
from feddat.errors import FedDATError
from feddat.experiments.sweep import NOT_FROM_GRID, Runner, run_comparison


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """['lr_adapter=1e-3,1e-2', 'local_epochs=1,2'] as {key: [typed values]}."""
    if not specs:
        raise FedDATError("feddat tune needs at least one --grid KEY=V1,V2,...")
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise FedDATError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        key, values = spec.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in NOT_FROM_GRID:
            raise FedDATError(f"--grid cannot vary {key}: give --methods and --seeds instead")
        if key in grid:
            raise FedDATError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2")
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not texts:
            raise FedDATError(f"--grid {key} has no values")
        parsed = [parse_value(key, t) for t in texts]
        if len(set(map(repr, parsed))) != len(parsed):
            raise FedDATError(f"--grid {key} repeats a value: {values}")
        grid[key] = parsed
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """A directory name for a grid point, e.g. 'lr_adapter=0.001,local_epochs=2'."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def run_tune(base: RunConfig, methods: list[str], grid: dict[str, list[Any]], seeds: list[int], out: Path,
             progress: bool = True, log: Callable[[str], None] = print, runner: Runner | None = None,
             jobs: int = 1) -> dict:
    """Run every grid point for every method and seed (`jobs` runs of a point at once, as in
    `run_comparison`); write DIR/tune.json and DIR/tune.md; return the search as data."""
    out = Path(out)
    points = grid_points(grid)
    search: dict[str, Any] = {
        "benchmark": base.benchmark, "grid": grid, "grid_size": len(points), "seeds": seeds,
        "selection": "final.val_avg_score (validation split, predicting view), mean over seeds; highest wins",
        "methods": {m: {"settings": []} for m in methods},
    }
    for k, point in enumerate(points, 1):
        log(f"grid point {k}/{len(points)}: {point_name(point)}")
        table = run_comparison(replace(base, **point), methods, seeds, out / point_name(point), progress, log,
                               runner, jobs)
        for m in methods:
            row = table["methods"][m]
            entry: dict[str, Any] = {"setting": point, "dir": point_name(point), "status": row["status"]}
            if row["status"] != "ok":
                entry["reason"] = row["reason"]
            elif row["val_avg_score"] is None:
                raise FedDATError(f"{out / point_name(point) / m} has runs without a validation score "
                                  "(final.val_avg_score; older results.json files lack it): remove them to rerun")
            else:
                entry.update(val_avg_score=row["val_avg_score"], test_avg_score=row["avg_score"])
            search["methods"][m]["settings"].append(entry)
    for m, info in search["methods"].items():
        scored = [s for s in info["settings"] if s["status"] == "ok"]
        info["best"] = max(scored, key=lambda s: s["val_avg_score"]["mean"])["setting"] if scored else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(search, indent=2))
    (out / "tune.md").write_text(markdown_search(search))
    return search


def markdown_search(search: dict) -> str:
    keys = list(search["grid"])
    seeds = ", ".join(map(str, search["seeds"]))
    lines = [f"Hyperparameter search on {search['benchmark']}: {search['grid_size']} settings per method, seeds "
             f"{seeds}; selected on the validation score (mean ± std over seeds), test score for information.", ""]
    for m, info in search["methods"].items():
        best = info["best"]
        lines += [f"## {m}", "", "best: " + (point_name(best) if best else "none (no setting could run)"), "",
                  "| " + " | ".join(keys) + " | validation | test |", "|---" * (len(keys) + 2) + "|"]
        for s in info["settings"]:
            cells = " | ".join(str(s["setting"][k]) for k in keys)
            if s["status"] != "ok":
                lines.append(f"| {cells} | not run: {s['reason']} | — |")
                continue
            val, test = s["val_avg_score"], s["test_avg_score"]
            fmt = lambda st: f"{st['mean']:.4f}" + (f" ± {st['std']:.4f}" if st["std"] is not None else "")
            mark = "**" if s["setting"] == best else ""
            lines.append(f"| {cells} | {mark}{fmt(val)}{mark} | {fmt(test)} |")
        lines.append("")
    return "\n".join(lines)
