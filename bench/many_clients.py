"""Memory and time of a federation of many clients: the in-process engine, K clients per round out of N.

    python bench/many_clients.py --out runs/many_clients

For each N (`--num-clients`, default 10,100,1000) runs `feddat run` in a child process: the benchmark's pooled
records (`--benchmark`, default `function` when it exists, else `domain`; `--sizes` records per source client)
split over N clients by a Dirichlet partition over answers (alpha `--alpha`, default 0.5), `--per-round` clients
per round (default 10), `--rounds` rounds (default 2) with the shipped small ViLT, evaluation in the last round
only. The pool is the same for every N, so a client holds pool/N records. Reports the child's peak resident
memory (ru_maxrss from wait4), the seconds of the first round (training only; the last one also scores every
client), the training examples of that round and the whole run's wall time. The benchmark cache is filled by a
separate child first, so the measured runs read their data from it. Writes OUT/many_clients.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WARM = """
import sys
from pathlib import Path
from feddat.config import RunConfig
from feddat.data.benchmarks import client_records
cfg = RunConfig(**{k: v for k, v in __import__("json").loads(sys.argv[1]).items()}).validate()
client_records(cfg.benchmark, cfg.seed, cfg.sizes, Path(cfg.cache_dir), cfg.partition_spec)
"""


def default_benchmark() -> str:
    from feddat.data.benchmarks import BENCHMARKS

    return "function" if "function" in BENCHMARKS else "domain"


def run_child(args: list[str], env: dict) -> tuple[int, float, int]:
    """(exit status, seconds, peak RSS in bytes) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err[-3000:])
    return proc.returncode, seconds, usage.ru_maxrss * 1024  # Linux: kilobytes


def measure(n: int, opts, out: Path, env: dict) -> dict:
    train, val, test = opts.sizes
    values = dict(benchmark=opts.benchmark, partition="dirichlet", num_clients=n, partition_alpha=opts.alpha,
                  clients_per_round=opts.per_round, rounds=opts.rounds, eval_every=opts.rounds, seed=opts.seed,
                  train_per_client=train, val_per_client=val, test_per_client=test, threads=opts.threads,
                  cache_dir=str(out / "cache"), prefix_cache_mb=opts.prefix_cache_mb)
    rc, _, _ = run_child([sys.executable, "-c", WARM, json.dumps(values)], env)
    if rc:
        raise SystemExit(f"filling the benchmark cache for N={n} failed")
    run_dir = out / f"n{n}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    feddat = [sys.executable, "-m", "feddat.cli", "run", "--out", str(run_dir), "--force", "--quiet", *flags]
    rc, wall, rss = run_child(feddat, env)
    if rc:
        raise SystemExit(f"feddat run for N={n} failed (exit {rc})")
    results = json.loads((run_dir / "results.json").read_text())
    rounds = results["rounds"]
    first = rounds[0]
    return {"num_clients": n, "clients_per_round": opts.per_round, "peak_rss_mb": rss / 2 ** 20,
            "train_round_seconds": first["seconds"], "last_round_seconds": rounds[-1]["seconds"],
            "train_examples_round1": sum(results_train_sizes(run_dir, first["sampled_clients"])),
            "wall_seconds": wall, "final_avg_score": results["final"]["avg_score"]}


def results_train_sizes(run_dir: Path, clients: list[str]) -> list[int]:
    """The training examples of the given clients (their saved models record their answers, not sizes: read the
    data's split from the run's config instead)."""
    from feddat.config import RunConfig
    from feddat.data.benchmarks import client_records

    cfg = RunConfig.from_dict(json.loads((run_dir / "results.json").read_text())["config"])
    recs = client_records(cfg.benchmark, cfg.seed, cfg.sizes, Path(cfg.cache_dir), cfg.partition_spec)
    return [len(recs[c]["train"]) for c in clients]


def table(rows: list[dict]) -> str:
    base = rows[0]["peak_rss_mb"]
    lines = ["| N clients | K per round | peak RSS (MB) | growth vs first (MB) | round 1 s (train) | "
             "train examples round 1 | last round s (train + score all) | run wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['num_clients']} | {r['clients_per_round']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - base:+.0f} | {r['train_round_seconds']:.2f} | "
                     f"{r['train_examples_round1']} | {r['last_round_seconds']:.2f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--benchmark", default=None, help="default: function if it exists, else domain")
    p.add_argument("--num-clients", default="10,100,1000")
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--sizes", default="2400,1200,1200", help="train,val,test records per source client of the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefix-cache-mb", type=int, default=0,
                   help="the runs' prefix cache (default 0, off: the peaks are those of the clients' states)")
    opts = p.parse_args(argv)
    opts.benchmark = opts.benchmark or default_benchmark()
    opts.sizes = tuple(int(x) for x in opts.sizes.split(","))
    opts.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows = []
    for n in (int(x) for x in opts.num_clients.split(",")):
        rows.append(measure(n, opts, opts.out, env))
        print(f"N={n}: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, round 1 {rows[-1]['train_round_seconds']:.2f} s",
              flush=True)
    text = table(rows)
    command = "python bench/many_clients.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (opts.out / "many_clients.json").write_text(json.dumps({"command": command, "benchmark": opts.benchmark,
                                                            "sizes": opts.sizes, "rows": rows}, indent=1))
    (opts.out / "many_clients.md").write_text(f"{command}\n\nbenchmark {opts.benchmark}\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
