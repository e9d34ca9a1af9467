"""Use what was trained: load a saved client model, predict answers, re-score a run's clients.

    model = feddat.load_client("runs/feddat", "clipart")            # CPU; device="cuda" for a GPU
    model.predict([image], ["what color is the circle ?"], top_k=3)  # [[(answer, prob), ...]]

A saved client (`DIR/clients/<client>/`, written by `feddat run --out DIR`, see feddat.federation.export) is
rebuilt on its backbone exactly as it was scored: the same adapters, head, view and preprocessing
(`pixel_tensor`, the backbone's tokenizer at its max_position_embeddings), so predictions match the run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from feddat.errors import FedDATError
from feddat.federation.export import backbone_record, read_client, saved_clients

EMBEDDED = "embedded"


def _backbone_path(meta: dict[str, Any], model_path: str | Path | None) -> str | None:
    """The backbone to load: the argument if given, else the one client.json names (None = embedded)."""
    chosen = str(model_path) if model_path is not None else meta["backbone"]["model_path"]
    return None if chosen == EMBEDDED else chosen


def _backbone_family(meta: dict[str, Any], family: str | None) -> str:
    """The backbone family to load: the argument if given, else the one client.json records (files written
    before BLIP support record none: ViLT)."""
    return family or meta["backbone"].get("family", "vilt")


def check_backbone(meta: dict[str, Any], model_path: str | None, backbone, where: str) -> None:
    """FedDATError naming what differs between the backbone loaded and the one the client was trained on."""
    want = meta["backbone"]
    have = backbone_record(model_path, backbone)
    shown = have["model_path"]
    if want.get("family", "vilt") != have["family"]:
        raise FedDATError(f"backbone {shown} is a {have['family']} backbone but {where} was trained on a "
                          f"{want.get('family', 'vilt')} one; pass --backbone {want.get('family', 'vilt')} and its "
                          "checkpoint with --model-path")
    if want.get("sha256") and have["sha256"] and want["sha256"] != have["sha256"]:
        raise FedDATError(
            f"backbone {shown} is not the one {where} was trained on: its {have['weights_file']} has sha256 "
            f"{have['sha256'][:16]}..., client.json records {want['sha256'][:16]}... (trained on "
            f"{want['model_path']}); pass that backbone with --model-path")
    if want.get("sha256") and not have["sha256"]:
        raise FedDATError(f"cannot verify backbone {shown}: no weights file found to compare with the sha256 in "
                          f"client.json of {where}; pass the backbone's directory with --model-path")
    for key in ("hidden_size", "num_layers", "image_size", "patch_size", "text_len"):
        if key in want and want[key] != have[key]:
            raise FedDATError(f"backbone {shown} has {key}={have[key]} but {where} was trained on one with "
                              f"{key}={want[key]}; pass the backbone it was trained on with --model-path")


def to_uint8_image(image, index: int = 0) -> np.ndarray:
    """A PIL image or an HxWx3 uint8 array as an HxWx3 uint8 array."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise FedDATError(f"image {index} has shape {arr.shape}; expected HxWx3 (RGB)")
    if arr.dtype != np.uint8:
        raise FedDATError(f"image {index} is {arr.dtype}; expected uint8 pixels (0..255)")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 array; FedDATError for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FedDATError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise FedDATError(f"image {path} is unreadable ({type(e).__name__}: {e})") from e


def split_tensors(tensors: dict[str, torch.Tensor], shared: str | None,
                  prefix: str | None = None) -> tuple[dict, dict | None]:
    """Saved tensors as (client state, shared state) the way a Worker takes them; the shared tensors are those
    under `prefix` (default: the shared adapter's, `adapter.<shared>.`)."""
    if not shared:
        return dict(tensors), None
    prefix = prefix or f"adapter.{shared}."
    state = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    global_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state, global_state


