"""Measure FedDAT's protections on the Domain benchmark: one of the five clients attacks the shared adapter.

    python bench/robustness.py --out runs/robustness --seeds 0,1,2

Runs, per seed:
- `none / samples`: every client honest, FedAvg (the reference);
- for each attack (`--attacks`, default a sign flip and a -10x scaling of the attacker's change of the global
  adapter) and each aggregation rule (`--rules`: FedAvg = samples, median, trimmed-mean, krum, multi-krum):
  the attacker (`--attacker`, default blurry) sends the corrupted update every round;
- central DP (`--dp-noise` noise multipliers, equal-weight mean, clip `--dp-clip`; `auto` = the median of the
  honest clients' update norms of the reference run), honest and under the first attack.

Writes OUT/robustness.md (the table) and OUT/robustness.json. Each run lives in OUT/<attack>/<rule>/seed<k>/;
a finished run (results.json) is reused and an interrupted one resumed from its checkpoint, so the script can
be restarted. Use `--model-path` and `--set train_per_client=32 ...` for a quick check on a tiny backbone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import fields, replace
from pathlib import Path

from feddat.config import RunConfig
from feddat.eval.results import mean_and_se


def parse_set(items: list[str]) -> dict:
    """--set KEY=VALUE pairs as RunConfig values of the field's type."""
    kinds = {f.name: type(getattr(RunConfig(), f.name)) for f in fields(RunConfig)}
    out = {}
    for kv in items:
        key, value = kv.split("=", 1)
        kind = kinds.get(key, str)
        out[key] = None if value == "" and kind is type(None) else (str if kind is type(None) else kind)(value)
    return out


def attack_spec(attack: str, attacker: str) -> str:
    """`signflip` -> signflip:blurry; `scale=-10` -> scale:blurry=-10; `none` -> ''."""
    if attack == "none":
        return ""
    kind, _, value = attack.partition("=")
    return f"{kind}:{attacker}" + (f"={value}" if value else "")


def run_one(cfg: RunConfig, run_dir: Path, progress: bool) -> dict:
    """A finished run's results, or the run (resumed from its checkpoint if one was interrupted)."""
    from feddat.federation.checkpoint import complete_checkpoints, load_checkpoint
    from feddat.federation.inprocess import run

    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    resume = load_checkpoint(run_dir) if complete_checkpoints(run_dir) else None
    if resume is not None and resume.config != cfg.to_dict():
        resume = None  # another configuration in this directory: start again
    return run(cfg, run_dir, progress=progress, resume=resume)


def honest_norm(results: list[dict], attacker: str) -> float:
    return statistics.median(v for r in results for rd in r["rounds"]
                             for c, v in rd.get("update_norms", {}).items() if c != attacker)


def summarise(label: dict, results: list[dict], attacker: str) -> dict:
    honest = [statistics.fmean(v for c, v in r["final"]["clients"].items() if c != attacker) for r in results]
    allc = [r["final"]["avg_score"] for r in results]
    left_out = [sum(len(rd.get("rejected_clients", {})) + len(rd.get("missing_clients", {})) for rd in r["rounds"])
                for r in results]
    m_all, se_all = mean_and_se(allc)
    m_h, se_h = mean_and_se(honest)
    priv = results[0].get("privacy")
    return dict(label, avg_score=m_all, avg_score_se=se_all, honest_score=m_h, honest_score_se=se_h,
                attacker_score=statistics.fmean(r["final"]["clients"][attacker] for r in results),
                updates_left_out=statistics.fmean(left_out), epsilon=priv["epsilon"] if priv else None,
                seeds=[r["config"]["seed"] for r in results],
                wall_seconds=statistics.fmean(r["wall_seconds"] for r in results))


def fmt(m: float, se: float) -> str:
    return f"{m:.4f} ± {se:.4f}" if se == se else f"{m:.4f}"


