"""Memory and speed of client folders (feddat.data.folders): images decoded per batch instead of held in memory.

1. For each N (default 1,000, 10,000, 50,000) writes one client folder with N training images (48x48 PNGs of the
   generated world, as the Domain benchmark renders them), then in a fresh subprocess loads it with
   `load_client_folder` and iterates its training split in batches of 32 through `split.batch` (decode +
   tokenised tensors, no model), `--epochs` times: epoch 1 decodes every image, later ones read what the
   decoded-image cache (`image_cache_mb`, default 64 MiB) kept. Reports peak RSS (`ru_maxrss`), load seconds and
   samples/s.
2. At the demo size (the Domain benchmark's first client, 400 training questions) the same for the in-memory
   path (`records_split`: every image a float tensor, what runs read before client folders) and for the folder
   written from the same records, each in its own subprocess, alternating, `--repeats` times (best kept); plus the CPU seconds of
   `Worker.fit` rounds (fedavg-adapter, embedded ViLT, prefix cache on) over each, and folder/in-memory ratios.

Speeds are by CPU time of the measuring process (one torch thread), so that a machine shared with other jobs
distorts them less than wall time would; wall-time figures are in the JSON too.

Prints a table, writes OUT/folder_memory.json; the folders go to a temporary directory removed at the end.

    python bench/folder_memory.py --out runs/folder_memory
    python bench/folder_memory.py --sizes 1000,5000 --out /tmp/fm      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- writing the folders (parent process) -----------------------------------------------------------------

def image_pool(n: int, seed: int):
    """n rendered 48x48 images with one question each (the Domain benchmark's first client's generator)."""
    from feddat.data.benchmarks import client_records
    from feddat.data.sizes import Sizes

    recs = client_records("domain", seed, Sizes(n, 1, 1))
    return next(iter(recs.values()))["train"]


def write_big_folder(root: Path, n_train: int, pool) -> Path:
    """train/ with n_train PNG files (the pool's images, cycled: distinct files), validation/ and test/ small."""
    import io

    from PIL import Image

    encoded = []
    for i in range(len(pool)):
        buf = io.BytesIO()
        Image.fromarray(pool.images[pool.image_index[i]]).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for split, n in (("train", n_train), ("validation", 100), ("test", 200)):
        folder = root / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as meta:
            for i in range(n):
                k = i % len(pool)
                name = f"{i:06d}.png"
                (folder / name).write_bytes(encoded[k])
                meta.write(json.dumps({"file_name": name, "question": pool.questions[k], "answer": pool.answers[k],
                                       "qtype": pool.qtypes[k]}) + "\n")
    (root / "client.json").write_text('{"task": "vqa"}\n')
    return root


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


# --- measuring (child process) ----------------------------------------------------------------------------

def iterate(split, epochs: int, seed: int) -> dict:
    """Samples per second of each epoch of split.batch over a seeded random order, by CPU time of this process
    (the machine may be shared: CPU time is what the work costs) and by wall time."""
    import torch

    cpu, wall = [], []
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(split), generator=g)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, len(split), BATCH):
            b = split.batch(perm[start:start + BATCH])
            assert b["pixel_values"].shape[0] == len(perm[start:start + BATCH])
        cpu.append(round(len(split) / (time.process_time() - c0)))
        wall.append(round(len(split) / (time.perf_counter() - t0)))
    return {"samples_per_s_cpu": cpu, "samples_per_s_wall": wall}


def fit_seconds(client, rounds: int) -> dict:
    """CPU seconds of each of `rounds` Worker.fit calls (fedavg-adapter, embedded ViLT, prefix cache on): the first
    decodes every image and computes the frozen prefix, the later ones reuse both."""
    import torch

    from feddat.algorithms.base import LocalConfig
    from feddat.algorithms.registry import get_method
    from feddat.federation.worker import Worker
    from feddat.models.backbone import load_backbone

    backbone, _ = load_backbone(None)
    torch.manual_seed(0)
    worker = Worker(get_method("fedavg-adapter"), backbone, 8, LocalConfig(batch_size=BATCH))
    state, glob = worker.initial_state(0, client.head_spec, 0), worker.initial_global(0)
    per_round = []
    for r in range(rounds):
        c0 = time.process_time()
        fit = worker.fit(client, state, glob, r, rounds, 0, 0)
        per_round.append(round(time.process_time() - c0, 3))
        state, glob = fit.state, fit.update
    return {"fit_cpu_s": per_round}


