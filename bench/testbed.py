"""Measure the Domain testbed and its ablations: every method over several seeds (data and training vary).

    python bench/testbed.py --out runs/testbed --seeds 0,1,2 \
        --benchmarks domain,domain-noskill,domain-noshift \
        --methods feddat,fedavg-adapter,fedavg-adapter-2x,local-adapter,head-only

Prints and writes, per benchmark, the comparison table of `feddat compare` (runs/testbed/<benchmark>/
table.md|json, compare.png: the same code, feddat.experiments.sweep and feddat.experiments.tables) and a
breakdown by question kind (new words: the shared skill; words with client-specific meanings), averaged
over clients and seeds, to runs/testbed/<benchmark>/summary.md. Finished runs are reused when restarted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from feddat.config import RunConfig
from feddat.config import parse_pairs
from feddat.experiments.sweep import parse_seeds, resolve_methods, run_comparison
from feddat.eval.results import mean_and_se


def breakdown_rows(out: Path, methods: list[str], seeds: list[int]) -> list[str]:
    rows = []
    keys = ("synonym", "shifted", "not-shifted")
    for m in methods:
        cells = []
        for key in keys:
            per_seed = []
            for s in seeds:
                path = out / m / f"seed{s}" / "results.json"
                if not path.exists():  # the method could not run (table.md says why)
                    continue
                r = json.loads(path.read_text())
                vals = [b[key] for b in r["final"]["breakdown"].values() if key in b]
                if vals:
                    per_seed.append(sum(vals) / len(vals))
            if per_seed:
                mean, se = mean_and_se(per_seed)
                cells.append(f"{mean:.4f} ± {se:.4f}" if se == se else f"{mean:.4f}")
            else:
                cells.append("-")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/testbed")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--benchmarks", default="domain,domain-noskill,domain-noshift")
    p.add_argument("--methods", default="feddat,fedavg-adapter,fedavg-adapter-2x,local-adapter,head-only")
    p.add_argument("--rounds", type=int, default=RunConfig.rounds)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1, help="score every N rounds (the last round always)")
    p.add_argument("--local-epochs", type=int, default=RunConfig.local_epochs)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other RunConfig field, e.g. --set lr_adapter=0.01 (repeatable)")
    p.add_argument("--model-path", default=None, help="backbone directory (default: the embedded one)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    seeds = parse_seeds(args.seeds)
    methods = resolve_methods(args.methods)
    out = Path(args.out)
    summary = []
    for bench in args.benchmarks.split(","):
        extra = parse_pairs(args.set)
        base = RunConfig(benchmark=bench, **extra, rounds=args.rounds, threads=args.threads, model_path=args.model_path,
                         eval_every=args.eval_every, local_epochs=args.local_epochs).validate()
        run_comparison(base, methods, seeds, out / bench, progress=not args.quiet)
        md = (out / bench / "table.md").read_text()
        part = [f"## {bench} (seeds {args.seeds})", "", md,
                "Mean over clients and seeds (± s.e. over seeds) by kind of question:", "",
                "| method | new words (shared skill) | client-specific meanings | other meanings |",
                "|---|---|---|---|"] + breakdown_rows(out / bench, methods, seeds) + [""]
        print("\n".join(part))
        (out / bench / "summary.md").write_text("\n".join(part) + "\n")
        summary += part


if __name__ == "__main__":
    main()
