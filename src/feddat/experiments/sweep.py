"""Run several methods over several seeds: the sweep behind `feddat compare` and `feddat tune`.

`run_comparison` runs every (method, seed) in DIR/<method>/seed<k>/ (a `feddat run --out` directory each):
a finished run (results.json) is reused, an interrupted one goes on from its last checkpoint, so a
comparison started again resumes where it stopped. With `jobs` > 1 the runs go in a pool of processes. A run
that fails does not stop the others: its row says why, and the comparison ends in an error once the table is
written (feddat.experiments.tables: table.json, table.md and compare.png).

A method that cannot run with the given settings (its config is refused) is not skipped silently: its row
says why.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from feddat.algorithms.registry import METHODS
from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.experiments.tables import summarise, write_table
from feddat.federation.checkpoint import RESUME_MAY_CHANGE, complete_checkpoints, load_checkpoint
from feddat.federation.inprocess import run

NOT_FROM_GRID = ("method", "seed")   # set by the comparison itself, per run


def resolve_methods(text: str) -> list[str]:
    """'all' (every registered method but the probes, in registry order) or a comma-separated list of method
    names."""
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


Runner = Callable[..., dict]


class CannotRun(FedDATError):
    """A method refused by its run (not by a conflict with a saved run): its row says why."""


class RunFailed(CannotRun):
    """A run that stopped on an unexpected error: the other runs go on, its row says so, the traceback is in
    its directory's error.txt, and the comparison ends in an error once the table is written."""


def _default_runner(cfg: RunConfig, out_dir: Path, progress: bool, resume=None) -> dict:
    return run(cfg, out_dir, progress=progress, resume=resume)


def _config_conflicts(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The values (other than where and how fast) in which a saved run's config differs from `cfg`."""
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
