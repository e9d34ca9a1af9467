"""Partitioned benchmarks: a benchmark's pooled records split over N clients with Flower Datasets' partitioners.

The pool is every record of the benchmark's own clients (their train, val and test records, concatenated in
client order), exposed as a Hugging Face `datasets.Dataset` with one row per question (`row`: its index in the
pool, `answer`, `source`: the client it came from), so `flwr_datasets.partitioner` applies as it is:

- `iid`: `IidPartitioner` over the pool shuffled with the seed (equal shares);
- `dirichlet`: `DirichletPartitioner` by answer with concentration `alpha` (small alpha: skewed label mixes);
- `pathological`: `PathologicalPartitioner` by answer, `classes` answers per client.

(`natural`, the benchmark's own clients, one per source, takes none of this.)

Each partition is then shuffled and split into train/val/test in the proportions of the benchmark's sizes
(train-per-client : val-per-client : test-per-client), each split at least one record. All partition clients
share one label space, the pool's training answers (docs/clients.md says why). Images keep their source's style,
so every client sees the pool's mix of styles (and of the sources' dialects). The assignment is a function of
the seed and is cached next to the benchmark's records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from feddat.data.pool import Records
from feddat.errors import FedDATError
from feddat.seeding import mix_seed

log = logging.getLogger(__name__)

PARTITIONS = ("natural", "iid", "dirichlet", "pathological")
SPLITS = ("train", "val", "test")
PARTITION_CACHE_VERSION = 1
MIN_RECORDS = len(SPLITS)  # one record per split at least


@dataclass(frozen=True)
class Partition:
    kind: str            # iid, dirichlet or pathological
    num_clients: int
    alpha: float = 0.5   # dirichlet
    classes: int = 2     # pathological


def partition_client_names(n: int) -> list[str]:
    """The names of a partitioned benchmark's clients: part-0 ... part-(n-1), zero-padded to one width."""
    width = len(str(max(n - 1, 0)))
    return [f"part-{i:0{width}d}" for i in range(n)]


def pool_records(per_client: dict[str, dict[str, Records]]) -> tuple[Records, list[str]]:
    """Every record of every client and split in one Records (client order, then train, val, test), and the
    source client of each record."""
    parts = [(name, splits[s]) for name, splits in per_client.items() for s in SPLITS]
    offsets = np.cumsum([0] + [len(r.images) for _, r in parts])
    pooled = Records(
        np.concatenate([r.images for _, r in parts]),
        np.concatenate([r.patch_colors for _, r in parts]),
        np.concatenate([r.patch_shapes for _, r in parts]),
        np.concatenate([r.image_index + off for (_, r), off in zip(parts, offsets)]).astype(np.int64),
        *([x for _, r in parts for x in getattr(r, field)]
          for field in ("questions", "answers", "qtypes", "shifted", "synonym")),
        annotator_answers=[x for _, r in parts for x in r.annotator_answers]
        if all(r.annotator_answers for _, r in parts) else None,
        ids=[x for _, r in parts for x in r.ids] if all(r.ids for _, r in parts) else [])
    sources = [name for name, r in parts for _ in range(len(r))]
    return pooled, sources


def pool_dataset(answers: list[str], sources: list[str]):
    """The pool as a `datasets.Dataset`: columns row, answer, source (the items themselves stay where they are)."""
    import datasets

    return datasets.Dataset.from_dict({"row": np.arange(len(answers), dtype=np.int64), "answer": list(answers),
                                       "source": list(sources)})


def _partitioner(part: Partition, seed: int, n_answers: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if part.kind == "iid":
        return IidPartitioner(num_partitions=part.num_clients)
    if part.kind == "dirichlet":
        return DirichletPartitioner(num_partitions=part.num_clients, partition_by="answer", alpha=part.alpha,
                                    min_partition_size=MIN_RECORDS, self_balancing=False, shuffle=True, seed=seed)
    if part.kind == "pathological":
        if part.classes > n_answers:
            raise FedDATError(f"partition-classes={part.classes} exceeds the pool's {n_answers} distinct answers")
        return PathologicalPartitioner(num_partitions=part.num_clients, partition_by="answer",
                                       num_classes_per_partition=part.classes,
                                       class_assignment_mode="first-deterministic",
                                       shuffle=True, seed=seed)
    raise FedDATError(f"unknown partition {part.kind!r}; choose one of {', '.join(PARTITIONS)}")


def partition_indices(dataset, part: Partition, seed: int) -> list[np.ndarray]:
    """Each client's rows of the pool (`dataset`, from `pool_dataset`), by the partitioner of `part`."""
    seed32 = seed % (1 << 32)
    if part.kind == "iid":  # IidPartitioner shards in order: shuffle first
        dataset = dataset.shuffle(seed=seed32)
    if part.num_clients > len(dataset):
        raise FedDATError(f"num-clients={part.num_clients} exceeds the pool's {len(dataset)} records")
    partitioner = _partitioner(part, seed32, len(set(dataset["answer"])))
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # its notes on resampling and unused classes; the outcome is checked here
            warnings.simplefilter("ignore", UserWarning)
            return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                    for i in range(part.num_clients)]
    except ValueError as e:  # the partitioner could not meet its constraints (e.g. a minimum size)
        raise FedDATError(f"partition {part.kind} of {len(dataset)} records over {part.num_clients} clients failed: "
                          f"{e}; use fewer clients, more data per client or (dirichlet) a larger alpha") from e