def markdown(rows: list[dict], attacker: str, rounds: int) -> str:
    lines = [f"Attacker: {attacker} (1 of 5 clients), every round; {rounds} rounds. Scores: final test score, "
             "mean over clients (± s.e. over seeds).", "",
             "| attack | aggregation | DP clip / noise multiplier (ε at δ=1e-5) | all clients | honest clients | "
             "attacker | updates left out | s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dp = "-" if r["dp_clip"] == 0 else (f"{r['dp_clip']:.3g} / {r['dp_noise_multiplier']:g}"
                                            + (f" ({r['epsilon']:.3g})" if r["epsilon"] is not None else " (∞)"))
        lines.append(f"| {r['attack']} | {r['aggregation']} | {dp} | {fmt(r['avg_score'], r['avg_score_se'])} | "
                     f"{fmt(r['honest_score'], r['honest_score_se'])} | {r['attacker_score']:.4f} | "
                     f"{r['updates_left_out']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--seeds", default="0")
    p.add_argument("--benchmark", default="domain")
    p.add_argument("--method", default="feddat")
    p.add_argument("--attacker", default="blurry")
    p.add_argument("--attacks", default="signflip,scale=-10", help="comma-separated: signflip, scale=FACTOR, ...")
    p.add_argument("--rules", default="samples,median,trimmed-mean,krum,multi-krum")
    p.add_argument("--byzantine", type=int, default=1)
    p.add_argument("--trim-fraction", type=float, default=0.2)
    p.add_argument("--dp-noise", default="0,0.5,1,2", help="noise multipliers; empty for no DP runs")
    p.add_argument("--dp-clip", default="auto", help="L2 clip of a client's change; auto = median honest norm")
    p.add_argument("--rounds", type=int, default=RunConfig.rounds)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model-path", default=None, help="backbone directory (default: the embedded one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other RunConfig field")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = RunConfig(benchmark=args.benchmark, method=args.method, rounds=args.rounds, threads=args.threads,
                     model_path=args.model_path, byzantine=args.byzantine, trim_fraction=args.trim_fraction,
                     **parse_set(args.set)).validate()
    attacks = [a for a in args.attacks.split(",") if a]
    rules = [r for r in args.rules.split(",") if r]
    progress = not args.quiet

    def runs(label: str, rule: str, attack: str, **extra) -> list[dict]:
        results = []
        for seed in seeds:
            cfg = replace(base, seed=seed, aggregation=rule, fault_injection=attack_spec(attack, args.attacker),
                          **extra).validate()
            results.append(run_one(cfg, out / label / rule / f"seed{seed}", progress))
            print(f"{label} / {rule} seed {seed}: {results[-1]['final']['avg_score']:.4f}", flush=True)
        return results

    rows = []
    reference = runs("none", "samples", "none")
    rows.append(summarise(dict(attack="none", aggregation="samples", dp_clip=0.0, dp_noise_multiplier=0.0),
                          reference, args.attacker))
    for attack in attacks:
        for rule in rules:
            rows.append(summarise(dict(attack=attack, aggregation=rule, dp_clip=0.0, dp_noise_multiplier=0.0),
                                  runs(attack, rule, attack), args.attacker))
    noises = [float(z) for z in args.dp_noise.split(",") if z]
    if noises:
        clip = honest_norm(reference, args.attacker) if args.dp_clip == "auto" else float(args.dp_clip)
        for attack in ["none"] + attacks[:1]:
            for z in noises:
                label = f"dp-clip{clip:.4g}-z{z:g}"
                results = runs(f"{attack}/{label}", "equal", attack, dp_clip=clip, dp_noise_multiplier=z)
                rows.append(summarise(dict(attack=attack, aggregation="equal", dp_clip=clip, dp_noise_multiplier=z),
                                      results, args.attacker))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.attacker, base.rounds)
    (out / "robustness.md").write_text(table)
    (out / "robustness.json").write_text(json.dumps({"config": base.to_dict(), "seeds": seeds, "rows": rows},
                                                    indent=2))
    print(table)
    print(f"wrote {out / 'robustness.md'} and {out / 'robustness.json'}")


if __name__ == "__main__":
    main()
