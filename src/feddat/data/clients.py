"""A run's clients, by one path: every benchmark is a producer of client folders, and training reads folders.

The generated benchmarks and the paper's real datasets (feddat.data.benchmarks.client_records) are written as
client folders in feddat.data.folders' format (`export_benchmark`), and a run reads them as it reads a user's own
folders (`load_client_folder`: images decoded per batch). A run of a benchmark writes its folders once into the
cache, `<cache>/clients/<benchmark>-<key>/`, keyed by everything that decides their content (the generator's
version and specs, seed and sizes, the partition; for real datasets the directory, image size and a fingerprint
of its files), and later runs, processes and SuperNodes on the machine read the same folders.

    feddat data --benchmark domain --export DIR     # the same folders, where you want them
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from feddat.data.benchmarks import BENCHMARKS, CACHE_VERSION, RealData, client_records
from feddat.data.folders import (ORDER_FILE, FolderClient, export_client, load_named_folders, read_order,
                                 write_order)
from feddat.data.partition import shared_answers
from feddat.data.sizes import Sizes
from feddat.data.world import IMAGE_SIZE
from feddat.errors import FedDATError

log = logging.getLogger(__name__)

FOLDERS_VERSION = 1   # bump when what export_benchmark writes changes
FINGERPRINT_DEPTH = 3  # how deep below a real-data directory files are watched for changes
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}  # not stat'ed one by one


def check_splits(recs: dict[str, dict], sizes: Sizes) -> None:
    """Every client needs a train, val and test split with records: say which one is empty and what to lower."""
    for name, splits in recs.items():
        empty = [s for s in ("train", "val", "test") if len(splits[s]) == 0]
        if empty:  # training, model selection and scoring each need their split
            raise FedDATError(f"client {name} has no {empty[0]} questions: its data give too few records for "
                              f"{sizes.train}/{sizes.val}/{sizes.test} train/val/test per client; lower "
                              f"--{empty[0]}-per-client (and the others) or give it more data")


def export_benchmark(benchmark: str, seed: int, sizes: Sizes, out_dir, cache_dir=None, partition=None,
                     real: RealData | None = None, overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Every client of a benchmark (`client_records`: generated, or the paper's datasets with `real`) written
    with `export_client` as `out_dir/<client>/`; returns the folders in the benchmark's client order. A
    partition's clients share one label space, the pool's training answers (client.json "answers")."""
    recs = client_records(benchmark, seed, sizes, None if cache_dir is None else Path(cache_dir), partition, real)
    check_splits(recs, sizes)
    shared = shared_answers(recs) if partition is not None else None
    source = {"benchmark": benchmark, "seed": seed, "sizes": [sizes.train, sizes.val, sizes.test],
              "real": real is not None}
    if partition is not None:
        source["partition"] = asdict(partition)
    from tqdm import tqdm

    written = [export_client(splits, out_dir, name, overwrite, source, shared)
               for name, splits in tqdm(recs.items(), desc=f"writing {benchmark} clients", unit="client",
                                        disable=not progress, leave=False)]
    write_order(Path(out_dir), (p.name for p in written))  # --clients-dir numbers them as the benchmark does
    return written


def fingerprint(data_dir: Path, depth: int = FINGERPRINT_DEPTH) -> str:
    """What says a real-data directory changed: every folder's and every non-image file's path, size and
    modification time, `depth` levels down (a file added, removed or rewritten there; image files are not
    stat'ed, their folders are)."""
    h = hashlib.sha256()
    stack = [(Path(data_dir), 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise FedDATError(f"cannot read {folder}: {e}") from e
        st = folder.stat()
        h.update(f"{folder}|{st.st_mtime_ns}\n".encode())
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                if level < depth:
                    stack.append((Path(e.path), level + 1))
            elif Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
                st = e.stat()
                h.update(f"{e.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def folders_key(benchmark: str, seed: int, sizes: Sizes, partition=None, real: RealData | None = None) -> str:
    """The cache key of a benchmark's client folders: everything that decides what export_benchmark writes."""
    if benchmark not in BENCHMARKS:
        raise FedDATError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    what = {"v": [FOLDERS_VERSION, CACHE_VERSION], "b": benchmark, "seed": seed, "sizes": asdict(sizes),
            "partition": None if partition is None else asdict(partition)}
    if real is None:
        what["specs"] = [asdict(s) for s in BENCHMARKS[benchmark]()]
    else:
        data_dir = Path(real.data_dir).resolve()
        what["real"] = {"dir": str(data_dir), "image_size": real.image_size, "skip_bad": real.skip_bad,
                        "files": fingerprint(data_dir)}
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def benchmark_folders(benchmark: str, seed: int, sizes: Sizes, cache_dir, partition=None,
                      real: RealData | None = None) -> list[tuple[str, Path]]:
    """(name, folder) of every client of the benchmark, in its order, written into `cache_dir/clients/` unless
    there. A folder appears whole or not at all (written beside, then renamed), so processes that ask at once
    each write it and the first rename wins."""
    sizes.validate()
    root = Path(cache_dir) / "clients"
    final = root / f"{benchmark}-{folders_key(benchmark, seed, sizes, partition, real)}"
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            export_benchmark(benchmark, seed, sizes, tmp, cache_dir, partition, real,
                             progress=real is not None and real.progress)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not another process's folder: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        order = read_order(final)
        if not order:
            raise FedDATError(f"{final / ORDER_FILE} is missing")
    except FedDATError as e:
        raise FedDATError(f"the benchmark's client folders in {final} are damaged ({e}); delete that folder and "
                          "it will be written again") from e
    return [(name, final / name) for name in order]



def load_benchmark(benchmark: str, seed: int, sizes: Sizes, tokenizer, text_len: int, cache_dir,
                   partition=None, real: RealData | None = None, label_spaces: dict[str, list[str]] | None = None,
                   clients: int | None = None) -> list[FolderClient]:
    """Every client of the benchmark (the first `clients` of them), read from its client folders
    (`benchmark_folders`). A client's label space is its training answers (a partition's: the pool's), or the
    one `label_spaces` gives (scoring a saved model on other data); answers outside it count as wrong (one
    summary line). Generated images keep their rendered size; real ones are at the backbone's (`real`)."""
    folders = benchmark_folders(benchmark, seed, sizes, cache_dir, partition, real)[:clients]
    image_size = IMAGE_SIZE if real is None else real.image_size
    datasets_cache = Path(cache_dir) / "datasets"
    try:
        out = [load_named_folders([(name, path)], tokenizer, text_len, image_size, seed, cache_dir=datasets_cache,
                                  answers=(label_spaces or {}).get(name), report_unknown=False,
                                  check_images=False)[0]  # written by export_benchmark from decoded images
               for name, path in folders]
    except FedDATError as e:  # what was written is damaged: say how to get it back
        where = folders[0][1].parent if folders else cache_dir
        raise FedDATError(f"{e} (in the benchmark's cached client folders: delete {where} and they will be "
                          "written again)") from e
    unknown = [f"{c.name} {c.report.unknown_answers['test']}/{c.report.items['test']}"
               for c in out if c.report.unknown_answers.get("test")]
    if unknown:
        log.info("test answers outside the client's training answers (they count as wrong): %s", ", ".join(unknown))
    return out
