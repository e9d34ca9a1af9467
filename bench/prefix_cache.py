"""Wall time of whole runs with the frozen prefix kept (`--prefix-cache-mb`, the default) and computed per batch (0).

For each method, runs `feddat.federation.inprocess.run` twice in this process on the same config, cache on then
off, and prints the seconds of each, their ratio and whether the final scores and training losses are equal
(they must be: the cache changes where the frozen layers' output comes from, not its value). Writes
OUT/prefix_cache.json and OUT/prefix_cache.md.

    python bench/prefix_cache.py --benchmark scene --methods feddat,fedavg-adapter --out runs/prefix_cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def measure(method: str, opts) -> dict:
    from feddat.config import RunConfig
    from feddat.federation.inprocess import run

    row = {"method": method}
    numbers = {}
    for label, mb in (("on", opts.prefix_cache_mb), ("off", 0)):
        cfg = RunConfig(benchmark=opts.benchmark, method=method, rounds=opts.rounds, eval_every=opts.eval_every,
                        seed=opts.seed, threads=opts.threads, prefix_cache_mb=mb, model_path=opts.model_path,
                        **dict(zip(("train_per_client", "val_per_client", "test_per_client"), opts.sizes)),
                        **({"cache_dir": str(opts.out / "cache")} if opts.model_path else {})).validate()
        t0 = time.perf_counter()
        results = run(cfg, progress=False)
        row[f"seconds_{label}"] = round(time.perf_counter() - t0, 2)
        numbers[label] = (results["final"], [r["train"] for r in results["rounds"]])
    row["ratio"] = round(row["seconds_on"] / row["seconds_off"], 3)
    row["same_results"] = numbers["on"] == numbers["off"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--benchmark", default="scene")
    p.add_argument("--methods", default="feddat,fedavg-adapter")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefix-cache-mb", type=int, default=512)
    p.add_argument("--sizes", default="0,0,0", help="train,val,test items per client (0: the benchmark's)")
    p.add_argument("--model-path", default=None, help="a ViLT checkpoint (default: the embedded one)")
    opts = p.parse_args(argv)
    opts.sizes = tuple(int(x) for x in opts.sizes.split(","))
    opts.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in opts.methods.split(","):
        rows.append(measure(method, opts))
        r = rows[-1]
        print(f"{method}: {r['seconds_on']:.1f} s with the cache, {r['seconds_off']:.1f} s without, "
              f"ratio {r['ratio']:.3f}, same results: {r['same_results']}", flush=True)
    command = "python bench/prefix_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}`", "", "| method | s, cache on | s, cache off | on / off | same results |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {r['method']} | {r['seconds_on']:.1f} | {r['seconds_off']:.1f} | {r['ratio']:.3f} | "
              f"{'yes' if r['same_results'] else 'NO'} |" for r in rows]
    (opts.out / "prefix_cache.md").write_text("\n".join(lines) + "\n")
    (opts.out / "prefix_cache.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0 if all(r["same_results"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
