"""Federated benchmarks over the generated world: which clients exist and what data each holds.

A benchmark is a list of client specs; `client_records` generates (or reads from the cache) every client's
train/val/test records deterministically from a seed, or reads the paper's datasets (feddat.data.real). Runs
read them as client folders (feddat.data.clients).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from feddat.data.function import function_clients
from feddat.data.partition import partition_records
from feddat.data.pool import ENTAILMENT_LABELS, PAIR_LABELS, HeadSpec, Records, generate, pixel_tensor, tokenize
from feddat.data.questions import QTYPES
from feddat.data.real import load_real_benchmark
from feddat.data.scene import scene_clients
from feddat.data.sizes import Sizes
from feddat.data.task import task_clients
from feddat.data.world import COLORS, SHAPES
from feddat.errors import FedDATError

CACHE_VERSION = 6


@dataclass(frozen=True)
class ClientSpec:
    name: str
    styles: tuple[str, ...]
    qtype_weights: dict[str, float]
    dialect: dict[str, str] = field(default_factory=dict)
    prior_alpha: float = 2.0  # Dirichlet concentration of this client's colour and shape priors
    synonym_p: float = 0.0    # chance that a colour or shape word is said with a word unseen in pretraining
    train_synonyms: tuple[str, ...] | None = None  # the new words this client's own train/val data use
    test_synonyms: tuple[str, ...] | None = None   # the new words its test data use (None: all of SYNONYMS)


def _swap(a: str, b: str) -> dict[str, str]:
    return {a: b, b: a}


SHARED_WORDS = ("crimson", "navy", "ball", "box")


def domain_clients(shared_skill: bool = True, conflicting_shifts: bool = True) -> list[ClientSpec]:
    """Five clients, one image domain each, with their own question mix and word meanings.

    - shared skill: four words absent from pretraining (synonyms of red, blue, circle and square). Every
      client's test questions use all four; its own training data use only two of them (each word appears in
      two or three clients' training data), so only the federation has seen every word;
    - conflicting shifts: each client's own word meanings (dialect, a swap of two words) that contradict
      other clients' (two clients swap red with different colours, two swap circle with different shapes).
    The two switches exist to ablate the benchmark itself.
    """
    synonym_p = 0.6 if shared_skill else 0.0
    mixes = [
        {"color": 0.25, "shape": 0.2, "exist": 0.3, "where": 0.15, "size": 0.1},
        {"color": 0.15, "shape": 0.3, "exist": 0.2, "where": 0.15, "size": 0.2},
        {"color": 0.2, "shape": 0.15, "exist": 0.35, "where": 0.2, "size": 0.1},
        {"color": 0.15, "shape": 0.15, "exist": 0.3, "where": 0.25, "size": 0.15},
        {"color": 0.2, "shape": 0.2, "exist": 0.2, "where": 0.1, "size": 0.3},
    ]
    dialects = [
        _swap("red", "blue"),
        _swap("red", "green"),
        _swap("circle", "square"),
        _swap("circle", "triangle"),
        _swap("blue", "green"),
    ]
    names = ["clipart", "textured", "night", "sketch", "blurry"]
    words = SHARED_WORDS
    clients = []
    for i, (name, mix, dialect) in enumerate(zip(names, mixes, dialects)):
        seen = (words[i % len(words)], words[(i + 1) % len(words)])
        clients.append(ClientSpec(name=name, styles=(name,), qtype_weights=dict(mix), synonym_p=synonym_p,
                                  train_synonyms=seen, test_synonyms=words,
                                  dialect=dialect if conflicting_shifts else {}))
    return clients


BENCHMARKS = {
    "domain": lambda: domain_clients(),
    "domain-noskill": lambda: domain_clients(shared_skill=False),
    "domain-noshift": lambda: domain_clients(conflicting_shifts=False),
    "function": function_clients,  # one question function per client (src/feddat/data/function.py)
    "scene": scene_clients,        # one scene type per client (src/feddat/data/scene.py)
    "task": task_clients,          # one vision-language task per client (src/feddat/data/task.py)
}


@dataclass(frozen=True)
class RealData:
    """Where a benchmark's real datasets are (feddat.data.real) and how to read them."""

    data_dir: str
    image_size: int               # the backbone's image side
    skip_bad: bool = False
    progress: bool = True


