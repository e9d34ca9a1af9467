"""Every party trains on its own data: one client = one folder in the Hugging Face `datasets` ImageFolder layout.

The format (docs in this docstring; `export_client` writes it)::

    clinic-a/
      client.json                  optional: {"task": "vqa"}   (vqa | entailment | pair | choice)
      train/
        metadata.jsonl             one JSON object per item (or metadata.csv, or metadata.parquet)
        000000.png
        ...
      validation/                  optional (also: val/, valid/, dev/): else held out of train by seed
        metadata.jsonl ...
      test/
        metadata.jsonl ...

  A folder without split folders (metadata.jsonl beside the images) is split by seed, by image (an image's
  questions stay together): 70% of the images train, 10% validation, 20% test (`SEED_SPLIT`). With train/ and
  test/ but no validation/, validation is 1/8 of train's images (the same 70/10 ratio), held out by seed.

  Columns (`file_name` paths are relative to the metadata file's folder, as ImageFolder has them):

    every task   file_name, question, answer
    vqa          answers (optional): the annotators' answers, a list; turned into VQA soft scores (0.3 per
                 annotator, at most 1). Answers compare case- and space-insensitively, as the VQA evaluation does.
    entailment   question is the hypothesis; answer one of entailment / neutral / contradiction
    pair         file_name_2: the second image; question is the statement; answer true / false
    choice       candidates: a list of candidate answers (the same number for every item, at most 8);
                 answer: the right candidate's text
    optional     qtype (question type, for per-type scores), shifted, synonym (true/false: the generated
                 benchmarks' diagnostics), id (a record id, used in error messages), task (must be one value)

  In metadata.csv, list columns hold JSON lists: `"[""yes"", ""no""]"`.

  One task per client: `client.json`'s "task", else the `task` column, else inferred from the columns
  (file_name_2: pair; candidates: choice; every training answer one of the entailment labels: entailment;
  otherwise vqa). client.json may also carry "columns", a mapping as the `columns` argument, and (VQA)
  "answers", the client's label space as a list (default: its training answers; answers outside it count as
  wrong), which is how a partitioned benchmark's clients share one.

Any dataset `datasets` can load works too: a `save_to_disk` folder (Dataset or DatasetDict, `load_from_disk`),
a folder of parquet files or one parquet file, with a column mapping from this format's names to the dataset's,
e.g. `columns={"image": "img", "question": "q", "answer": "label"}` (`parse_columns("image=img,q...")`). The
image column may hold `datasets.Image` values (embedded bytes or paths) or paths relative to the dataset.

Everything is read through `datasets` (Arrow, memory-mapped; its cache in `cache_dir`, default the HF cache);
images stay on disk and are decoded per batch (`feddat.data.lazy.LazySplit`), resized to the backbone's side as
`feddat.data.real` does. A client's label space is built from its own training split (`label_space`).

Bad data raises one-line `FedDATError`s naming the file (and row) and the fix: no metadata, a missing or
mistyped column, an empty split (an error: every split must hold at least one item, since training, model
selection and scoring each need theirs), mixed tasks, a bad value in a row, an image that does not decode
(with `skip_bad=True`: such rows are skipped, counted in `FolderClient.report` and logged). A test (or
validation) answer outside the training label space is not an error: label -1 (no soft score), counted as
wrong, and counted in the report. Fewer than `MIN_TRAIN` training items gives a warning.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from feddat.data.benchmarks import CHOICE_LABELS, ClientData, label_space, soft_scores
from feddat.data.lazy import DEFAULT_CACHE_MB, IMAGE_ERRORS, ImageTable, LazyPixels, LazySplit, check_image
from feddat.data.pool import ENTAILMENT_LABELS, PAIR_LABELS, TASKS, Records, tokenize
from feddat.errors import FedDATError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SEED_SPLIT = (0.7, 0.1, 0.2)      # an unsplit folder: train / validation / test shares of its images
VAL_FROM_TRAIN = 1 / 8            # train/ and test/ only: validation's share of train's images
MIN_TRAIN = 20                    # fewer training items than this: a warning
CLIENT_FILE = "client.json"

# This format's column names (the keys of a column mapping) and what the columns of a source default to.
COLUMNS = ("image", "image_2", "question", "answer", "answers", "candidates", "qtype", "shifted", "synonym", "id",
           "task")
ALIASES = {"file_name": "image", "file_name_2": "image_2"}
DEFAULT_SOURCES = {"image": ("file_name", "image"), "image_2": ("file_name_2", "image_2_file_name", "image_2")}
NAMES = {"image": "file_name", "image_2": "file_name_2"}   # how errors call the image columns
REQUIRED = {"vqa": ("image", "question", "answer"), "entailment": ("image", "question", "answer"),
            "pair": ("image", "image_2", "question", "answer"), "choice": ("image", "question", "answer", "candidates")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- the report of one loaded client ----------------------------------------------------------------------

@dataclass
class FolderReport:
    """What loading a client folder found: where its task came from, items per split, what was skipped
    (skip_bad) and how many validation/test answers fall outside the training label space."""

    path: str
    task: str = ""
    task_from: str = ""                                 # client.json | task column | inferred from the columns
    items: dict[str, int] = field(default_factory=dict)
    split_by_seed: str = ""                             # "" | "all" | "validation"
    skipped: dict[str, int] = field(default_factory=dict)       # rows skipped per split (skip_bad)
    bad_images: int = 0                                 # distinct images that did not decode (skip_bad)
    first_problem: str = ""                             # the first skipped row's problem
    unknown_answers: dict[str, int] = field(default_factory=dict)  # per split: answers outside the label space
    answers_from: str = "train"                         # the label space: train | client.json | given
    fixed_answers: list[str] | None = None              # client.json's label space

    def summary(self) -> str:
        parts = [f"{self.path}: {self.task} ({self.task_from})",
                 ", ".join(f"{s} {n}" for s, n in self.items.items())]
        if self.split_by_seed:
            parts.append(f"split by seed: {self.split_by_seed}")
        if sum(self.skipped.values()):
            parts.append(f"skipped {sum(self.skipped.values())} bad rows ({self.bad_images} bad images)")
        if sum(self.unknown_answers.values()):
            parts.append("answers outside the label space: "
                         + ", ".join(f"{s} {n}" for s, n in self.unknown_answers.items() if n))
        return "; ".join(parts)


@dataclass
class FolderClient(ClientData):
    """A client read from a folder: `ClientData` (splits are `LazySplit`s) plus what loading it found."""

    report: FolderReport | None = None


# --- reading a source -------------------------------------------------------------------------------------

@dataclass
class _Source:
    """One split as read by `datasets`, before any checking."""

    split: str
    dataset: object              # datasets.Dataset
    file: str                    # how messages name it: the metadata file, or the dataset and split
    base_dir: Path               # what relative image paths are relative to


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _has_rows(path: Path) -> bool:
    """A metadata file with at least one data row (CSV: beside its header)."""
    if path.suffix == ".parquet":
        return True  # parquet knows its row count; an empty one gives an empty split
    wanted = 2 if path.suffix == ".csv" else 1
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                seen += 1
                if seen >= wanted:
                    return True
    return False


def _empty_split_error(client: str, split: str, where: str, fix: str) -> FedDATError:
    return FedDATError(f"client {client}: the {split} split ({where}) has no items; {fix}")


def _load_files(kind: str, files, cache_dir):
    """A `datasets.Dataset` (Arrow, memory-mapped in the cache) from json/csv/parquet files, through the
    packaged builders directly: `load_dataset` would also ping the Hub to count a download."""
    from datasets import Dataset

    reader = {"json": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet}[kind]
    with _quiet_datasets():
        return reader(files if isinstance(files, str) else [str(f) for f in files],
                      cache_dir=None if cache_dir is None else str(cache_dir))


def _read_metadata(path: Path, split: str, client: str, cache_dir) -> _Source:
    if not _has_rows(path):
        raise _empty_split_error(client, split, str(path),
                                 "add rows to it, or remove the split folders to have the client split by seed "
                                 f"{'/'.join(str(round(100 * s)) for s in SEED_SPLIT)}")
    kind = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        ds = _load_files(kind, str(path), cache_dir)
    except Exception as e:  # datasets raises many types; the message is what helps
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = ("every line must be one JSON object with the same type per key" if kind == "json"
                else "a header line, then one row per item" if kind == "csv" else "a parquet table")
        raise FedDATError(f"{path} cannot be read ({type(e).__name__}: {first[:200]}); {hint}") from e
    return _Source(split, ds, str(path), path.parent)


def _metadata_in(folder: Path) -> Path | None:
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if len(found) > 1:
        raise FedDATError(f"{folder} has {' and '.join(p.name for p in found)}; keep one metadata file per folder")
    return found[0] if found else None


def _split_dirs(path: Path) -> dict[str, Path]:
    out = {}
    for split, names in SPLIT_DIRS.items():
        hits = [path / n for n in names if (path / n).is_dir()]
        if len(hits) > 1:
            raise FedDATError(f"{path} has {' and '.join(h.name + '/' for h in hits)}; keep one {split} folder")
        if hits:
            out[split] = hits[0]
    return out


def _split_name(name: str) -> str | None:
    for split, names in SPLIT_DIRS.items():
        if name.lower() in names:
            return split
    return None


def _from_datasets(obj, where: str, base_dir: Path) -> dict[str, _Source]:
    """A Dataset (one split, to be split by seed) or DatasetDict (its splits by name) as sources."""
    from datasets import DatasetDict

    if not isinstance(obj, DatasetDict):
        return {"all": _Source("all", obj, where, base_dir)}
    out = {}
    for name, ds in obj.items():
        split = _split_name(name)
        if split is None:
            raise FedDATError(f"{where} has a split {name!r}; name its splits train, validation (or val, valid, "
                              "dev) and test, or save one split and let it be split by seed")
        if split in out:
            raise FedDATError(f"{where} has two {split} splits ({out[split].file} and {name}); keep one")
        out[split] = _Source(split, ds, f"{where} split {name}", base_dir)
    if len(out) == 1:  # one split: split by seed
        only = next(iter(out.values()))
        return {"all": _Source("all", only.dataset, only.file, base_dir)}
    if "train" not in out or "test" not in out:
        raise FedDATError(f"{where} has splits {', '.join(obj)}; a client needs train and test (validation "
                          "optional), or one split to be split by seed")
    return out


def _parquet_dir(path: Path, cache_dir) -> dict[str, _Source]:
    """The parquet files under `path`, split by their names as `datasets` splits a dataset repository
    (train/..., data/train-00000-of-00001.parquet, test.parquet, ...)."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(path))
        files = {split: [f for p in pats for f in resolve_pattern(p, str(path)) if f.endswith(".parquet")]
                 for split, pats in patterns.items()}
        files = {split: fs for split, fs in files.items() if fs}
    except Exception as e:
        raise FedDATError(f"the parquet files under {path} cannot be listed ({type(e).__name__}: {e})") from e
    if not files:
        raise FedDATError(f"{path} has parquet files but none datasets recognises as a split; name them "
                          "train*.parquet, validation*.parquet, test*.parquet (or put them in such folders)")
    out = {}
    for name, fs in files.items():
        split = _split_name(name) if len(files) > 1 else "all"
        if split is None:
            raise FedDATError(f"{path}: parquet split {name!r} is not train, validation or test; rename its files")
        try:
            ds = _load_files("parquet", sorted(fs), cache_dir)
        except Exception as e:
            raise FedDATError(f"{fs[0]} cannot be read as parquet ({type(e).__name__}: {e})") from e
        out[split] = _Source(split, ds, f"{path} ({name} split)", path)
    if len(out) > 1 and ("train" not in out or "test" not in out):
        raise FedDATError(f"{path}: parquet splits {', '.join(out)}; a client needs train and test (validation "
                          "optional), or one split to be split by seed")
    return out


