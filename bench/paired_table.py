"""Paired view of a `feddat compare` directory: each method's average score per seed, mean ± std over seeds, and
the paired differences between a reference method and each other method (the same seed gives the same data,
partition and sampled clients, so the differences pair).

    python bench/paired_table.py runs/compare-many --reference feddat

Reads DIR/<method>/seed<k>/results.json (every method directory, every seed) and prints a markdown report:
the average over all clients of the predicting view's final test score (every reported view of a method with
several), the clients no round sampled, and each run's wall time. Writes DIR/paired.json and DIR/paired.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from feddat.errors import FedDATError


def load_runs(out: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: results.json}} of every finished run under `out`."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*/seed*/results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FedDATError(f"{path} is unreadable ({e}); run the comparison again to rewrite it") from e
        runs.setdefault(path.parent.parent.name, {})[int(results["config"]["seed"])] = results
    if not runs:
        raise FedDATError(f"{out} holds no finished run (no */seed*/results.json): run `feddat compare --out {out}`")
    return runs


def mean_std(values: list[float]) -> dict[str, float | None]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def never_sampled(results: dict) -> int:
    """How many clients no round drew (0 when every client takes part in every round)."""
    drawn = {c for r in results["rounds"] for c in r.get("sampled_clients", results["clients"])}
    return len(set(results["clients"]) - drawn)


def summarise(runs: dict[str, dict[int, dict]], reference: str) -> dict:
    if reference not in runs:
        raise FedDATError(f"no runs of the reference method {reference!r}; the directory has {', '.join(runs)}")
    seeds = sorted(runs[reference])
    for method, by_seed in runs.items():
        if sorted(by_seed) != seeds:
            raise FedDATError(f"{method} ran seeds {sorted(by_seed)}, {reference} seeds {seeds}: pairing needs "
                              "the same seeds")
    table: dict = {"reference": reference, "seeds": seeds, "methods": {}, "differences": {}}
    for method, by_seed in runs.items():
        avg = [by_seed[s]["final"]["avg_score"] for s in seeds]
        views = {v: [by_seed[s]["final"]["views"][v]["avg_score"] for s in seeds]
                 for v in by_seed[seeds[0]]["final"].get("views", {})}
        table["methods"][method] = {
            "avg_score": avg, "summary": mean_std(avg),
            "views": {v: {"per_seed": vals, "summary": mean_std(vals)} for v, vals in views.items()},
            "never_sampled": [never_sampled(by_seed[s]) for s in seeds],
            "wall_seconds": [by_seed[s]["wall_seconds"] for s in seeds]}
    ref = table["methods"][reference]["avg_score"]
    for method, row in table["methods"].items():
        if method != reference:
            diff = [a - b for a, b in zip(ref, row["avg_score"])]
            table["differences"][method] = {"per_seed": diff, "summary": mean_std(diff),
                                            "reference_wins": sum(d > 0 for d in diff)}
    return table


def _pm(stat: dict, sign: str = "") -> str:
    return f"{stat['mean']:{sign}.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")


def markdown(table: dict) -> str:
    seeds, ref = table["seeds"], table["reference"]
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    lines = ["Average final test score over all clients (predicting view; std over seeds):", "", head,
             "|---" * (len(seeds) + 2) + "|"]
    for method, row in table["methods"].items():
        lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in row["avg_score"])
                     + f" | {_pm(row['summary'])} |")
        for view, v in row["views"].items() if len(row["views"]) > 1 else ():
            lines.append(f"| {method}, {view} view | " + " | ".join(f"{x:.4f}" for x in v["per_seed"])
                         + f" | {_pm(v['summary'])} |")
    lines += ["", f"Paired differences, {ref} − method (same seed):", "",
              "| comparison | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | seeds won |",
              "|---" * (len(seeds) + 3) + "|"]
    for method, d in table["differences"].items():
        lines.append(f"| {ref} − {method} | " + " | ".join(f"{x:+.4f}" for x in d["per_seed"])
                     + f" | {_pm(d['summary'], '+')} | {d['reference_wins']}/{len(seeds)} |")
    lines += ["", "| method | clients never sampled (per seed) | wall s per run (per seed) |", "|---|---|---|"]
    for method, row in table["methods"].items():
        lines.append(f"| {method} | {', '.join(map(str, row['never_sampled']))} | "
                     + ", ".join(f"{s:.0f}" for s in row["wall_seconds"]) + " |")
    total = sum(s for row in table["methods"].values() for s in row["wall_seconds"])
    lines += ["", f"Total wall time of the {sum(len(r['wall_seconds']) for r in table['methods'].values())} runs: "
              f"{total / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def against_reference(table: dict, order: list[str] | None = None) -> str:
    """One row per method: its score per seed, mean ± std, and method − reference (mean ± std over the paired
    seeds, and the seeds the method won), in `order` (default: the directory's)."""
    seeds, ref = table["seeds"], table["reference"]
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean ± std | − {ref} (seeds won) |",
             "|---" * (len(seeds) + 3) + "|"]
    for method in order or list(table["methods"]):
        row = table["methods"][method]
        cells = " | ".join(f"{v:.4f}" for v in row["avg_score"])
        if method == ref:
            versus = ""
        else:
            d = table["differences"][method]
            flipped = {"mean": -d["summary"]["mean"], "std": d["summary"]["std"]}
            won = sum(x < 0 for x in d["per_seed"])
            versus = f"{_pm(flipped, '+')} ({won}/{len(seeds)})".replace("+-", "−").replace("-", "−")
        lines.append(f"| {method} | {cells} | {_pm(row['summary'])} | {versus} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a `feddat compare --out` directory")
    p.add_argument("--reference", default="feddat", help="the method the differences are taken from")
    p.add_argument("--order", default="", help="comma-separated methods: the order of the last table's rows")
    args = p.parse_args()
    table = summarise(load_runs(args.out), args.reference)
    md = markdown(table) + "\nAgainst the reference:\n\n" + against_reference(
        table, [m for m in args.order.split(",") if m] or None)
    (args.out / "paired.json").write_text(json.dumps(table, indent=2) + "\n")
    (args.out / "paired.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