@dataclass
class Split:
    """One split of one client, as tensors ready for a backbone."""

    input_ids: torch.Tensor      # (n, L); multiple choice: (n, k, L), the question with each candidate
    attention_mask: torch.Tensor
    pixels: torch.Tensor         # (n_images, 3, H, W), one per image
    image_index: torch.Tensor    # (n,) which image each question is about
    labels: torch.Tensor         # (n,) index into the client's answer list; VQA with annotators: (n, answers)
                                 # soft scores (float); multiple choice: the right candidate's position
    qtypes: np.ndarray
    questions: list[str]
    shifted: np.ndarray          # bool: the question uses a word this client gives another meaning
    synonym: np.ndarray          # bool: the question uses a word absent from pretraining
    image_index2: torch.Tensor | None = None  # image pairs: each statement's second image
    candidates: list[list[str]] | None = None  # multiple choice: each question's candidate answers

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, device="cpu", pixels: bool = True) -> dict:
        """The items `idx` as model inputs. Without `pixels` (their frozen prefix is cached: PrefixCache) the images
        are left out, and an image-pair split says so with "pairs"."""
        out = self.text_batch(idx, device)
        if not pixels:
            if self.image_index2 is not None:
                out["pairs"] = True
            return out
        px = self.pixels[self.image_index[idx]]
        if self.image_index2 is not None:  # (B, 2, 3, H, W)
            px = torch.stack([px, self.pixels[self.image_index2[idx]]], dim=1)
        out["pixel_values"] = px.to(device)
        return out

    def text_batch(self, idx: torch.Tensor, device="cpu") -> dict:
        """A batch's text and labels (no images)."""
        return {"input_ids": self.input_ids[idx].to(device), "attention_mask": self.attention_mask[idx].to(device),
                "labels": self.labels[idx].to(device)}


@dataclass
class ClientData:
    name: str
    answers: list[str]           # the label space (multiple choice: the candidates' positions)
    train: Split
    val: Split
    test: Split
    task: str = "vqa"            # feddat.data.pool.TASKS

    @property
    def head_spec(self) -> HeadSpec:
        return HeadSpec(self.task, len(self.answers))

    @property
    def metric(self) -> str:
        """How its items are scored: the VQA soft score where annotators' answers exist, else accuracy."""
        return "vqa-score" if self.train.labels.is_floating_point() else "accuracy"

    def describe(self) -> dict[str, str]:
        return {"task": self.task, "metric": self.metric}


# A benchmark's per-client split sizes when a run leaves them at 0. Task's items cost two backbone passes on
# average (an image pair two, a four-way choice four), so its clients get half the items: the same compute per
# client as the other benchmarks' (docs/benchmarks.md, "Sizes").
BENCHMARK_SIZES = {"task": Sizes(200, 100, 500)}


def default_sizes(benchmark: str) -> Sizes:
    """The split sizes per client that `benchmark` uses by default."""
    return BENCHMARK_SIZES.get(benchmark, Sizes())


def sizes_help() -> str:
    """What a size of 0 means, for command-line help: '400/200/1000 per client, task's 200/100/500'."""
    fmt = lambda z: f"{z.train}/{z.val}/{z.test}"
    return f"{fmt(Sizes())} per client" + "".join(f", {b}'s {fmt(z)}" for b, z in BENCHMARK_SIZES.items())


def resolve_sizes(benchmark: str, train: int, val: int, test: int) -> Sizes:
    """The sizes given, with each 0 replaced by the benchmark's default (`default_sizes`)."""
    d = default_sizes(benchmark)
    return Sizes(*(d_v if v == 0 and not isinstance(v, bool) else v
                   for v, d_v in ((train, d.train), (val, d.val), (test, d.test))))


