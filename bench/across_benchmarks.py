"""Every method over several `feddat compare` directories (one per benchmark), and the comparison's checks.

    python bench/across_benchmarks.py runs/compare-rivals-domain runs/compare-all-function \
        runs/compare-all-scene runs/compare-all-task --out runs/across

Reads each DIR/table.json (written by `feddat compare`) and writes OUT/across.md and OUT/across.json:
- per method its average score on each benchmark (mean over seeds) and the mean over the benchmarks, rows
  sorted by that mean; only methods measured on every benchmark get the mean;
- per benchmark, the reference method's rank among the federated methods (those that send something every
  round; its own ablations, `<reference>-*`, counted apart), and its paired difference, seed by seed, with
  the best other federated method there: it "wins" a benchmark when the mean difference is positive and
  larger than the difference's standard deviation over seeds;
- per ablation its mean over the benchmarks minus the reference's;
- bytes per client per round of the reference against `fedavg-adapter` and `fedavg-full`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from feddat.errors import FedDATError


def load_tables(dirs: list[Path]) -> dict[str, dict]:
    """{benchmark: table.json} in the order given; one directory per benchmark."""
    tables: dict[str, dict] = {}
    for d in dirs:
        path = d / "table.json"
        try:
            table = json.loads(path.read_text())
        except FileNotFoundError:
            raise FedDATError(f"{path} does not exist: run `feddat compare --out {d}` first") from None
        except (OSError, json.JSONDecodeError) as e:
            raise FedDATError(f"{path} is unreadable ({e}); run `feddat compare --out {d}` again") from None
        bench = table.get("benchmark")
        if not isinstance(bench, str) or not isinstance(table.get("methods"), dict):
            raise FedDATError(f"{path} is not a `feddat compare` table (no benchmark or methods)")
        if bench in tables:
            raise FedDATError(f"two directories hold the {bench} benchmark; give one per benchmark")
        tables[bench] = table
    return tables


def _mean_std(values: list[float]) -> dict[str, float | None]:
    n = len(values)
    mean = sum(values) / n
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None}


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and "avg_score" in row


def federated(row: dict) -> bool:
    """Whether a method sends something every round (local and head-only send nothing; pooled data has none)."""
    return bool(row.get("bytes_per_client_per_round"))


def summarise(tables: dict[str, dict], reference: str = "feddat") -> dict:
    benches = list(tables)
    methods: dict[str, dict] = {}
    for bench, table in tables.items():
        for name, row in table["methods"].items():
            if _ok(row):
                methods.setdefault(name, {})[bench] = row["avg_score"]["mean"]
    if set(methods.get(reference, {})) != set(benches):
        raise FedDATError(f"{reference} is not measured on every benchmark given ({', '.join(benches)})")
    rows = {name: {"scores": scores,
                   "mean": sum(scores.values()) / len(benches) if set(scores) == set(benches) else None}
            for name, scores in methods.items()}
    ordered = sorted(rows, key=lambda m: (rows[m]["mean"] is None, -(rows[m]["mean"] or 0.0)))
    out: dict = {"benchmarks": benches, "reference": reference,
                 "methods": {m: rows[m] for m in ordered}, "per_benchmark": {}, "ablations": {}, "bytes": {}}
    for bench, table in tables.items():
        ms = table["methods"]
        ref = ms[reference]
        fed = {m: r for m, r in ms.items() if _ok(r) and federated(r) and m != reference}
        rivals = {m: r for m, r in fed.items() if not m.startswith(reference + "-")}
        ranked = sorted(rivals, key=lambda m: -rivals[m]["avg_score"]["mean"])
        rank = 1 + sum(rivals[m]["avg_score"]["mean"] > ref["avg_score"]["mean"] for m in rivals)
        best = ranked[0] if ranked else None
        entry: dict = {"rank": rank, "of": len(rivals) + 1, "above": [m for m in ranked
                       if rivals[m]["avg_score"]["mean"] > ref["avg_score"]["mean"]],
                       "ablations_above": sorted(m for m, r in fed.items() if m.startswith(reference + "-")
                                                 and r["avg_score"]["mean"] > ref["avg_score"]["mean"])}
        if best is not None:
            seeds = [s for s in ref["seeds"] if s in rivals[best]["seeds"]]
            a = dict(zip(ref["seeds"], ref["avg_score_per_seed"]))
            b = dict(zip(rivals[best]["seeds"], rivals[best]["avg_score_per_seed"]))
            diff = [a[s] - b[s] for s in seeds]
            stat = _mean_std(diff)
            entry.update(best_other=best, difference_per_seed=diff, difference=stat,
                         wins=stat["mean"] > 0 and (stat["std"] is None or stat["mean"] > stat["std"]))
        out["per_benchmark"][bench] = entry
    ref_mean = rows[reference]["mean"]
    for m, row in rows.items():
        if m.startswith(reference + "-") and row["mean"] is not None:
            out["ablations"][m] = {"mean_minus_reference": row["mean"] - ref_mean,
                                   "below": row["mean"] < ref_mean}
    for bench, table in tables.items():
        ms = table["methods"]
        sent = {m: ms[m].get("bytes_per_client_per_round") for m in (reference, "fedavg-adapter", "fedavg-full")
                if m in ms and _ok(ms[m])}
        if reference in sent:
            b = {"reference": sent[reference], "fedavg-adapter": sent.get("fedavg-adapter"),
                 "fedavg-full": sent.get("fedavg-full")}
            if b["fedavg-full"]:
                b["fraction_of_full"] = sent[reference] / b["fedavg-full"]
            out["bytes"][bench] = b
    return out


def markdown(s: dict) -> str:
    benches, ref = s["benchmarks"], s["reference"]
    lines = ["Average final test score (mean over seeds) per benchmark, and the mean over the benchmarks:", "",
             "| method | " + " | ".join(benches) + " | mean |", "|---" * (len(benches) + 2) + "|"]
    for m, row in s["methods"].items():
        cells = [f"{row['scores'][b]:.4f}" if b in row["scores"] else "-" for b in benches]
        mean = f"{row['mean']:.4f}" if row["mean"] is not None else "-"
        name = f"**{m}**" if m == ref else m
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", f"{ref} among the federated methods (its ablations apart), and its paired difference with the "
              "best other one (same seeds):", "",
              "| benchmark | rank | above it | best other | difference per seed | mean ± std | wins |",
              "|---|---|---|---|---|---|---|"]
    for b, e in s["per_benchmark"].items():
        if "best_other" in e:
            d = e["difference"]
            pm = f"{d['mean']:+.4f}" + (f" ± {d['std']:.4f}" if d["std"] is not None else "")
            per = ", ".join(f"{x:+.4f}" for x in e["difference_per_seed"])
            lines.append(f"| {b} | {e['rank']} of {e['of']} | {', '.join(e['above']) or '-'} | {e['best_other']} "
                         f"| {per} | {pm} | {'yes' if e['wins'] else 'no'} |")
        above = e["ablations_above"]
        if above:
            lines.append(f"| {b}: ablations above {ref} | | {', '.join(above)} | | | | |")
    if s["ablations"]:
        lines += ["", f"Ablations, mean over the benchmarks minus {ref}'s: " + "; ".join(
            f"{m} {a['mean_minus_reference']:+.4f} ({'below' if a['below'] else 'not below'})"
            for m, a in s["ablations"].items()) + "."]
    if s["bytes"]:
        parts = []
        for b, x in s["bytes"].items():
            frac = f", {100 * x['fraction_of_full']:.2f}% of fedavg-full's {x['fedavg-full']:,}" \
                if "fraction_of_full" in x else ""
            parts.append(f"{b} {x['reference']:,} (fedavg-adapter {x['fedavg-adapter'] or 0:,}{frac})")
        lines += ["", f"Bytes per client per round of {ref}: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="`feddat compare --out` directories, one per benchmark")
    p.add_argument("--reference", default="feddat")
    p.add_argument("--out", type=Path, required=True, help="directory for across.md and across.json")
    args = p.parse_args()
    try:
        s = summarise(load_tables(args.dirs), args.reference)
    except FedDATError as e:
        raise SystemExit(f"error: {e}") from None
    md = markdown(s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "across.json").write_text(json.dumps(s, indent=2) + "\n")
    (args.out / "across.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