def child(opts) -> dict:
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    from feddat.models.backbone import load_backbone

    _, tok = load_backbone(None)  # the embedded ViLT's tokenizer (text_len 12)
    if opts.path_kind == "folder":
        import datasets  # noqa: F401  imported before the baseline, as the in-memory child imports torch

        from feddat.data.folders import load_client_folder
    base = rss_mb()
    t0 = time.perf_counter()
    if opts.path_kind == "memory":
        from feddat.data.benchmarks import ClientData, records_split, client_records, label_space
        from feddat.data.sizes import Sizes

        # the in-memory reference (records_split), for this one client only
        name, splits = next(iter(client_records("domain", opts.seed, Sizes(*opts.demo), Path(opts.path)).items()))
        answers = label_space(splits["train"].task, splits["train"])
        lookup = {a: i for i, a in enumerate(answers)}
        client = ClientData(name, answers, *(records_split(splits[s], tok, 12, lookup) for s in ("train", "val", "test")))
        del splits
    else:
        client = load_client_folder(opts.path, tok, 12, 48, opts.seed, cache_dir=opts.hf_cache,
                                    image_cache_mb=opts.image_cache_mb)
    load_s = time.perf_counter() - t0
    after_load = rss_mb()
    row = {"path": opts.path_kind, "n_train": len(client.train), "baseline_rss_mb": round(base, 1),
           "load_s": round(load_s, 2), "rss_after_load_mb": round(after_load, 1),
           **iterate(client.train, opts.epochs, opts.seed), "peak_rss_mb": round(rss_mb(), 1),
           "current_rss_mb": round(current_rss_mb(), 1)}
    if opts.fit_rounds:
        row.update(fit_seconds(client, opts.fit_rounds))
        row["peak_rss_mb_after_fit"] = round(rss_mb(), 1)
    return row