def _client_records(spec, seed: int, index: int, sizes: Sizes) -> dict[str, Records]:
    if not isinstance(spec, ClientSpec):  # the Function and Scene benchmarks' specs generate their own records
        return spec.records(seed, index, sizes)
    rng = np.random.default_rng([seed, index])
    color_p = rng.dirichlet(np.full(len(COLORS), spec.prior_alpha))
    shape_p = rng.dirichlet(np.full(len(SHAPES), spec.prior_alpha))
    qtypes = [q for q in QTYPES if spec.qtype_weights.get(q, 0) > 0]
    w = np.asarray([spec.qtype_weights[q] for q in qtypes], dtype=float)
    out = {}
    for split in ("train", "val", "test"):
        allowed = spec.test_synonyms if split == "test" else spec.train_synonyms
        out[split] = generate(rng, getattr(sizes, split), list(spec.styles), qtypes, w / w.sum(),
                              color_p=color_p, shape_p=shape_p, dialect=spec.dialect, synonym_p=spec.synonym_p,
                              synonyms=allowed)
    return out


def _cache_key(benchmark: str, specs: list[ClientSpec], seed: int, sizes: Sizes) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "b": benchmark, "specs": [asdict(s) for s in specs], "seed": seed,
                       "sizes": asdict(sizes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_records(path: Path, recs: dict[str, Records]) -> None:
    arrays = {}
    meta = {}
    for split, r in recs.items():
        arrays[f"{split}_images"] = r.images
        arrays[f"{split}_image_index"] = r.image_index
        meta[split] = {"questions": r.questions, "answers": r.answers, "qtypes": r.qtypes, "shifted": r.shifted,
                       "synonym": r.synonym, "task": r.task, "candidates": r.candidates,
                       "annotator_answers": r.annotator_answers, "ids": r.ids}
        if r.image_index2 is not None:
            arrays[f"{split}_image_index2"] = r.image_index2
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # one name per process: concurrent fillers do not collide
    np.savez_compressed(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    tmp.replace(path)


def _load_records(path: Path) -> dict[str, Records]:
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            out = {}
            for split, m in meta.items():
                images = z[f"{split}_images"]
                empty = np.zeros((len(images), 16), dtype=np.int64)
                index2 = z[f"{split}_image_index2"] if f"{split}_image_index2" in z.files else None
                out[split] = Records(images, empty, empty, z[f"{split}_image_index"], m["questions"], m["answers"],
                                     m["qtypes"], m["shifted"], m["synonym"], m.get("task", "vqa"), index2,
                                     m.get("candidates"), m.get("annotator_answers"), m.get("ids", []))
            return out
    except Exception as e:  # any damage to the file: say which file and how to fix it
        raise FedDATError(f"benchmark cache file {path} is unreadable ({type(e).__name__}: {e}); delete it and it "
                          "will be regenerated") from e


def client_records(benchmark: str, seed: int, sizes: Sizes, cache_dir: Path | None = None,
                   partition=None, real: "RealData | None" = None) -> dict[str, dict]:
    """Raw records of every client, {client: {split: Records}}, generated once per (spec, seed, sizes), or read
    from the real datasets (`real`); with a `partition` (feddat.data.partition.Partition) the pooled records
    split over its clients instead."""
    if real is not None:
        recs = load_real_benchmark(benchmark, Path(real.data_dir), seed, sizes, real.image_size, real.skip_bad,
                                   progress=real.progress)
    else:
        recs = _natural_records(benchmark, seed, sizes, cache_dir)
    if partition is None:
        return recs
    tasks = {r.task for splits in recs.values() for r in splits.values()}
    if tasks != {"vqa"}:
        raise FedDATError(f"benchmark {benchmark} cannot be partitioned: its clients' records are not all VQA "
                          f"({', '.join(sorted(tasks))}); use --partition natural")
    key = _cache_key(benchmark, BENCHMARKS[benchmark](), seed, sizes) if real is None else ""  # real: not cached
    return partition_records(recs, partition, seed, sizes, cache_dir, key)


def _natural_records(benchmark: str, seed: int, sizes: Sizes, cache_dir: Path | None) -> dict[str, dict]:
    if benchmark not in BENCHMARKS:
        raise FedDATError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    sizes.validate()
    specs = BENCHMARKS[benchmark]()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{benchmark}-{_cache_key(benchmark, specs, seed, sizes)}.npz"
        if path.exists():
            stored = _load_records(path)
            return _split_by_client(stored, specs)
    per_client = {s.name: _client_records(s, seed, i, sizes) for i, s in enumerate(specs)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_records(path, _merge_clients(per_client))
    return per_client


def _merge_clients(per_client: dict[str, dict[str, Records]]) -> dict[str, Records]:
    merged = {}
    for client, splits in per_client.items():
        for split, r in splits.items():
            merged[f"{client}/{split}"] = r
    return merged


def _split_by_client(stored: dict[str, Records], specs: list[ClientSpec]) -> dict[str, dict]:
    out = {s.name: {} for s in specs}
    for key, r in stored.items():
        client, split = key.rsplit("/", 1)
        if client not in out:
            raise FedDATError(f"benchmark cache names an unknown client {client!r}; delete the cache file")
        out[client][split] = r
    return out


CHOICE_LABELS = ("A", "B", "C", "D", "E", "F", "G", "H")


def label_space(task: str, train: Records, shared: list[str] | None = None) -> list[str]:
    """A client's answers: its train split's (or a partition's shared ones) for VQA; the task's classes
    otherwise (multiple choice: the candidates' positions A, B, C, ...)."""
    if task == "entailment":
        return list(ENTAILMENT_LABELS)
    if task == "pair":
        return list(PAIR_LABELS)
    if task == "choice":
        k = len(train.candidates[0]) if train.candidates else 4
        return list(CHOICE_LABELS[:k])
    return shared or sorted(set(train.answers))


def soft_scores(annotators: list[str], lookup: dict[str, int]) -> torch.Tensor:
    """VQA soft targets of one question: 0.3, 0.6, 0.9, 1.0 for an answer 1, 2, 3, >= 4 annotators gave."""
    row = torch.zeros(len(lookup))
    for a in set(annotators):
        if a in lookup:
            row[lookup[a]] = min(1.0, 0.3 * annotators.count(a))
    return row


def records_split(r: Records, tokenizer, text_len: int, lookup: dict[str, int]) -> Split:
    """One split's records held in memory, every image a tensor: the reference that client folders (what runs
    read, feddat.data.clients) are checked against in the tests and bench/folder_memory.py."""
    index2 = None if r.image_index2 is None else torch.as_tensor(r.image_index2)
    if r.task == "choice":
        if r.candidates is None or len(r.candidates) != len(r.questions):
            raise FedDATError("multiple-choice records need one candidate list per question")
        k = len(r.candidates[0])
        texts = [f"{q} {c}" for q, cands in zip(r.questions, r.candidates) for c in cands]
        ids, mask = tokenize(tokenizer, texts, text_len)
        ids, mask = ids.view(len(r.questions), k, -1), mask.view(len(r.questions), k, -1)
        labels = torch.tensor([cands.index(a) for a, cands in zip(r.answers, r.candidates)])
    else:
        ids, mask = tokenize(tokenizer, r.questions, text_len)
        if r.task == "vqa" and r.annotator_answers:
            labels = torch.stack([soft_scores(a, lookup) for a in r.annotator_answers]) if len(r.questions) \
                else torch.zeros(0, len(lookup))
        else:
            labels = torch.tensor([lookup.get(a, -1) for a in r.answers])
    return Split(ids, mask, pixel_tensor(r.images), torch.as_tensor(r.image_index), labels, np.asarray(r.qtypes),
                 list(r.questions), np.asarray(r.shifted, dtype=bool), np.asarray(r.synonym, dtype=bool), index2,
                 [list(c) for c in r.candidates] if r.task == "choice" else None)