def looks_like_hub_id(path) -> bool:
    """Whether a client's path that is not on this machine names a dataset of the Hugging Face Hub
    (`owner/name`, read with `datasets.load_dataset` where the machine is online)."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~")) \
        and all(part and " " not in part for part in text.split("/"))


def _open_hub(hub_id: str, cache_dir) -> dict[str, _Source]:
    """A dataset of the Hub by id, with its splits (images are `datasets.Image` values: bytes)."""
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            obj = load_dataset(hub_id, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"{hub_id} is not a folder on this machine, and the Hugging Face Hub did not give a dataset "
                          f"of that id ({type(e).__name__}: {first}); give a client folder, or check the id and "
                          "that this machine is online") from e
    return _from_datasets(obj, hub_id, Path.cwd())


def _open(path: Path, client: str, cache_dir) -> dict[str, _Source]:
    """The client's sources by split ("train", "validation", "test"), or {"all": ...} to be split by seed."""
    from datasets import load_from_disk

    if path.is_file():
        if path.suffix != ".parquet":
            raise FedDATError(f"{path} is a file; give a client folder (metadata.jsonl beside its images, or "
                              "train/ validation/ test/ folders), a save_to_disk folder or a parquet file")
        try:
            ds = _load_files("parquet", str(path), cache_dir)
        except Exception as e:
            raise FedDATError(f"{path} cannot be read as parquet ({type(e).__name__}: {e}); is it a parquet file?") \
                from e
        return _from_datasets(ds, str(path), path.parent)
    root_meta = _metadata_in(path)
    dirs = _split_dirs(path)
    metas = {s: _metadata_in(d) for s, d in dirs.items()}
    if root_meta is not None:
        if any(m is not None for m in metas.values()):
            raise FedDATError(f"{path} has {root_meta.name} and split folders with their own metadata; keep either "
                              "one metadata file (split by seed) or one per split folder")
        return {"all": _read_metadata(root_meta, "all", client, cache_dir)}
    if any(m is not None for m in metas.values()):
        for split, meta in metas.items():
            if meta is None:
                raise FedDATError(f"{dirs[split]} has no metadata.jsonl (or metadata.csv); write one line per item "
                                  "with file_name and the task's columns, or remove the folder")
        if "train" not in metas:
            raise FedDATError(f"{path} has {', '.join(d.name + '/' for d in dirs.values())} but no train/ folder; "
                              "a client needs its training split")
        if "test" not in metas:
            raise FedDATError(f"{path} has no test/ folder; add one (a client is scored on its test split), or put "
                              "every item in one metadata.jsonl at the top to have it split by seed")
        return {s: _read_metadata(m, s, client, cache_dir) for s, m in metas.items()}
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            with _quiet_datasets():
                obj = load_from_disk(str(path))
        except Exception as e:
            raise FedDATError(f"{path} looks like a save_to_disk folder but cannot be loaded ({type(e).__name__}: "
                              f"{e}); save it again with Dataset.save_to_disk") from e
        return _from_datasets(obj, str(path), path)
    if any(path.rglob("*.parquet")):
        return _parquet_dir(path, cache_dir)
    raise FedDATError(f"{path} has no metadata.jsonl or metadata.csv (nor in train/, validation/, test/ folders): "
                      "write one line per item with file_name and the task's columns (e.g. {\"file_name\": "
                      "\"0001.png\", \"question\": \"...\", \"answer\": \"...\"}), see feddat.data.folders")


