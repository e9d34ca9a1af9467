"""Run several methods over several seeds and tabulate them the way the paper does.

`run_comparison` runs every (method, seed) in DIR/<method>/seed<k>/ (a `feddat run --out` directory each):
a finished run (results.json) is reused, an interrupted one goes on from its last checkpoint, so a
comparison started again resumes where it stopped. It writes

- DIR/table.json: per method the per-client and average final test scores as mean, standard deviation and
  standard error over seeds, the validation average, trainable and communicated parameters, bytes sent per
  client per round, and the average score per round (mean over seeds) that compare.png draws;
- DIR/table.md: the table (rows methods; columns clients and the average, mean ± std over seeds);
- DIR/compare.png: the average test score per round, one line per method.

A method that cannot run with the given settings (its config is refused) is not skipped silently: its row
says why.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.eval.results import mean_and_se

NOT_FROM_GRID = ("method", "seed")   # set by the comparison itself, per run


def resolve_methods(text: str) -> list[str]:
    """'all' (every registered method but the probes, in registry order) or a comma-separated list of method
    names."""
    from feddat.algorithms.registry import METHODS

    if text.strip() == "all":
        return [name for name, method in METHODS.items() if method.in_all]
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise FedDATError("--methods needs 'all' or comma-separated method names (`feddat methods` lists them)")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise FedDATError(f"unknown methods {', '.join(unknown)}; choose among {', '.join(METHODS)} or 'all'")
    if len(set(names)) != len(names):
        raise FedDATError(f"--methods names a method twice: {text}")
    return names


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' as [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise FedDATError(f"--seeds must be comma-separated non-negative integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise FedDATError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_value(key: str, text: str) -> Any:
    """A RunConfig value from text, typed as the field's default (true/false for switches)."""
    known = {f.name: f for f in fields(RunConfig)}
    if key not in known:
        raise FedDATError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
    default = getattr(RunConfig(), key)
    try:
        if isinstance(default, bool):
            value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        elif isinstance(default, int):  # an integer field (clients-per-round also takes a fraction)
            value = int(text) if key != "clients_per_round" or text.lstrip("-").isdigit() else float(text)
        elif isinstance(default, float):
            value = float(text)
        else:
            value = text
    except (KeyError, ValueError):
        kind = "true or false" if isinstance(default, bool) else type(default).__name__
        raise FedDATError(f"{key}={text!r}: expected {kind}") from None
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['key=value', ...] as typed RunConfig values."""
    out = {}
    for item in items:
        if "=" not in item:
            raise FedDATError(f"expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_value(key.strip().replace("-", "_"), text.strip())
    return out


# ----- running -----

Runner = Callable[..., dict]


class CannotRun(FedDATError):
    """A method refused by its run (not by a conflict with a saved run): its row says why."""


class RunFailed(CannotRun):
    """A run that stopped on an unexpected error: the other runs go on, its row says so, the traceback is in
    its directory's error.txt, and the comparison ends in an error once the table is written."""


def _default_runner(cfg: RunConfig, out_dir: Path, progress: bool, resume=None) -> dict:
    from feddat.federation.inprocess import run

    return run(cfg, out_dir, progress=progress, resume=resume)