def split_sizes(m: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) counts of a partition of `m` records: val and test rounded from their fractions, each
    split at least one record, train the rest."""
    val = max(1, int(round(m * fractions[1])))
    test = max(1, int(round(m * fractions[2])))
    return m - val - test, val, test


def subset(rec: Records, idx: np.ndarray) -> Records:
    """The records at `idx` (in that order), with only the images they ask about."""
    images = np.unique(rec.image_index[idx])
    return Records(rec.images[images], rec.patch_colors[images], rec.patch_shapes[images],
                   np.searchsorted(images, rec.image_index[idx]).astype(np.int64),
                   *([getattr(rec, f)[i] for i in idx.tolist()]
                     for f in ("questions", "answers", "qtypes", "shifted", "synonym")),
                   annotator_answers=[rec.annotator_answers[i] for i in idx.tolist()] if rec.annotator_answers else None,
                   ids=[rec.ids[i] for i in idx.tolist()] if rec.ids else [])


def _cache_path(cache_dir: Path | None, key: dict) -> Path | None:
    if cache_dir is None:
        return None
    blob = json.dumps({"v": PARTITION_CACHE_VERSION, **key}, sort_keys=True)
    return Path(cache_dir) / f"partition-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def assign_rows(answers: list[str], sources: list[str], part: Partition, seed: int, fractions,
                path: Path | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each client's (train, val, test) rows of a pool whose items have these `answers` (and came from these
    `sources`); read from `path` when cached there."""
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                rows, bounds = z["rows"], z["bounds"]
            if bounds.shape != (part.num_clients, 4) or bounds[-1, -1] != len(rows):
                raise ValueError("wrong shape")
            return [tuple(rows[b[j]:b[j + 1]] for j in range(3)) for b in bounds]
        except Exception as e:  # any damage: say which file and how to fix it
            raise FedDATError(f"partition cache file {path} is unreadable ({type(e).__name__}: {e}); delete it and "
                              "it will be regenerated") from e
    per_client = partition_indices(pool_dataset(answers, sources), part, mix_seed(seed, 0x9A27))
    out, bounds, start = [], [], 0
    for i, idx in enumerate(per_client):
        if len(idx) < MIN_RECORDS:
            raise FedDATError(f"partition {part.kind} gives client {partition_client_names(part.num_clients)[i]} "
                              f"{len(idx)} record(s), fewer than one per split: use fewer clients or more data per "
                              "client (train/val/test-per-client)")
        idx = np.random.default_rng(mix_seed(seed, i, 0x5B17)).permutation(idx)
        n_train, n_val, _ = split_sizes(len(idx), fractions)
        out.append((idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]))
        bounds.append([start, start + n_train, start + n_train + n_val, start + len(idx)])
        start += len(idx)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, rows=np.concatenate([np.concatenate(t) for t in out]), bounds=np.asarray(bounds))
        tmp.replace(path)
    return out


def partition_records(per_client: dict[str, dict[str, Records]], part: Partition, seed: int, sizes,
                      cache_dir: Path | None = None, cache_key: str = "") -> dict[str, dict[str, Records]]:
    """The benchmark's records (`per_client`, {client: {split: Records}}) pooled and split over
    `part.num_clients` clients: {part-i: {split: Records}}. `cache_key` names the pool (its benchmark cache key)."""
    pooled, sources = pool_records(per_client)
    total = sizes.train + sizes.val + sizes.test
    fractions = (sizes.train / total, sizes.val / total, sizes.test / total)
    path = _cache_path(cache_dir, {"pool": cache_key, "n": len(pooled), "partition": asdict(part), "seed": seed,
                                   "fractions": fractions}) if cache_key else None
    assigned = assign_rows(pooled.answers, sources, part, seed, fractions, path)
    warn_left_out(part, len(pooled), assigned)
    names = partition_client_names(part.num_clients)
    return {name: {s: subset(pooled, rows) for s, rows in zip(SPLITS, splits)} for name, splits in zip(names, assigned)}


def warn_left_out(part: Partition, pooled: int, assigned) -> None:
    left_out = pooled - sum(len(rows) for splits in assigned for rows in splits)
    if left_out:
        log.warning("partition %s over %d clients leaves out %d of the pool's %d records (answers no client draws)",
                    part.kind, part.num_clients, left_out, pooled)


def shared_answers(per_client: dict[str, dict[str, Records]]) -> list[str]:
    """The label space of every client of a partitioned benchmark: the answers of all their training records."""
    return sorted({a for splits in per_client.values() for a in splits["train"].answers})