class ClientModel:
    """One client's personalised model, ready for inference: `.answers`, `.predict(...)`, `.evaluate(...)`."""

    def __init__(self, worker, tokenizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
        self.worker = worker
        self.tokenizer = tokenizer
        self.meta = meta
        self.name: str = meta["client"]
        self.method: str = meta["method"]
        self.answers: list[str] = list(meta["answers"])
        self.task: str = meta["head"].get("task", "vqa")
        self.predict_view: str = meta["predict_view"]
        self.views: list[str] = list(meta["views"])
        self.newest_global = meta["eval_frozen"] == "newest"
        config = worker.model.backbone.config
        self.image_size: int = config.image_size
        self.text_len: int = config.max_position_embeddings
        self.device = worker.device
        self._check_tensors(tensors, where)
        method = worker.method
        self.state, self.global_state = split_tensors(tensors, method.shared,
                                                      method.shared_prefix if method.shared else None)
        self._load()

    def _check_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        expected = self.worker.export_shapes(self.head_spec)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise FedDATError(f"{where} does not fit a {self.method} client on this backbone: "
                              + "; ".join(p for p in (f"missing {missing[:4]}" if missing else "",
                                                      f"unexpected {extra[:4]}" if extra else "") if p))
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != tuple(shape):
                raise FedDATError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, but this backbone and "
                                  f"client.json need {tuple(shape)}: the backbone is not the one it was trained on")

    @property
    def head_spec(self):
        from feddat.data.pool import HeadSpec

        return HeadSpec(self.task, len(self.answers))

    def _load(self) -> None:
        self.head = self.worker.prepare_eval(self.state, self.global_state, self.head_spec, self.newest_global)

    def _view(self, view: str | None) -> str:
        view = self.predict_view if view is None else view
        if view not in self.views:
            raise FedDATError(f"client {self.name} ({self.method}) has no view {view!r}; choose one of "
                              f"{', '.join(self.views)}")
        return view

    def _pixels(self, images: Sequence) -> torch.Tensor:
        arrays = [to_uint8_image(img, i) for i, img in enumerate(images)]
        for i, a in enumerate(arrays):
            if a.shape[:2] != (self.image_size, self.image_size):
                raise FedDATError(f"image {i} is {a.shape[1]}x{a.shape[0]} pixels; this backbone takes "
                                  f"{self.image_size}x{self.image_size} images")
        from feddat.data.pool import pixel_tensor

        return pixel_tensor(np.stack(arrays)) if arrays else torch.zeros(0, 3, self.image_size, self.image_size)

    def _task_inputs(self, n: int, images2: Sequence | None, candidates: Sequence[Sequence[str]] | None) -> None:
        """Check that the inputs fit the client's task: a second image per statement for image pairs, the
        candidate answers per question for multiple choice, neither otherwise."""
        if self.task == "pair" and images2 is None:
            raise FedDATError(f"client {self.name} reasons over image pairs: give a second image per statement "
                              "(--image2, or \"image2\" in the input file)")
        if self.task != "pair" and images2 is not None:
            raise FedDATError(f"client {self.name} ({self.task}) takes one image per question, not a pair")
        if self.task == "choice" and candidates is None:
            raise FedDATError(f"client {self.name} answers multiple choice: give the candidate answers "
                              "(--candidates, or \"candidates\" in the input file)")
        if self.task != "choice" and candidates is not None:
            raise FedDATError(f"client {self.name} ({self.task}) does not choose among candidates")
        if images2 is not None and len(images2) != n:
            raise FedDATError(f"{n} statements but {len(images2)} second images")
        if candidates is not None:
            if len(candidates) != n:
                raise FedDATError(f"{n} questions but {len(candidates)} candidate lists")
            for i, c in enumerate(candidates):
                if isinstance(c, str) or len(c) != len(self.answers):
                    raise FedDATError(f"question {i} has {0 if isinstance(c, str) else len(c)} candidates; client "
                                      f"{self.name} chooses among {len(self.answers)}")

    @torch.no_grad()
    def logits(self, images: Sequence, questions: Sequence[str], view: str | None = None,
               batch_size: int = 256, images2: Sequence | None = None,
               candidates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """(n, answers) logits of the answer head under `view` (default: the method's predicting view); for
        image pairs `images2` holds each statement's second image, for multiple choice `candidates` each
        question's candidate answers (the logits are then over the candidates)."""
        from feddat.data.pool import tokenize
        from feddat.models.vl import pooled_features

        if isinstance(questions, str):
            raise FedDATError("questions must be a list of strings, one per image")
        if len(images) != len(questions):
            raise FedDATError(f"{len(images)} images but {len(questions)} questions; give one question per image")
        self._task_inputs(len(questions), images2, candidates)
        view = self._view(view)
        pixels = self._pixels(images)
        if images2 is not None:
            pixels = torch.stack([pixels, self._pixels(images2)], dim=1)
        if candidates is not None:
            k = len(self.answers)
            ids, mask = tokenize(self.tokenizer, [f"{q} {c}" for q, cs in zip(questions, candidates) for c in cs],
                                 self.text_len)
            ids, mask = ids.view(len(questions), k, -1), mask.view(len(questions), k, -1)
        else:
            ids, mask = tokenize(self.tokenizer, list(questions), self.text_len)
        self._load()
        self.worker.model.set_view(view)
        out = []
        for start in range(0, len(questions), batch_size):
            sl = slice(start, start + batch_size)
            batch = {"input_ids": ids[sl].to(self.device), "attention_mask": mask[sl].to(self.device),
                     "pixel_values": pixels[sl].to(self.device)}
            out.append(self.head(pooled_features(self.worker.model, batch)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.answers))

    def predict(self, images: Sequence, questions: Sequence[str], view: str | None = None,
                top_k: int = 5, images2: Sequence | None = None,
                candidates: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """The top_k answers with their probabilities (softmax over the client's label space; for multiple
        choice over the question's candidates, named by their text), per question."""
        if not isinstance(top_k, int) or top_k < 1:
            raise FedDATError(f"top-k must be a positive integer, got {top_k!r}")
        probs = torch.softmax(self.logits(images, questions, view, images2=images2, candidates=candidates), dim=-1)
        k = min(top_k, len(self.answers))
        values, indices = probs.topk(k, dim=-1)
        names = [list(c) for c in candidates] if candidates is not None else [self.answers] * len(questions)
        return [[(name[int(i)], float(p)) for p, i in zip(vs, ix)] for vs, ix, name in zip(values, indices, names)]

    def evaluate(self, data, views: Iterable[str] | None = None, split: str = "test") -> dict[str, dict]:
        """Scores on a ClientData split, as Worker.evaluate (and so the run) computes them."""
        if list(data.answers) != self.answers:
            raise FedDATError(f"the regenerated data of client {self.name} has another label space than the saved "
                              "model: the benchmark, seed or sizes differ from the run's")
        views = tuple(self._view(v) for v in views) if views is not None else (self.predict_view,)
        out = self.worker.evaluate(data, self.state, self.global_state, split, views,
                                   newest_global=self.newest_global)
        self._load()
        return out


def _local_config(meta: dict[str, Any]):
    """The local knobs client.json records (compiling pays off for training, not prediction)."""
    from dataclasses import fields

    from feddat.algorithms.base import LocalConfig

    known = {f.name for f in fields(LocalConfig)} - {"compile"}
    return LocalConfig(**{k: v for k, v in meta.get("local", {}).items() if k in known})


def _build(meta: dict[str, Any], backbone, tokenizer, device):
    from feddat.algorithms.registry import get_method
    from feddat.federation.worker import Worker

    # the method's settings shape its model (LoRA rank, prompt tokens); models saved before methods held their
    # own settings recorded them among the local knobs
    method = get_method(meta["method"], meta.get("method_config", meta.get("local")))
    if list(method.adapters) != list(meta["adapters"]["names"]):
        raise FedDATError(f"client.json names adapters {meta['adapters']['names']} but method {method.name} "
                          f"now has {list(method.adapters)}")
    return Worker(method, backbone, int(meta["adapters"]["reduction"]), _local_config(meta), device)


def load_client(run_dir: str | Path, client: str, model_path: str | Path | None = None,
                device: str | torch.device = "cpu", backbone: str | None = None) -> ClientModel:
    """A saved client's model from `run_dir` (a `feddat run --out`), on `device`.

    The backbone is `model_path` if given ("embedded" for the embedded one), else the one client.json names,
    of the family `backbone` (vilt or blip; default: the one client.json records); it must be the backbone the
    client was trained on (same family, weights checksum and shape), else FedDATError.
    """
    from feddat.models.backbone import load_backbone

    tensors, meta = read_client(Path(run_dir), client)
    where = f"client {client} of {run_dir}"
    path = _backbone_path(meta, model_path)
    model, tokenizer = load_backbone(path, device, _backbone_family(meta, backbone))
    check_backbone(meta, path, model, where)
    return ClientModel(_build(meta, model, tokenizer, device), tokenizer, meta, tensors, where)


def _check_clients(wanted: Sequence[str], there: Sequence[str], benchmark: str, data_dir: str | None) -> None:
    missing = [n for n in wanted if n not in there]
    if missing:
        raise FedDATError(f"{benchmark}{f' in {data_dir}' if data_dir else ''} has no client {', '.join(missing)} "
                          f"(its clients: {', '.join(there)}); pick one with --client")


def evaluate_run(run_dir: str | Path, clients: Sequence[str] | None = None, model_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = False,
                 family: str | None = None, data_dir: str | Path | None = None, benchmark: str | None = None,
                 skip_bad: bool = False) -> dict:
    """Re-score a run's saved clients on their own test split, regenerated (or, for a run on real data, read
    again) from the run's config (benchmark, seed, sizes). With `benchmark` and/or `data_dir`, score them on
    that benchmark's test split instead (the real datasets in `data_dir`, or the generated benchmark): each saved
    client on the client of the same name, in its own label space (other answers count as wrong). Returns a
    results-like dict (config, clients, label_spaces, tasks, final, wall_seconds, run_dir, data)."""
    from feddat.algorithms.registry import get_method
    from feddat.config import RunConfig
    from feddat.data.benchmarks import RealData
    from feddat.data.clients import load_benchmark
    from feddat.eval.results import History
    from feddat.federation.inprocess import default_cache_dir
    from feddat.federation.rounds import finish_history, reported_views
    from feddat.models.backbone import load_backbone

    t_start = time.time()
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text())
        cfg = RunConfig.from_dict(results["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise FedDATError(f"{results_path} is missing or unreadable ({e}); pass the --out of a `feddat run`") from e
    names = list(clients) if clients else list(results["clients"])
    unknown = [n for n in names if n not in results["clients"]]
    if unknown:
        raise FedDATError(f"the run has no client {unknown[0]!r}; its clients: {', '.join(results['clients'])}")
    saved = {n: read_client(run_dir, n) for n in names}
    first_meta = saved[names[0]][1]
    path = _backbone_path(first_meta, model_path)
    backbone, tokenizer = load_backbone(path, device, _backbone_family(first_meta, family))
    cache = Path(cache_dir) if cache_dir else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    other = benchmark is not None or data_dir is not None
    where_data = str(data_dir or cfg.data_dir or "") or None
    bench = benchmark or cfg.benchmark
    if other:
        from dataclasses import replace as _replace

        try:  # the same checks as a run's (benchmark, real-data form, directory)
            there = _replace(cfg, benchmark=bench, data_dir=where_data, partition="natural", clients=0).validate()
        except FedDATError as e:
            raise FedDATError(f"cannot score on {bench}{f' in {where_data}' if where_data else ''}: {e}") from None
        _check_clients(names, there.client_names(), bench, where_data)  # before reading any data
    real = RealData(where_data, int(backbone.config.image_size), skip_bad or cfg.skip_bad_records,
                    progress) if where_data else None
    if cfg.own_data and not other:  # the run's own client folders, read again (the same seed splits them alike)
        from dataclasses import replace as _replace

        from feddat.federation.inprocess import load_own_data

        loaded = [c for c in load_own_data(_replace(cfg, skip_bad_records=skip_bad or cfg.skip_bad_records), tokenizer,
                                           backbone.config.max_position_embeddings, int(backbone.config.image_size),
                                           cache / "datasets") if c.name in names]
    else:
        loaded = load_benchmark(bench, cfg.seed, cfg.sizes, tokenizer, backbone.config.max_position_embeddings,
                                cache, partition=None if other else cfg.partition_spec, real=real,
                                label_spaces={n: saved[n][1]["answers"] for n in names} if other else None)
    data = {c.name: c for c in loaded}
    _check_clients(names, list(data), bench, where_data)
    worker = _build(first_meta, backbone, tokenizer, device)
    method = get_method(cfg.method, cfg.to_dict())
    views = reported_views(method)
    evals = {}
    from tqdm import tqdm

    for name in tqdm(names, desc="eval", unit="client", disable=not progress):
        tensors, meta = saved[name]
        where = f"client {name} of {run_dir}"
        if meta["method"] != cfg.method:
            raise FedDATError(f"{where} was saved by method {meta['method']}, results.json says {cfg.method}")
        check_backbone(meta, path, backbone, where)
        model = ClientModel(worker, tokenizer, meta, tensors, where)
        evals[name] = model.evaluate(data[name], views)
    history = History(results["config"], names, {n: saved[n][1]["answers"] for n in names},
                      {n: data[n].describe() for n in names})
    finish_history(history, method, evals, time.time() - t_start)
    out = dict(history.data)
    out.pop("rounds")
    out["run_dir"] = str(run_dir)
    out["data"] = {"benchmark": bench, "data_dir": where_data, "seed": cfg.seed, "split": "test"}
    return out


def evaluate_file(run_dir: str | Path, client: str, records: Sequence[dict], base: Path,
                  model_path: str | Path | None = None, view: str | None = None, device: str = "cpu",
                  batch_size: int = 64, progress: bool = False, family: str | None = None) -> dict:
    """Score one saved client on labelled records ({"image": path, "question": ..., "answer": ...}, plus "image2"
    for an image-pair client and "candidates" for a multiple-choice one; image paths relative to `base`). An answer outside the client's label space counts as wrong and is counted apart.
    Returns a results-like dict: final.clients {client: accuracy}, final.avg_score, n, unknown_answers, view."""
    from tqdm import tqdm

    t_start = time.time()
    model = load_client(run_dir, client, model_path, device, family)
    view = model._view(view)
    known = set(model.answers)
    correct = unknown = 0
    with tqdm(total=len(records), desc=f"eval {client}", unit="question", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            read = lambda p: read_image(base / p if not Path(p).is_absolute() else p)
            images = [read(r["image"]) for r in chunk]
            images2 = [read(r["image2"]) for r in chunk] if model.task == "pair" else None
            candidates = [r["candidates"] for r in chunk] if model.task == "choice" else None
            logits = model.logits(images, [r["question"] for r in chunk], view, images2=images2,
                                  candidates=candidates)
            for i, (rec, row) in enumerate(zip(chunk, logits)):
                names = candidates[i] if candidates is not None else model.answers
                unknown += rec["answer"] not in (names if candidates is not None else known)
                correct += names[int(row.argmax())] == rec["answer"]
            bar.update(len(chunk))
    score = correct / len(records) if records else float("nan")
    se = (score * (1 - score) / len(records)) ** 0.5 if records else float("nan")
    return {"run_dir": str(run_dir), "clients": [client], "view": view, "n": len(records),
            "unknown_answers": unknown, "wall_seconds": time.time() - t_start,
            "final": {"clients": {client: score}, "avg_score": score, "avg_score_se": se}}


__all__ = ["ClientModel", "load_client", "evaluate_run", "evaluate_file", "read_image", "saved_clients"]