# --- columns ----------------------------------------------------------------------------------------------

def parse_columns(text: str | None) -> dict[str, str]:
    """A command-line column mapping, "image=img,question=q,answer=label", as {"image": "img", ...}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FedDATError(f"column mapping {part!r} is not NAME=COLUMN; write e.g. image=img,question=q,"
                              "answer=label")
        out[key] = value
    return normalise_columns(out)


def normalise_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """A column mapping with its keys checked and `file_name`/`file_name_2` read as image/image_2."""
    out = {}
    for key, value in (columns or {}).items():
        canon = ALIASES.get(key, key)
        if canon not in COLUMNS:
            close = difflib.get_close_matches(key, list(COLUMNS) + list(ALIASES), n=1)
            raise FedDATError(f"column mapping names {key!r}, which is not one of this format's columns "
                              f"({', '.join(COLUMNS)})" + (f"; did you mean {close[0]!r}?" if close else ""))
        if not isinstance(value, str) or not value:
            raise FedDATError(f"column mapping {key}={value!r}: the dataset's column must be a name")
        out[canon] = value
    return out


def _resolve_columns(src: _Source, mapping: dict[str, str]) -> dict[str, str]:
    """This format's column -> the source's column, for the columns the source has."""
    names = list(src.dataset.column_names)
    out = {}
    for key in COLUMNS:
        if key in mapping:
            if mapping[key] not in names:
                close = difflib.get_close_matches(mapping[key], names, n=1)
                raise FedDATError(f"{src.file}: the column mapping takes {key} from column {mapping[key]!r}, which "
                                  f"it does not have (its columns: {', '.join(names)})"
                                  + (f"; did you mean {close[0]!r}?" if close else ""))
            out[key] = mapping[key]
            continue
        for candidate in DEFAULT_SOURCES.get(key, (key,)):
            if candidate in names:
                out[key] = candidate
                break
    return out


def _missing_column(src: _Source, key: str, task: str, used: dict[str, str]) -> FedDATError:
    names = list(src.dataset.column_names)
    shown = NAMES.get(key, key)
    spare = [n for n in names if n not in used.values()]
    close = difflib.get_close_matches(shown, spare, n=1, cutoff=0.6)
    hint = (f"; did you mean {close[0]!r}? rename it to {shown!r}, or map it with columns={{{key!r}: {close[0]!r}}} "
            f"(--columns {key}={close[0]})" if close else
            f"; add it, or map one of the dataset's columns to it with columns={{{key!r}: ...}} (--columns {key}=...)")
    return FedDATError(f"{src.file}: no column {shown!r}, which a {task} client needs (its columns: "
                       f"{', '.join(names)}){hint}")


# --- rows -------------------------------------------------------------------------------------------------

class _Bad:
    """Bad rows: an error at once, or (skip) counted per split."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.first = ""

    def __call__(self, split: str, where: str, problem: str, fix: str) -> None:
        message = f"{where}: {problem}"
        if not self.skip:
            raise FedDATError(f"{message}; {fix} (or skip such rows with skip_bad=True / --skip-bad-records)")
        self.counts[split] = self.counts.get(split, 0) + 1
        self.first = self.first or message


class _RowError(Exception):
    pass


def _text(value, what: str) -> str:
    if value is None:
        raise _RowError(f"{what} is empty")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"{what} is empty")
        return value
    raise _RowError(f"{what} is {json.dumps(value, default=str)[:60]}, expected text")


def _vqa_answer(text: str) -> str:
    """VQA answers compare case- and space-insensitively (as feddat.data.real and the VQA evaluation do)."""
    return " ".join(text.lower().split())


def _list(value, what: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):  # CSV: a JSON list in the cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError(f"{what} is {value[:60]!r}, expected a list (in CSV: a JSON list)") from None
    if not isinstance(value, list):
        raise _RowError(f"{what} is {json.dumps(value, default=str)[:60]}, expected a list")
    return value