def run_child(kind: str, path: Path, opts, fit_rounds: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--hf-cache", str(opts.hf_cache),
           "--epochs", str(opts.epochs), "--seed", str(opts.seed), "--fit-rounds", str(fit_rounds),
           "--image-cache-mb", str(opts.image_cache_mb), "--demo", ",".join(map(str, opts.demo))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {kind} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000", help="training images per folder, comma-separated")
    ap.add_argument("--epochs", type=int, default=3, help="epochs over each training split (the first decodes)")
    ap.add_argument("--repeats", type=int, default=2, help="demo-size children per path, alternating (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-rounds", type=int, default=3, help="Worker.fit rounds at the demo size (0: skip)")
    ap.add_argument("--image-cache-mb", type=int, default=64)
    ap.add_argument("--work", type=Path, default=None, help="where to write the folders (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT/folder_memory.json")
    ap.add_argument("--child", choices=("memory", "folder"), dest="path_kind", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--demo", default="400,200,1000", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    opts.demo = tuple(int(v) for v in str(opts.demo).split(","))
    if opts.path_kind:
        opts.fit_rounds = int(opts.fit_rounds)
        print(json.dumps(child(opts)))
        return 0
    sizes = [int(v) for v in opts.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="folder-memory-", dir=opts.work))
    opts.hf_cache = work / "hf-cache"
    report = {"batch": BATCH, "image_cache_mb": opts.image_cache_mb, "epochs": opts.epochs, "by_size": [],
              "demo": {}}
    try:
        from feddat.data.benchmarks import client_records
        from feddat.data.folders import export_client
        from feddat.data.sizes import Sizes

        t0 = time.perf_counter()
        pool = image_pool(min(max(sizes), 2000), opts.seed)
        print(f"rendered {len(pool)} images in {time.perf_counter() - t0:.1f}s", flush=True)
        for n in sizes:
            folder = work / f"n{n}"
            t0 = time.perf_counter()
            write_big_folder(folder, n, pool)
            written = time.perf_counter() - t0
            row = run_child("folder", folder, opts)
            row.update(n_images=n, write_s=round(written, 1), disk_mb=round(disk_mb(folder), 1))
            report["by_size"].append(row)
            print(f"N={n}: {row}", flush=True)
            shutil.rmtree(folder)
        # demo size: in-memory vs folder of the same records
        cache = work / "feddat-cache"
        recs = client_records("domain", opts.seed, Sizes(*opts.demo), cache_dir=cache)
        name, splits = next(iter(recs.items()))
        folder = export_client(splits, work / "demo", name)
        runs = {"memory": [], "folder": []}
        for _ in range(opts.repeats):  # alternating, so that both paths see the same load of a shared machine
            runs["memory"].append(run_child("memory", cache, opts, opts.fit_rounds))
            runs["folder"].append(run_child("folder", folder, opts, opts.fit_rounds))
        demo = {"client": name, "runs": runs}
        for kind, rs in runs.items():
            demo[kind] = {"n_train": rs[0]["n_train"], "load_s": min(r["load_s"] for r in rs),
                          "peak_rss_mb": min(r["peak_rss_mb"] for r in rs),
                          "baseline_rss_mb": min(r["baseline_rss_mb"] for r in rs),
                          "cold_samples_per_s": max(r["samples_per_s_cpu"][0] for r in rs),
                          "warm_samples_per_s": max(max(r["samples_per_s_cpu"][1:] or [0]) for r in rs)}
            if opts.fit_rounds:
                demo[kind]["fit_first_round_cpu_s"] = min(r["fit_cpu_s"][0] for r in rs)
                demo[kind]["fit_later_round_cpu_s"] = min(min(r["fit_cpu_s"][1:] or [0]) for r in rs)
        m, f = demo["memory"], demo["folder"]
        demo["ratio_cold_samples_per_s"] = round(f["cold_samples_per_s"] / m["cold_samples_per_s"], 3)
        demo["ratio_warm_samples_per_s"] = round(f["warm_samples_per_s"] / m["warm_samples_per_s"], 3)
        if opts.fit_rounds:
            demo["ratio_fit_first_round"] = round(f["fit_first_round_cpu_s"] / m["fit_first_round_cpu_s"], 3)
            demo["ratio_fit_later_round"] = round(f["fit_later_round_cpu_s"] / m["fit_later_round_cpu_s"], 3)
        report["demo"] = demo
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = report["by_size"]
    if len(by) > 1:
        report["peak_rss_growth_mb"] = round(by[-1]["peak_rss_mb"] - by[0]["peak_rss_mb"], 1)
    print()
    print("samples/s of split.batch (batches of 32) by CPU time: cold = first epoch (decodes every image), warm = "
          "best later epoch")
    print(f"{'path':8} {'N train':>8} {'disk MB':>8} {'load s':>7} {'peak RSS MB':>12} {'RSS-baseline':>13} "
          f"{'cold':>8} {'warm':>8}")
    for r in by:
        print(f"{'folder':8} {r['n_train']:>8} {r['disk_mb']:>8} {r['load_s']:>7} {r['peak_rss_mb']:>12} "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>13.1f} {r['samples_per_s_cpu'][0]:>8} "
              f"{max(r['samples_per_s_cpu'][1:] or [0]):>8}")
    d = report["demo"]
    for kind in ("memory", "folder"):
        r = d[kind]
        fit = (f"   Worker.fit CPU s: round 1 {r['fit_first_round_cpu_s']}, later {r['fit_later_round_cpu_s']}"
               if "fit_first_round_cpu_s" in r else "")
        print(f"{kind:8} {r['n_train']:>8} {'':>8} {r['load_s']:>7} {r['peak_rss_mb']:>12} "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>13.1f} {r['cold_samples_per_s']:>8} "
              f"{r['warm_samples_per_s']:>8}{fit}")
    if "peak_rss_growth_mb" in report:
        print(f"\npeak RSS growth {by[0]['n_train']} -> {by[-1]['n_train']} images: {report['peak_rss_growth_mb']} MB")
    print(f"demo size, folder / in-memory: samples/s cold {d['ratio_cold_samples_per_s']}, warm "
          f"{d['ratio_warm_samples_per_s']}" + (f"; Worker.fit CPU seconds round 1 {d['ratio_fit_first_round']}, "
                                                f"later rounds {d['ratio_fit_later_round']}"
                                                if "ratio_fit_first_round" in d else ""))
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "folder_memory.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {opts.out / 'folder_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