def _config_conflicts(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The values (other than where and how fast) in which a saved run's config differs from `cfg`."""
    from feddat.federation.checkpoint import RESUME_MAY_CHANGE

    return [f"{k} (there: {saved[k]!r}, now: {v!r})" for k, v in cfg.to_dict().items()
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]


def _check_same_config(where: Path, saved: dict[str, Any], cfg: RunConfig) -> None:
    conflicts = _config_conflicts(saved, cfg)
    if conflicts:
        raise FedDATError(f"{where} holds a run of another config: {', '.join(conflicts)}; choose another --out "
                          "or remove that run")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_one(cfg: RunConfig, run_dir: Path, progress: bool, runner: Runner) -> tuple[dict, str]:
    """The results of one run in run_dir, and how they were had: 'reused', 'resumed' or 'ran'."""
    from feddat.federation.checkpoint import complete_checkpoints, load_checkpoint

    path = run_dir / "results.json"
    if path.exists():
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FedDATError(f"{path} is unreadable ({e}); remove it to run again") from e
        _check_same_config(path, result["config"], cfg)
        return result, "reused"
    ck = None
    if complete_checkpoints(run_dir):
        ck = load_checkpoint(run_dir)
        _check_same_config(ck.path, ck.config, cfg)
    try:
        result = runner(cfg, run_dir, progress, resume=ck) if ck is not None else runner(cfg, run_dir, progress)
    except FedDATError as e:
        raise CannotRun(str(e)) from e
    except Exception as e:  # a bug or a broken machine: keep the traceback, let the other runs go on
        import traceback

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise RunFailed(f"failed: {type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'}; the same command "
                        "runs it again)") from e
    (run_dir / "error.txt").unlink(missing_ok=True)
    return result, "resumed" if ck is not None else "ran"


def run_comparison(base: RunConfig, methods: list[str], seeds: list[int], out: Path, progress: bool = True,
                   log: Callable[[str], None] = print, runner: Runner | None = None, jobs: int = 1) -> dict:
    """Run (or reuse, or resume) every method for every seed under `out`; write table.json, table.md and
    compare.png there; return the table. With `jobs` > 1 that many runs go at once, each in its own process
    (no progress bars; a line per finished run), each with threads = cores / jobs unless `base` sets threads."""
    runner = runner or _default_runner
    if not isinstance(jobs, int) or jobs < 1:
        raise FedDATError(f"--jobs must be a positive integer, got {jobs!r}")
    out = Path(out)
    plan = [(m, s) for m in methods for s in seeds]
    finished = lambda m, s: (out / m / f"seed{s}" / "results.json").exists()
    unavailable: dict[str, str] = {}
    configs: dict[tuple[str, int], RunConfig] = {}
    for method, seed in plan:
        if method in unavailable:
            continue
        try:
            cfg = replace(base, method=method, seed=seed).validate()
        except FedDATError as e:
            unavailable[method] = str(e)
            log(f"{method}: cannot run: {e}")
            continue
        if jobs > 1 and base.threads == 0:
            cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // jobs))
        configs[(method, seed)] = cfg
    work = [key for key in plan if key in configs]
    to_do = sum(not finished(*key) for key in work)
    took: list[float] = []
    results: dict[tuple[str, int], dict] = {}
    failed: dict[tuple[str, int], str] = {}

    def record(k: int, key: tuple[str, int], outcome, seconds: float, fresh: bool) -> None:
        nonlocal to_do
        method, seed = key
        head = f"[{k}/{len(work)}] {method} seed {seed}"
        if isinstance(outcome, RunFailed):  # its method's other seeds still run: a rerun redoes only this one
            failed[key] = str(outcome)
            to_do -= fresh
            log(f"{head}: {outcome}")
            return
        if isinstance(outcome, CannotRun):
            unavailable[method] = str(outcome)
            log(f"{head}: cannot run: {outcome}")
            to_do -= fresh + sum(1 for m, s in work if m == method and (m, s) not in results and (m, s) != key
                                 and not finished(m, s))
            return
        result, how = outcome
        if fresh:
            took.append(seconds)
            to_do -= 1
        results[key] = result
        eta = f"; ETA {_hms(sum(took) / len(took) * to_do / jobs)} for {to_do} runs left" if took and to_do else ""
        log(f"{head}: {result['final']['avg_score']:.4f}" + (" (finished earlier)" if how == "reused" else
                                                             f" ({how}, {seconds:.0f} s{eta})"))

    if jobs == 1:
        for k, key in enumerate(work, 1):
            if key[0] in unavailable:
                continue
            run_dir = out / key[0] / f"seed{key[1]}"
            fresh = not finished(*key)
            if fresh:
                eta = f", ETA {_hms(sum(took) / len(took) * to_do)} for {to_do} runs left" if took else ""
                log(f"[{k}/{len(work)}] {key[0]} seed {key[1]}: running{eta}")
            t0 = time.time()
            try:
                outcome = run_one(configs[key], run_dir, progress, runner)
            except CannotRun as e:
                outcome = e
            record(k, key, outcome, time.time() - t0, fresh)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        log(f"{to_do} runs to do, {jobs} at a time")
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_timed_run, configs[key], out / key[0] / f"seed{key[1]}", runner): key
                       for key in work}
            for k, future in enumerate(as_completed(futures), 1):
                key = futures[future]
                fresh, seconds, outcome = future.result()
                if key[0] in unavailable and not isinstance(outcome, CannotRun):
                    continue
                record(k, key, outcome, seconds, fresh)
    for (method, seed), reason in failed.items():
        unavailable.setdefault(method, f"seed {seed} {reason}")
    runs: dict[str, list[dict]] = {}
    for key in work:  # in the plan's order, whatever order they finished in
        if key in results and key[0] not in unavailable:
            runs.setdefault(key[0], []).append(results[key])
    table = summarise(runs, unavailable, methods, base)
    write_table(table, out)
    if failed:
        which = ", ".join(f"{m} seed {s}" for m, s in failed)
        raise FedDATError(f"{len(failed)} run(s) failed ({which}); the others are in {out / 'table.md'}, and the "
                          "same command runs the failed ones again (their error.txt has the traceback)")
    return table


def _timed_run(cfg: RunConfig, run_dir: Path, runner: Runner):
    """(fresh, seconds, (result, how) or the CannotRun) of one run, for a worker process."""
    fresh = not (run_dir / "results.json").exists()
    t0 = time.time()
    try:
        outcome = run_one(cfg, run_dir, False, runner)
    except CannotRun as e:
        outcome = e
    return fresh, time.time() - t0, outcome


# ----- the table -----

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
    import copy

    import torch

    from feddat.algorithms.registry import get_method
    from feddat.federation.worker import Worker
    from feddat.models.backbone import load_backbone
    from feddat.models.vl import AnswerHead

    method = get_method(cfg.method)
    if backbone is None:
        backbone, _ = load_backbone(cfg.model_path, "cpu", cfg.backbone)
    worker = Worker(method, copy.deepcopy(backbone), cfg.reduction, cfg.local, "cpu", cfg.warmup)
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
        from feddat.models.backbone import load_backbone

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
    import matplotlib

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