def _flag(value, what: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", ""):
        return value.strip().lower() in ("true", "1")
    raise _RowError(f"{what} is {value!r}, expected true or false")


@dataclass
class _Rows:
    """One split's parsed items; images are keys into the source (a path, or (column, row) of an Arrow column)."""

    source: _Source
    rows: list[int]              # row numbers in the source (0-based)
    image: list
    image_2: list | None
    questions: list[str]
    answers: list[str]
    annotators: list[list[str] | None] | None
    candidates: list[list[str]] | None
    qtypes: list[str]
    shifted: list[bool]
    synonym: list[bool]
    ids: list[str] | None
    arrow_columns: dict[str, str] = field(default_factory=dict)  # image / image_2 -> source column (Image feature)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, k: int) -> str:
        row = f"{self.source.file} row {self.rows[k] + 1}"
        return row + (f" (id {self.ids[k]})" if self.ids and self.ids[k] else "")

    def take(self, keep: list[int]) -> "_Rows":
        pick = lambda xs: None if xs is None else [xs[k] for k in keep]
        return _Rows(self.source, pick(self.rows), pick(self.image), pick(self.image_2), pick(self.questions),
                     pick(self.answers), pick(self.annotators), pick(self.candidates), pick(self.qtypes),
                     pick(self.shifted), pick(self.synonym), pick(self.ids), self.arrow_columns)

    def image_keys(self, k: int) -> list:
        return [self.image[k]] + ([] if self.image_2 is None else [self.image_2[k]])


def _is_image_feature(feature) -> bool:
    from datasets import Image as ImageFeature

    return isinstance(feature, ImageFeature)


def _parse(src: _Source, used: dict[str, str], task: str, bad: _Bad, k_choices: list) -> _Rows:
    """Every row of a source checked and normalised for `task`; bad rows go to `bad`."""
    ds = src.dataset
    features = ds.features
    arrow_columns = {key: used[key] for key in ("image", "image_2")
                     if key in used and _is_image_feature(features[used[key]])}
    for key in ("image", "image_2"):
        if key in used and key not in arrow_columns:
            feature = features[used[key]]
            if getattr(feature, "dtype", None) not in ("string", "large_string"):
                raise FedDATError(f"{src.file}: column {used[key]!r} ({NAMES[key]}) holds {feature}, expected image "
                                  "file names (text) or datasets.Image values")
    wanted = [c for key, c in used.items() if key not in arrow_columns]
    values = ds.select_columns(sorted(set(wanted)))[:] if wanted else {}
    n = ds.num_rows
    col = lambda key: values[used[key]] if key in used and key not in arrow_columns else None
    image_col, image2_col = col("image"), col("image_2")
    if arrow_columns:
        import pyarrow.compute as pc
        nulls = {key: pc.is_null(_arrow_column(src, c)[:].column(0)).to_pylist() for key, c in arrow_columns.items()}
    questions, answers, cands, annot = col("question"), col("answer"), col("candidates"), col("answers")
    qtypes, shifted, synonym, ids = col("qtype"), col("shifted"), col("synonym"), col("id")
    out = _Rows(src, [], [], [] if task == "pair" else None, [], [], [] if task == "vqa" and annot is not None
                else None, [] if task == "choice" else None, [], [], [], [] if ids is not None else None,
                arrow_columns)
    allowed = {"entailment": ENTAILMENT_LABELS, "pair": PAIR_LABELS}.get(task)
    for i in range(n):
        try:
            keys = []
            for key, column in (("image", image_col), ("image_2", image2_col)):
                if key == "image_2" and task != "pair":
                    continue
                if key in arrow_columns:
                    if nulls[key][i]:
                        raise _RowError(f"{NAMES[key]} is empty")
                    keys.append((arrow_columns[key], i))
                else:
                    keys.append(str(src.base_dir / _text(column[i], NAMES[key])))
            question = _text(questions[i], "question")
            answer = _text(answers[i], "answer")
            row_cands = None
            if task == "vqa":
                answer = _vqa_answer(answer)
            elif task == "choice":
                row_cands = _list(cands[i], "candidates")
                if not row_cands:
                    raise _RowError("candidates is empty")
                row_cands = [_text(c, "a candidate") for c in row_cands]
                if not k_choices:
                    if len(row_cands) > len(CHOICE_LABELS):
                        raise FedDATError(f"{src.file} row {i + 1}: {len(row_cands)} candidates; at most "
                                          f"{len(CHOICE_LABELS)} per item")
                    k_choices.append(len(row_cands))
                if len(row_cands) != k_choices[0]:
                    raise _RowError(f"has {len(row_cands)} candidates, the client's first item has {k_choices[0]}; "
                                    "give every item the same number")
                if answer not in row_cands:
                    raise _RowError(f"answer {answer!r} is not one of its candidates {row_cands} (give the right "
                                    "candidate's text, not its position)")
            else:
                answer = answer.strip().lower()
                if answer not in allowed:
                    raise _RowError(f"answer {answer!r} is not one of {', '.join(allowed)}, which a {task} "
                                    "client's answers are")
            row_annot = None
            if out.annotators is not None and annot[i] is not None:
                row_annot = [_vqa_answer(_text(a, "an annotator's answer")) for a in _list(annot[i], "answers")]
                if not row_annot:
                    row_annot = None
            qtype = "" if qtypes is None or qtypes[i] is None else str(qtypes[i])
            flags = [_flag(None if c is None else c[i], name) for c, name in ((shifted, "shifted"),
                                                                               (synonym, "synonym"))]
        except _RowError as e:
            where = f"{src.file} row {i + 1}" + (f" (id {ids[i]})" if ids is not None and ids[i] else "")
            bad(src.split, where, str(e), "fix the row")
            continue
        out.rows.append(i)
        out.image.append(keys[0])
        if out.image_2 is not None:
            out.image_2.append(keys[1])
        out.questions.append(question)
        out.answers.append(answer)
        if out.annotators is not None:
            out.annotators.append(row_annot)
        if out.candidates is not None:
            out.candidates.append(row_cands)
        out.qtypes.append(qtype)
        out.shifted.append(flags[0])
        out.synonym.append(flags[1])
        if out.ids is not None:
            out.ids.append("" if ids[i] is None else str(ids[i]))
    return out


# --- images -----------------------------------------------------------------------------------------------

def _arrow_column(src: _Source, column: str):
    return src.dataset.select_columns([column]).with_format("arrow")


def _check_images(rows: _Rows, bad: _Bad, report: FolderReport) -> _Rows:
    """Every image of the split opened once (missing, not an image or damaged: its rows go to `bad`)."""
    failed: dict = {}
    checked: set = set()
    arrow_cache: dict[str, object] = {}
    keep = []
    for k in range(len(rows)):
        problem = None
        for key in rows.image_keys(k):
            if key not in checked and key not in failed:
                try:
                    if isinstance(key, tuple):
                        column, row = key
                        table = arrow_cache.setdefault(column, _arrow_column(rows.source, column))
                        value = table[row:row + 1].column(0).to_pylist()[0] or {}
                        source = value.get("bytes")
                        if source is None:
                            p = Path(value.get("path") or "")
                            source = p if p.is_absolute() else rows.source.base_dir / p
                        check_image(source)
                    else:
                        if not os.path.isfile(key):
                            raise FileNotFoundError("no such file")
                        check_image(key)
                    checked.add(key)
                except IMAGE_ERRORS as e:
                    failed[key] = f"{type(e).__name__}: {e}"
            if key in failed:
                name = f"image {key}" if isinstance(key, str) else f"the image in column {key[0]!r}"
                problem = f"{name} cannot be decoded ({failed[key]})"
                break
        if problem is None:
            keep.append(k)
        else:
            bad(rows.source.split, rows.where(k), problem, "replace the image file or remove the row")
    report.bad_images += len(failed)
    return rows if len(keep) == len(rows) else rows.take(keep)


def _image_table(rows: _Rows, size: int, cache_bytes: int) -> tuple[ImageTable, np.ndarray, np.ndarray | None]:
    """The split's distinct images (first use first) and each item's position among them."""
    index: dict = {}
    first_row: list[int] = []
    for k in range(len(rows)):
        for key in rows.image_keys(k):
            if key not in index:
                index[key] = len(index)
                first_row.append(rows.rows[k])
    first = np.asarray(first_row, dtype=np.int64)
    image_index = np.fromiter((index[key] for key in rows.image), dtype=np.int64, count=len(rows))
    image_index2 = None if rows.image_2 is None else \
        np.fromiter((index[key] for key in rows.image_2), dtype=np.int64, count=len(rows))
    keys = list(index)
    if rows.arrow_columns:
        columns = sorted(set(rows.arrow_columns.values()))
        arrow = [_arrow_column(rows.source, c) for c in columns]
        refs = np.asarray([(columns.index(c), r) for c, r in keys], dtype=np.int64).reshape(-1, 2)
        table = ImageTable(size, rows.source.file, first, arrow=arrow, arrow_rows=refs,
                           base_dir=str(rows.source.base_dir),
                           cache_bytes=cache_bytes)
    else:
        table = ImageTable(size, rows.source.file, first, paths=keys, cache_bytes=cache_bytes)
    return table, image_index, image_index2


# --- splitting by seed ------------------------------------------------------------------------------------

def _groups(rows: _Rows) -> list[list[int]]:
    """Items grouped by their (first) image, groups in order of first appearance."""
    groups: dict = {}
    for k, key in enumerate(rows.image):
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def _split_by_seed(rows: _Rows, shares: tuple[float, ...], seed: int, salt: int) -> list[_Rows]:
    groups = _groups(rows)
    order = np.random.default_rng([seed, salt]).permutation(len(groups))
    counts = [int(round(s * len(groups))) for s in shares[1:]]
    counts = [max(c, 1) if len(groups) >= len(shares) else c for c in counts]
    first = len(groups) - sum(counts)
    bounds = np.cumsum([first, *counts])
    parts, start = [], 0
    for end in bounds:
        picked = sorted(k for g in order[start:end] for k in groups[g])
        parts.append(rows.take(picked))
        start = end
    return parts


# --- a client ---------------------------------------------------------------------------------------------

def _read_client_json(path: Path) -> dict:
    file = path / CLIENT_FILE if path.is_dir() else None
    if file is None or not file.is_file():
        return {}
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedDATError(f"{file} is not valid JSON ({e}); write e.g. {{\"task\": \"vqa\"}}") from e
    if not isinstance(info, dict):
        raise FedDATError(f"{file} must be a JSON object, e.g. {{\"task\": \"vqa\"}}")
    if "task" in info and info["task"] not in TASKS:
        raise FedDATError(f"{file}: task {info['task']!r} is not one of {', '.join(TASKS)}")
    if "columns" in info and not isinstance(info["columns"], dict):
        raise FedDATError(f"{file}: columns must be an object, e.g. {{\"question\": \"q\"}}")
    answers = info.get("answers")
    if answers is not None and (not isinstance(answers, list) or not answers
                                or not all(isinstance(a, str) and a.strip() for a in answers)
                                or len(set(answers)) != len(answers)):
        raise FedDATError(f"{file}: answers must be a list of distinct non-empty strings, e.g. "
                          "[\"yes\", \"no\", \"2\"] (or leave it out: the training answers)")
    if answers is not None and info.get("task", "vqa") != "vqa":
        raise FedDATError(f"{file}: answers sets a VQA client's label space; a {info['task']} client's labels are "
                          "fixed by its task: leave answers out")
    unknown = set(info) - {"task", "columns", "source", "description", "name", "answers"}
    if unknown:
        log.warning("%s: ignoring unknown keys %s (known: task, columns, answers, source, description)", file,
                    ", ".join(sorted(unknown)))
    return info


def _values(src: _Source, column: str) -> set:
    """The distinct values of a (text-like) column, as Python objects."""
    return {json.dumps(v) if isinstance(v, (list, dict)) else v
            for v in src.dataset.select_columns([column])[:][column]}


def _task(sources: dict[str, _Source], used: dict[str, dict[str, str]], info: dict, path: Path) -> tuple[str, str]:
    """The client's one task and where it came from; mixed tasks are an error."""
    implied = {}
    for s, src in sources.items():
        implied[s] = "pair" if "image_2" in used[s] else "choice" if "candidates" in used[s] else None
        if "image_2" in used[s] and "candidates" in used[s]:
            raise FedDATError(f"{src.file} has both {used[s]['image_2']!r} (image pairs) and "
                              f"{used[s]['candidates']!r} (multiple choice) columns: mixed tasks; one client holds "
                              "one task, so put each task's items in a client folder of its own")
    kinds = set(implied.values())
    if len(kinds) > 1:
        def describe(s: str) -> str:
            if implied[s] is None:
                return f"{sources[s].file} has neither file_name_2 nor candidates"
            return f"{sources[s].file} is {implied[s]} (has {'file_name_2' if implied[s] == 'pair' else 'candidates'})"
        a = next(iter(implied))  # train (or the only source) first
        b = next(s for s in implied if implied[s] != implied[a])
        raise FedDATError(f"mixed tasks in {path}: {describe(a)} but {describe(b)}; one client holds one task, so "
                          "give every split the same columns or put each task in a client folder of its own")
    from_columns = kinds.pop()
    column_tasks = {}
    for s, src in sources.items():
        if "task" in used[s]:
            values = {str(v) for v in _values(src, used[s]["task"]) if v is not None}
            if len(values) > 1:
                raise FedDATError(f"{src.file}: its {used[s]['task']!r} column names several tasks ("
                                  f"{', '.join(sorted(values))}): mixed tasks; one client holds one task, so put "
                                  "each task's items in a client folder of its own")
            column_tasks.update({v: src.file for v in values})
    if len(column_tasks) > 1:
        raise FedDATError(f"mixed tasks in {path}: " + ", ".join(f"{f} says {t}" for t, f in column_tasks.items())
                          + "; one client holds one task")
    declared = info.get("task")
    column_task = next(iter(column_tasks), None)
    if column_task is not None and column_task not in TASKS:
        raise FedDATError(f"{column_tasks[column_task]}: task {column_task!r} is not one of {', '.join(TASKS)}")
    if declared and column_task and declared != column_task:
        raise FedDATError(f"mixed tasks: {path / CLIENT_FILE} says {declared} but {column_tasks[column_task]} says "
                          f"{column_task}; make them agree")
    task, how = (declared, CLIENT_FILE) if declared else (column_task, "task column") if column_task else (None, "")
    if task is not None:
        if from_columns and task != from_columns:
            extra = "file_name_2 (image pairs)" if from_columns == "pair" else "candidates (multiple choice)"
            raise FedDATError(f"mixed tasks in {path}: {how} says {task} but the metadata has {extra}; one client "
                              f"holds one task: fix {how}, or drop the column")
        return task, how
    if from_columns:
        return from_columns, "inferred from the columns"
    train = sources.get("train") or sources["all"]
    if "answer" in used[train.split]:
        values = {str(v).strip().lower() for v in _values(train, used[train.split]["answer"]) if v is not None}
        if values and values <= set(ENTAILMENT_LABELS) and len(values) >= 2:
            return "entailment", "inferred from the answers"
    return "vqa", "inferred from the columns"


def _labels(rows: _Rows, task: str, lookup: dict[str, int], soft: bool) -> tuple[torch.Tensor, int]:
    """The split's labels, and how many of its answers fall outside the label space."""
    unknown = sum(a not in lookup for a in rows.answers) if task == "vqa" else 0
    if task == "choice":
        return torch.tensor([c.index(a) for a, c in zip(rows.answers, rows.candidates)], dtype=torch.long), 0
    if soft:
        annotators = rows.annotators or [None] * len(rows)
        # an item without annotators counts its one answer as every annotator's (as feddat.data.real does)
        return torch.stack([soft_scores(a or [ans] * 10, lookup) for a, ans in zip(annotators, rows.answers)]), \
            unknown
    return torch.tensor([lookup.get(a, -1) for a in rows.answers], dtype=torch.long), unknown


TOKENIZE_CHUNK = 4096  # texts per tokenizer call: its per-text objects for 50,000 items at once cost ~160 MB


def _tokenize(tokenizer, texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`feddat.data.pool.tokenize` (padded to text_len, so the same tensors) in chunks, to bound peak memory."""
    parts = [tokenize(tokenizer, texts[i:i + TOKENIZE_CHUNK], text_len) for i in range(0, len(texts), TOKENIZE_CHUNK)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _to_lazy_split(rows: _Rows, task: str, tokenizer, text_len: int, lookup: dict[str, int], soft: bool,
                   image_size: int, cache_bytes: int) -> tuple[LazySplit, int]:
    if task == "choice":
        k = len(rows.candidates[0])
        texts = [f"{q} {c}" for q, cands in zip(rows.questions, rows.candidates) for c in cands]
        ids, mask = _tokenize(tokenizer, texts, text_len)
        ids, mask = ids.view(len(rows), k, -1), mask.view(len(rows), k, -1)
    else:
        ids, mask = _tokenize(tokenizer, rows.questions, text_len)
    labels, unknown = _labels(rows, task, lookup, soft)
    table, index, index2 = _image_table(rows, image_size, cache_bytes)
    split = LazySplit(ids, mask, LazyPixels(table), torch.from_numpy(index), labels, np.asarray(rows.qtypes),
                      list(rows.questions), np.asarray(rows.shifted, dtype=bool), np.asarray(rows.synonym, dtype=bool),
                      None if index2 is None else torch.from_numpy(index2),
                      [list(c) for c in rows.candidates] if task == "choice" else None, images=table)
    return split, unknown


def _parse_folder(path: Path, hub_id: str | None, name: str, columns, skip_bad: bool, cache_dir,
                  check_images: bool) -> tuple[str, dict[str, _Rows], FolderReport, _Bad]:
    """A client's sources read and checked: its task, its rows by source split ("all", or train, validation,
    test), what loading found, and the record of bad rows."""
    info = {} if hub_id else _read_client_json(path)
    mapping = normalise_columns({**(info.get("columns") or {}), **(columns or {})})
    sources = _open_hub(hub_id, cache_dir) if hub_id else _open(path, name, cache_dir)
    used = {s: _resolve_columns(src, mapping) for s, src in sources.items()}
    task, task_from = _task(sources, used, info, path)
    report = FolderReport(str(hub_id or path), task, task_from)
    if info.get("answers") is not None:
        if task != "vqa":
            raise FedDATError(f"{path / CLIENT_FILE}: answers sets a VQA client's label space; this client holds "
                              f"{task} items, whose labels are fixed by the task: leave answers out")
        report.answers_from = "client.json"
        report.fixed_answers = list(info["answers"])
    for s, src in sources.items():
        for key in REQUIRED[task]:
            if key not in used[s]:
                raise _missing_column(src, key, task, used[s])
    bad = _Bad(skip_bad)
    k_choices: list[int] = []
    ordered = sorted(sources, key=lambda s: ("all", "train", "validation", "test").index(s))
    parsed = {s: _parse(sources[s], used[s], task, bad, k_choices) for s in ordered}
    if check_images:
        parsed = {s: _check_images(rows, bad, report) for s, rows in parsed.items()}
    report.skipped = {s: n for s, n in bad.counts.items() if n}
    report.first_problem = bad.first
    if sum(report.skipped.values()):
        log.warning("client %s: skipped %d bad rows (%s; first: %s)", name, sum(report.skipped.values()),
                    ", ".join(f"{s} {n}" for s, n in report.skipped.items()), bad.first)
    return task, parsed, report, bad


def load_client_folder(path, tokenizer, text_len: int, image_size: int, seed: int,
                       columns: dict[str, str] | None = None, skip_bad: bool = False, *, name: str | None = None,
                       cache_dir=None, check_images: bool = True, image_cache_mb: int = DEFAULT_CACHE_MB,
                       answers: list[str] | None = None, report_unknown: bool = True) -> FolderClient:
    """One client from a folder in this module's format (or any dataset `datasets` loads), ready for a Worker.

    `columns` maps this format's column names to the source's (`COLUMNS`; file_name/file_name_2 for
    image/image_2); `seed` splits a source without splits (`SEED_SPLIT`); images are resized to `image_size` and
    decoded per batch (`LazySplit`), keeping up to `image_cache_mb` MiB of decoded images (uint8; the client's
    splits share it in proportion to their items: a client whose images fit decodes each once). `check_images` opens
    every image once at load (so that a bad one is found now, or skipped with `skip_bad`). `name` defaults to
    the folder's name; `cache_dir` is where `datasets` keeps its Arrow files (default: its own cache).
    `answers` fixes the label space (a saved model's, to score it on this folder), over client.json's "answers"
    and the training answers; `report_unknown` logs the validation/test answers outside it (one line per split).
    Returns a `FolderClient` (a ClientData) whose `report` says what loading found."""
    hub_id = str(path) if looks_like_hub_id(path) else None
    path = Path(path)
    if not path.exists() and hub_id is None:
        raise FedDATError(f"client folder {path} does not exist")
    if not isinstance(image_size, int) or image_size <= 0:
        raise FedDATError(f"image size must be a positive integer, got {image_size!r}")
    name = name or (path.stem if path.is_file() else path.name)
    task, parsed, report, bad = _parse_folder(path, hub_id, name, columns, skip_bad, cache_dir, check_images)
    if "all" in parsed:
        rows = parsed.pop("all")
        if len(rows) == 0:
            raise _empty_split_error(name, "whole", rows.source.file, "add items")
        parsed.update(zip(SPLITS, _split_by_seed(rows, SEED_SPLIT, seed, 0xF01D)))
        report.split_by_seed = "all"
    elif "validation" not in parsed:
        parsed["train"], parsed["validation"] = _split_by_seed(parsed["train"], (1 - VAL_FROM_TRAIN, VAL_FROM_TRAIN),
                                                               seed, 0x7A1)
        report.split_by_seed = "validation"
    for s in SPLITS:
        if len(parsed[s]) == 0:
            src = parsed[s].source
            if report.split_by_seed == "all":
                n = sum(len(_groups(parsed[x])) for x in SPLITS)
                fix = f"{n} images are too few to split by seed; add items, or give train/, validation/ and test/ folders"
            elif s == "validation" and report.split_by_seed:
                fix = (f"{len(_groups(parsed['train']))} training images are too few to hold validation out of; add "
                       "items, or a validation/ folder")
            elif sum(report.skipped.values()):
                fix = f"every row was skipped as bad (first: {bad.first}); fix the rows"
            else:
                fix = "add items to it"
            raise _empty_split_error(name, s, src.file, fix)
    train = parsed["train"]
    report.items = {s: len(parsed[s]) for s in SPLITS}
    if len(train) < MIN_TRAIN:
        warnings.warn(f"client {name}: only {len(train)} training items ({train.source.file}); a client needs at "
                      f"least {MIN_TRAIN} or so to learn anything; add items or merge it with another client",
                      stacklevel=2)
    if answers is not None:
        answers, report.answers_from = list(answers), "given"
    elif report.fixed_answers is not None:
        answers = report.fixed_answers
    else:
        answers = label_space(task, SimpleNamespace(answers=train.answers, candidates=train.candidates))
    lookup = {a: i for i, a in enumerate(answers)}
    soft = task == "vqa" and train.annotators is not None and any(a for a in train.annotators)
    splits = {}
    # the client's decoded-image budget, shared by its splits in proportion to their items
    total = sum(len(parsed[s]) for s in SPLITS)
    for s in SPLITS:
        budget = (image_cache_mb << 20) * len(parsed[s]) // total
        splits[s], report.unknown_answers[s] = _to_lazy_split(parsed[s], task, tokenizer, text_len, lookup, soft,
                                                              image_size, budget)
    for s in ("validation", "test"):
        n = report.unknown_answers[s]
        if n and report_unknown:
            log.warning("client %s: %d of %d %s answers are not among its training answers (%s); they keep label -1 "
                        "and count as wrong", name, n, len(parsed[s]), s, parsed[s].source.file)
    log.info("client %s: %s", name, report.summary())
    return FolderClient(name, answers, splits["train"], splits["validation"], splits["test"], task=task,
                        report=report)


# --- several clients --------------------------------------------------------------------------------------

def _check_name(name: str, where: str) -> None:
    if not _NAME.match(name or ""):
        raise FedDATError(f"client name {name!r} ({where}) must start with a letter or digit and hold only letters, "
                          "digits, '.', '_' and '-'")


def check_unique_names(pairs: Iterable[str]) -> list[tuple[str, Path]]:
    """NAME=PATH pairs (the command line's clients) as (name, path), each name given once."""
    out: list[tuple[str, Path]] = []
    given: dict[str, str] = {}   # name, case-folded -> the pair that gave it
    for pair in pairs:
        name, sep, path = pair.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise FedDATError(f"client {pair!r} is not NAME=PATH; write e.g. clinic-a=/data/clinic-a")
        _check_name(name, pair)
        key = name.lower()
        if key in given:
            case = "" if given[key].partition("=")[0].strip() == name else \
                " (the names differ only in case, which clash on some file systems)"
            raise FedDATError(f"two clients are named {name!r}: {given[key]} and {pair}{case}; give each client "
                              "its own name")
        given[key] = pair
        out.append((name, Path(path)))
    paths = [p.resolve() for _, p in out]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            log.warning("clients %s and %s read the same folder %s", out[paths.index(p)][0], out[i][0], p)
    return out


ORDER_FILE = "clients.json"  # in a folder of client folders: the order its clients are numbered (and seeded) in


def read_order(root: Path) -> list[str]:
    """The client names `root/clients.json` lists ([] without one)."""
    path = Path(root) / ORDER_FILE
    if not path.is_file():
        return []
    try:
        order = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FedDATError(f"{path} is unreadable ({e}); it lists the client folders in their order, e.g. "
                          '["clinic-a", "clinic-b"]: fix it or delete it (then folders sort by name)') from None
    if not isinstance(order, list) or not all(isinstance(n, str) and n for n in order):
        raise FedDATError(f"{path} is not a list of client folder names, e.g. [\"clinic-a\", \"clinic-b\"]: "
                          "fix it or delete it (then folders sort by name)")
    return order


def write_order(root: Path, names: Iterable[str]) -> None:
    """Add `names` to `root/clients.json`, after the names already listed there."""
    order = read_order(root)
    order += [n for n in names if n not in order]
    (Path(root) / ORDER_FILE).write_text(json.dumps(order) + "\n")


def client_dirs(root) -> list[tuple[str, Path]]:
    """(name, folder) for every client folder under `root` (hidden folders left out), names checked unique: those
    `root/clients.json` lists first, in its order (an exported benchmark's clients in the benchmark's order, so
    they train to its numbers), then the others sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FedDATError(f"clients folder {root} does not exist")
    if _metadata_in(root) is not None or any(_metadata_in(d) for d in _split_dirs(root).values()):
        raise FedDATError(f"{root} is one client's folder, not a folder of client folders; load it with "
                          f"load_client_folder, or move it into a folder of its own")
    subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subs:
        raise FedDATError(f"{root} has no client folders; put one folder per client in it")
    rank = {name: i for i, name in enumerate(read_order(root))}
    subs.sort(key=lambda d: (rank.get(d.name, len(rank)), d.name))
    return check_unique_names(f"{d.name}={d}" for d in subs)


def load_clients_dir(root, tokenizer, text_len: int, image_size: int, seed: int,
                     columns: dict[str, str] | None = None, skip_bad: bool = False, **kwargs) -> list[FolderClient]:
    """Every sub-folder of `root` as a client named by the folder (sorted by name); `load_client_folder` options."""
    return load_named_folders(client_dirs(root), tokenizer, text_len, image_size, seed, columns, skip_bad, **kwargs)


def load_clients(pairs: Iterable[str], tokenizer, text_len: int, image_size: int, seed: int,
                 columns: dict[str, str] | None = None, skip_bad: bool = False, **kwargs) -> list[FolderClient]:
    """Clients given as NAME=PATH pairs (`check_unique_names`), in the order given."""
    return load_named_folders(check_unique_names(pairs), tokenizer, text_len, image_size, seed, columns, skip_bad,
                              **kwargs)


def load_named_folders(folders: Iterable[tuple[str, Path]], tokenizer, text_len: int, image_size: int, seed: int,
                       columns: dict[str, str] | None = None, skip_bad: bool = False,
                       **kwargs) -> list[FolderClient]:
    """Clients given as (name, folder), names already checked (`client_dirs`, `check_unique_names`)."""
    return [load_client_folder(path, tokenizer, text_len, image_size, seed, columns, skip_bad, name=name, **kwargs)
            for name, path in folders]


def _pool_rows(parts: list[tuple[str, _Rows]]) -> tuple[_Rows, list[str]]:
    """The rows of several sources as one (image keys are file paths, so the sources' images stay apart), and
    each row's client."""
    def cat(field: str):
        values = [getattr(rows, field) for _, rows in parts]
        if all(v is None for v in values):
            return None
        return [x for v, (_, rows) in zip(values, parts) for x in (v if v is not None else [None] * len(rows))]

    files = ", ".join(sorted({rows.source.file for _, rows in parts}))
    source = _Source("all", None, f"the pooled folders ({files})", Path("/"))
    pooled = _Rows(source, [r for _, rows in parts for r in rows.rows], cat("image"), None, cat("questions"),
                   cat("answers"), cat("annotators"), None, cat("qtypes"), cat("shifted"), cat("synonym"), cat("ids"))
    return pooled, [name for name, rows in parts for _ in range(len(rows))]


def load_partitioned_folders(folders: Iterable[tuple[str, Path]], part, tokenizer, text_len: int, image_size: int,
                             seed: int, columns: dict[str, str] | None = None, skip_bad: bool = False, *,
                             cache_dir=None, image_cache_mb: int = DEFAULT_CACHE_MB) -> list[FolderClient]:
    """Your client folders' items pooled and split over `part.num_clients` clients (`part-0`, ...) as a
    partitioned benchmark's records are (feddat.data.partition: Flower Datasets' IID, Dirichlet or pathological
    partitioner by answer), each partition then split by seed into train, validation and test (70/10/20). Every
    folder must hold VQA items with image files (not images inside Arrow or parquet data); the clients share one
    label space, the pool's training answers. Images stay on disk, decoded per batch."""
    from feddat.data.partition import assign_rows, partition_client_names, warn_left_out

    parts = []
    for name, path in folders:
        path = Path(path)
        if not path.exists():
            raise FedDATError(f"client folder {path} does not exist")
        task, parsed, _, _ = _parse_folder(path, None, name, columns, skip_bad, cache_dir, True)
        if task != "vqa":
            raise FedDATError(f"a partition pools VQA items; client folder {path} holds {task} items: use "
                              "--partition natural")
        for s in ("all", "train", "validation", "test"):
            if s in parsed:
                if parsed[s].arrow_columns:
                    raise FedDATError(f"a partition pools items whose images are files; {parsed[s].source.file} "
                                      "keeps its images inside the data: export them as files, or use --partition "
                                      "natural")
                parts.append((name, parsed[s]))
    pooled, sources = _pool_rows(parts)
    assigned = assign_rows(pooled.answers, sources, part, seed, SEED_SPLIT)
    warn_left_out(part, len(pooled), assigned)
    answers = label_space("vqa", SimpleNamespace(answers=[pooled.answers[i] for t in assigned for i in t[0]],
                                                 candidates=None))
    lookup = {a: i for i, a in enumerate(answers)}
    soft = pooled.annotators is not None and any(a for a in pooled.annotators)
    clients = []
    for name, splits in zip(partition_client_names(part.num_clients), assigned):
        rows = [pooled.take(sorted(idx.tolist())) for idx in splits]
        total = sum(len(r) for r in rows)
        report = FolderReport(pooled.source.file, "vqa", f"partition {part.kind} of the pooled folders",
                              items=dict(zip(SPLITS, map(len, rows))), split_by_seed="all")
        built = {}
        for s, r in zip(SPLITS, rows):
            built[s], report.unknown_answers[s] = _to_lazy_split(r, "vqa", tokenizer, text_len, lookup, soft,
                                                                 image_size, (image_cache_mb << 20) * len(r) // total)
        clients.append(FolderClient(name, answers, built["train"], built["validation"], built["test"], task="vqa",
                                    report=report))
    return clients


# --- writing ----------------------------------------------------------------------------------------------

_SPLIT_OF_RECORDS = {"train": "train", "val": "validation", "test": "test"}


def _split_rows(r: Records, folder: Path) -> list[dict]:
    """Write the split's images (those its items use, PNG, once each) and return its metadata rows."""
    used = np.unique(r.image_index if r.image_index2 is None else np.concatenate([r.image_index, r.image_index2]))
    width = max(6, len(str(len(r.images))))
    names = {int(i): f"{int(i):0{width}d}.png" for i in used}
    for i, file in names.items():
        Image.fromarray(np.ascontiguousarray(r.images[i])).save(folder / file, format="PNG")
    rows = []
    for k in range(len(r)):
        row = {"file_name": names[int(r.image_index[k])]}
        if r.image_index2 is not None:
            row["file_name_2"] = names[int(r.image_index2[k])]
        row["question"] = r.questions[k]
        row["answer"] = r.answers[k]
        if r.annotator_answers:
            row["answers"] = list(r.annotator_answers[k])
        if r.candidates is not None and r.task == "choice":
            row["candidates"] = list(r.candidates[k])
        row["qtype"] = r.qtypes[k]
        row["shifted"] = bool(r.shifted[k])
        row["synonym"] = bool(r.synonym[k])
        if r.ids:
            row["id"] = str(r.ids[k])
        rows.append(row)
    return rows


def export_client(records: dict[str, Records], out_dir, name: str, overwrite: bool = False,
                  source: dict | None = None, answers: list[str] | None = None) -> Path:
    """Write one client's records ({"train"|"val"|"test": Records}) as `out_dir/name/` in this module's format:
    train/, validation/, test/ with PNG images and metadata.jsonl, and client.json ({"task": ...}, plus
    `source` when given, and `answers`: a VQA client's fixed label space). Written to a temporary folder beside it, then renamed into place; an existing folder
    is an error unless `overwrite`. Returns the client's folder."""
    _check_name(name, "export")
    missing = [s for s in _SPLIT_OF_RECORDS if s not in records]
    if missing:
        raise FedDATError(f"client {name}: no {', '.join(missing)} records to export")
    tasks = {r.task for r in records.values()}
    if len(tasks) > 1:
        raise FedDATError(f"client {name}: its splits have mixed tasks ({', '.join(sorted(tasks))})")
    out_dir = Path(out_dir)
    final = out_dir / name
    if final.exists() and not overwrite:
        raise FedDATError(f"{final} already exists; remove it, or export with overwrite=True")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for key, split in _SPLIT_OF_RECORDS.items():
            folder = tmp / split
            folder.mkdir()
            rows = _split_rows(records[key], folder)
            with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        meta = {"task": tasks.pop()}
        if answers is not None:
            meta["answers"] = list(answers)
        if source:
            meta["source"] = source
        (tmp / CLIENT_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            old = out_dir / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
