"""The paper's benchmarks over the public datasets they were built from, read from disk as the datasets ship.

Three layers, each usable alone:

- one loader per dataset (`load_vqav2`, `load_gqa`, ...): reads `<data_dir>/<dataset>/` in the dataset's own
  published layout and returns a list of `Example` for one official split (layouts: docs/datasets.md);
- the paper's preprocessing, in `client_examples`: a VQA-style client keeps the questions whose answer is among
  its `top_k` most frequent training answers; then deterministic subsampling by seed, train and val from the
  official training split (val held out of it), test from the official split with labels (`Source.test_split`);
- `load_real_benchmark`: every client of a benchmark (`REAL_BENCHMARKS`) as `feddat.data.pool.Records`, images
  decoded with PIL once each and resized to a square.

A bad input (a missing file, a malformed record, a label outside the task's label set, an unreadable image) raises
`FedDATError` naming the file and the record; with `skip_bad=True` such records are skipped and counted in the
log instead. Missing or unparsable annotation files are always errors.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from feddat.data.pool import ENTAILMENT_LABELS, PAIR_LABELS, Records
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError

log = logging.getLogger(__name__)

TOP_K = 100            # the label space of a VQA-style client: its 100 most frequent training answers
CHOICES = 4            # VCR: candidate answers per question


@dataclass(frozen=True)
class Example:
    """One question (or statement) of a dataset, before any preprocessing."""

    id: str                          # the source's record id (or split/line where the source has none)
    images: tuple[str, ...]          # image paths relative to the data directory: one, or two for an image pair
    text: str                        # the question, statement or hypothesis
    answer: str                      # vqa: the answer; pair: true/false; entailment: the label; choice: the
                                     # right candidate's text
    annotator_answers: tuple[str, ...] = ()  # vqa: every annotator's answer, where the source has them
    candidates: tuple[str, ...] = ()          # choice: the candidate answers, the answer among them
    qtype: str = ""                  # the source's question type (what the source calls it), for statistics


class _Malformed(Exception):
    """A record that does not have the shape its file's format promises; the message says what is wrong."""


class _BadRecords:
    """Where a loader sends bad records: raised as FedDATError, or (skip=True) counted and logged per file."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def __call__(self, path: Path | str, record: str, problem: str, group: str | None = None) -> None:
        """A bad record of file `path`; skipped ones are counted per file (or per `group` of files)."""
        message = f"{path}: {record}: {problem}"
        if not self.skip:
            raise FedDATError(f"{message} (fix the record, or skip such records with --skip-bad-records)")
        key = group or str(path)
        self.counts[key] += 1
        self.first.setdefault(key, message)

    def log(self) -> None:
        for key, n in self.counts.items():
            log.warning("skipped %d bad record%s in %s (first: %s)", n, "" if n == 1 else "s", key, self.first[key])


def _read_json(path: Path):
    if not path.is_file():
        raise FedDATError(f"missing file {path} (the expected layout under --data-dir is in docs/datasets.md)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedDATError(f"{path} is not valid JSON ({e}); download the file again") from e


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or _Malformed) for every non-empty line."""
    if not path.is_file():
        raise FedDATError(f"missing file {path} (the expected layout under --data-dir is in docs/datasets.md)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, _Malformed(f"not valid JSON ({e.msg})")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FedDATError(f"missing file {path} (the expected layout under --data-dir is in docs/datasets.md)")
    return path.read_text(encoding="utf-8").splitlines()


def _get(record, key: str, kind: type | tuple = str):
    """record[key], checked to be of `kind`; _Malformed otherwise."""
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise _Malformed(f"missing field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _Malformed(f"field {key!r} is {json.dumps(value)[:60]}, expected {names}")
    return value


def _record_name(record, id_key: str, position: str) -> str:
    """How an error names a record: its id where it has a readable one, else its position in the file."""
    if isinstance(record, dict) and isinstance(record.get(id_key), (str, int)):
        return f"record {record[id_key]}"
    return position


def _answer(text: str) -> str:
    """VQA-style answers compare case- and space-insensitively (as the VQA evaluation does)."""
    return " ".join(text.lower().split())


def _answers(record) -> tuple[str, ...]:
    """VQA / VizWiz `answers`: a list of {"answer": ...} objects."""
    answers = _get(record, "answers", list)
    out = []
    for a in answers:
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise _Malformed("field 'answers' must be a list of objects with a string 'answer'")
        out.append(_answer(a["answer"]))
    if not out:
        raise _Malformed("field 'answers' is empty")
    return tuple(out)


def _parse_all(items, path: Path, bad: _BadRecords, id_key: str, parse: Callable) -> list[Example]:
    """`parse` over every record of a JSON list; bad ones go to `bad` (named by id or position)."""
    out = []
    for i, record in enumerate(items):
        try:
            example = parse(record, i)
        except _Malformed as e:
            bad(path, _record_name(record, id_key, f"record #{i}"), str(e))
            continue
        if example is not None:
            out.append(example)
    return out


def _parse_jsonl(path: Path, bad: _BadRecords, id_key: str, parse: Callable) -> list[Example]:
    out = []
    for n, record in _read_jsonl(path):
        try:
            if isinstance(record, _Malformed):
                raise record
            example = parse(record, n)
        except _Malformed as e:
            bad(path, f"line {n} ({_record_name(record, id_key, 'no id')})", str(e))
            continue
        if example is not None:
            out.append(example)
    return out


def _split_check(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise FedDATError(f"{dataset} has no split {split!r}; its splits are {', '.join(splits)}")


# --- VQA v2 and VQA Abstract Scenes: the VQA questions + annotations JSON pair -------------------------------

def _load_vqa_format(data_dir: Path, dataset: str, questions_file: str, annotations_file: str,
                     image_path: Callable[[int], str], bad: _BadRecords) -> list[Example]:
    root = Path(data_dir) / dataset
    qpath, apath = root / questions_file, root / annotations_file
    questions, annotations = _read_json(qpath), _read_json(apath)
    for path, blob, key in ((qpath, questions, "questions"), (apath, annotations, "annotations")):
        if not isinstance(blob, dict) or not isinstance(blob.get(key), list):
            raise FedDATError(f"{path} has no {key!r} list; is it the VQA {key} file?")
    by_id = {}
    for i, a in enumerate(annotations["annotations"]):
        try:
            qid = _get(a, "question_id", int)
            by_id[qid] = (_answer(_get(a, "multiple_choice_answer")), _answers(a), _get(a, "answer_type"))
        except _Malformed as e:
            bad(apath, _record_name(a, "question_id", f"record #{i}"), str(e))

    def parse(q, i):
        qid = _get(q, "question_id", int)
        if qid not in by_id:
            raise _Malformed(f"no annotation in {apath.name}")
        answer, annotators, qtype = by_id[qid]
        return Example(str(qid), (image_path(_get(q, "image_id", int)),), _get(q, "question"), answer, annotators,
                       (), qtype)

    return _parse_all(questions["questions"], qpath, bad, "question_id", parse)


def load_vqav2(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """VQA v2, split `train2014` or `val2014` (test2015 has no answers). Reads

        vqav2/v2_OpenEnded_mscoco_<split>_questions.json   {"questions": [{question_id, image_id, question}]}
        vqav2/v2_mscoco_<split>_annotations.json           {"annotations": [{question_id, multiple_choice_answer,
                                                             answers: [{answer, ...}] x10, answer_type}]}
        vqav2/<split>/COCO_<split>_<image_id:012d>.jpg     COCO images

    The answer is `multiple_choice_answer`; the ten annotators' answers are kept; qtype is `answer_type`."""
    _split_check("vqav2", split, ("train2014", "val2014"))
    bad = _BadRecords(skip_bad)
    out = _load_vqa_format(data_dir, "vqav2", f"v2_OpenEnded_mscoco_{split}_questions.json",
                           f"v2_mscoco_{split}_annotations.json",
                           lambda i: f"vqav2/{split}/COCO_{split}_{i:012d}.jpg", bad)
    bad.log()
    return out


def load_vqa_abstract(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """VQA Abstract Scenes (the VQA v1 abstract release), split `train2015` or `val2015`. Reads

        vqa-abstract/OpenEnded_abstract_v002_<split>_questions.json   same format as VQA v2's
        vqa-abstract/abstract_v002_<split>_annotations.json
        vqa-abstract/scene_img_abstract_v002_<split>/abstract_v002_<split>_<image_id:012d>.png

    Fields as in `load_vqav2`."""
    _split_check("vqa-abstract", split, ("train2015", "val2015"))
    bad = _BadRecords(skip_bad)
    out = _load_vqa_format(data_dir, "vqa-abstract", f"OpenEnded_abstract_v002_{split}_questions.json",
                           f"abstract_v002_{split}_annotations.json",
                           lambda i: f"vqa-abstract/scene_img_abstract_v002_{split}/abstract_v002_{split}_{i:012d}.png",
                           bad)
    bad.log()
    return out


# --- GQA --------------------------------------------------------------------------------------------------

def load_gqa(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """GQA balanced questions, split `train`, `val` or `testdev`. Reads

        gqa/<split>_balanced_questions.json   {question_id: {imageId, question, answer, types: {structural, ...}}}
        gqa/images/<imageId>.jpg

    qtype is `types.structural` (verify, query, choose, logical, compare)."""
    _split_check("gqa", split, ("train", "val", "testdev"))
    path = Path(data_dir) / "gqa" / f"{split}_balanced_questions.json"
    blob = _read_json(path)
    if not isinstance(blob, dict):
        raise FedDATError(f"{path} is not a JSON object keyed by question id; is it a GQA questions file?")
    bad = _BadRecords(skip_bad)
    out = []
    for qid, q in blob.items():
        try:
            types = q.get("types") if isinstance(q, dict) else None
            qtype = types.get("structural", "") if isinstance(types, dict) else ""
            out.append(Example(str(qid), (f"gqa/images/{_get(q, 'imageId')}.jpg",), _get(q, "question"),
                               _answer(_get(q, "answer")), (), (), qtype))
        except _Malformed as e:
            bad(path, f"record {qid}", str(e))
    bad.log()
    return out


# --- VizWiz -----------------------------------------------------------------------------------------------

def load_vizwiz(data_dir: Path, split: str, skip_bad: bool = False,
                keep_unanswerable: bool = False) -> list[Example]:
    """VizWiz VQA, split `train` or `val` (test has no answers). Reads

        vizwiz/Annotations/<split>.json   [{image, question, answers: [{answer, answer_confidence}] x10,
                                            answer_type, answerable}]
        vizwiz/<split>/<image>            e.g. vizwiz/train/VizWiz_train_00000000.jpg

    The answer is the annotators' most frequent one (the first given among equals). Questions marked
    `answerable: 0` are dropped (and counted in the log) unless `keep_unanswerable`."""
    _split_check("vizwiz", split, ("train", "val"))
    path = Path(data_dir) / "vizwiz" / "Annotations" / f"{split}.json"
    items = _read_json(path)
    if not isinstance(items, list):
        raise FedDATError(f"{path} is not a JSON list; is it a VizWiz annotations file?")
    bad = _BadRecords(skip_bad)
    dropped = 0

    def parse(r, i):
        nonlocal dropped
        image = _get(r, "image")
        answerable = _get(r, "answerable", (int, bool))
        if answerable not in (0, 1):
            raise _Malformed(f"field 'answerable' is {answerable}, expected 0 or 1")
        annotators = _answers(r)
        if not answerable and not keep_unanswerable:
            dropped += 1
            return None
        return Example(Path(image).stem, (f"vizwiz/{split}/{image}",), _get(r, "question"),
                       Counter(annotators).most_common(1)[0][0], annotators, (), _get(r, "answer_type"))

    out = _parse_all(items, path, bad, "image", parse)
    if dropped:
        log.info("vizwiz %s: dropped %d of %d questions marked unanswerable", split, dropped, len(items))
    bad.log()
    return out


# --- COCO-QA ----------------------------------------------------------------------------------------------

COCOQA_TYPES = ("object", "number", "color", "location")  # types.txt codes 0-3
COCOQA_IMAGES = {"train": "train2014", "test": "val2014"}  # COCO-QA's train/test images: COCO train/val 2014


def load_cocoqa(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """COCO-QA (Ren et al., "toronto"), split `train` or `test`. Reads, line by line in parallel,

        cocoqa/<split>/questions.txt   cocoqa/<split>/answers.txt   cocoqa/<split>/img_ids.txt
        cocoqa/<split>/types.txt       (0 object, 1 number, 2 color, 3 location)
        cocoqa/train2014/COCO_train2014_<id:012d>.jpg for train, cocoqa/val2014/COCO_val2014_<id:012d>.jpg for test

    Records have no ids of their own: an Example's id is `<split>-<line number>`."""
    _split_check("cocoqa", split, tuple(COCOQA_IMAGES))
    root = Path(data_dir) / "cocoqa" / split
    names = ("questions.txt", "answers.txt", "img_ids.txt", "types.txt")
    columns = [_read_lines(root / n) for n in names]
    if len({len(c) for c in columns}) != 1:
        counts = ", ".join(f"{n} {len(c)}" for n, c in zip(names, columns))
        raise FedDATError(f"{root}: the four files must have one line per question each, but have {counts}")
    images = COCOQA_IMAGES[split]
    bad = _BadRecords(skip_bad)
    out = []
    for n, (question, answer, image_id, qtype) in enumerate(zip(*columns), 1):
        try:
            if not image_id.strip().isdigit():
                raise _Malformed(f"img_ids.txt has {image_id!r}, expected an image number")
            if qtype.strip() not in ("0", "1", "2", "3"):
                raise _Malformed(f"types.txt has {qtype!r}, expected 0, 1, 2 or 3")
            if not question.strip() or not answer.strip():
                raise _Malformed("empty question or answer")
        except _Malformed as e:
            bad(root, f"line {n}", str(e))
            continue
        out.append(Example(f"{split}-{n}", (f"cocoqa/{images}/COCO_{images}_{int(image_id):012d}.jpg",),
                           question.strip(), _answer(answer), (), (), COCOQA_TYPES[int(qtype)]))
    bad.log()
    return out


# --- AQUA -------------------------------------------------------------------------------------------------

def load_aqua(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """AQUA (art VQA over SemArt paintings), split `train`, `val` or `test`. Reads

        aqua/<split>.json            [{image, question, answer, need_external_knowledge}]
        aqua/SemArt/Images/<image>   SemArt's image folder

    qtype is `knowledge` where `need_external_knowledge`, else `visual`; an Example's id is `<split>-<index>`."""
    _split_check("aqua", split, ("train", "val", "test"))
    path = Path(data_dir) / "aqua" / f"{split}.json"
    items = _read_json(path)
    if not isinstance(items, list):
        raise FedDATError(f"{path} is not a JSON list; is it an AQUA file?")
    bad = _BadRecords(skip_bad)

    def parse(r, i):
        knowledge = _get(r, "need_external_knowledge", bool)
        return Example(f"{split}-{i}", (f"aqua/SemArt/Images/{_get(r, 'image')}",), _get(r, "question"),
                       _answer(_get(r, "answer")), (), (), "knowledge" if knowledge else "visual")

    out = _parse_all(items, path, bad, "", parse)
    bad.log()
    return out


# --- CLOVE (function and scene) ----------------------------------------------------------------------------

CLOVE_FUNCTION = {"a": "attribute", "b": "knowledge", "c": "logical", "d": "object", "e": "relation"}
CLOVE_SCENE = {"a": "ShopAndDining", "b": "Workplace", "c": "HomeOrHotel", "d": "Transportation",
               "e": "SportAndLeisure", "f": "Outdoors"}
CLOVE_IMAGES = {"vg": "clove/vg/image", "textvqa": "clove/textvqa"}  # by a record's `image_source`


def _load_clove(path: Path, bad: _BadRecords) -> list[Example]:
    items = _read_json(path)
    if not isinstance(items, list):
        raise FedDATError(f"{path} is not a JSON list; is it a CLOVE json file?")

    def parse(r, i):
        source = _get(r, "image_source")
        if source not in CLOVE_IMAGES:
            raise _Malformed(f"image_source {source!r} is none of {', '.join(CLOVE_IMAGES)}")
        annotators = _get(r, "answers", list)
        if not annotators or not all(isinstance(a, str) for a in annotators):
            raise _Malformed("field 'answers' must be a non-empty list of strings")
        raw = r.get("raw_question_type")
        qtype = raw.get("detailed", "") if isinstance(raw, dict) else ""
        return Example(str(_get(r, "question_id", (str, int))),
                       (f"{CLOVE_IMAGES[source]}/{_get(r, 'image_id', (str, int))}.jpg",), _get(r, "question"),
                       _answer(_get(r, "answer")), tuple(_answer(a) for a in annotators), (),
                       qtype or str(r.get("stage", "")))

    return _parse_all(items, path, bad, "question_id", parse)


def load_clove_function(data_dir: Path, split: str, subset: str, skip_bad: bool = False) -> list[Example]:
    """CLOVE-function, one function split (`subset` a-e: attribute, knowledge, logical, object, relation), split
    `train` or `val`. Reads

        clove/json/function/functional_<function>_<split>.json   [{question_id, question, answer, answers (10),
                                                                    image_id, image_source, raw_question_type,
                                                                    stage, ...}]
        clove/vg/image/<image_id>.jpg (image_source vg), clove/textvqa/<image_id>.jpg (image_source textvqa)

    qtype is GQA's detailed question type where the record has one, else its `stage`."""
    _split_check("clove-function", split, ("train", "val"))
    if subset not in CLOVE_FUNCTION:
        raise FedDATError(f"clove-function has no subset {subset!r}; its subsets are {', '.join(CLOVE_FUNCTION)}")
    bad = _BadRecords(skip_bad)
    out = _load_clove(Path(data_dir) / "clove" / "json" / "function"
                      / f"functional_{CLOVE_FUNCTION[subset]}_{split}.json", bad)
    bad.log()
    return out


def load_clove_scene(data_dir: Path, split: str, subset: str, skip_bad: bool = False) -> list[Example]:
    """CLOVE-scene, one scene split (`subset` a-f: shop and dining, workplace, home or hotel, transportation,
    sport and leisure, outdoors), split `train` or `val`. Reads

        clove/json/scene/scene_<subset>#<Scene>_<split>.json   e.g. scene_a#ShopAndDining_train.json
        images as in `load_clove_function`"""
    _split_check("clove-scene", split, ("train", "val"))
    if subset not in CLOVE_SCENE:
        raise FedDATError(f"clove-scene has no subset {subset!r}; its subsets are {', '.join(CLOVE_SCENE)}")
    bad = _BadRecords(skip_bad)
    name = f"scene_{subset}#{CLOVE_SCENE[subset]}_{split}.json"
    out = _load_clove(Path(data_dir) / "clove" / "json" / "scene" / name, bad)
    bad.log()
    return out


# --- NLVR2 ------------------------------------------------------------------------------------------------

NLVR2_LABELS = dict(zip(("False", "True"), PAIR_LABELS))  # the file's label -> the pair task's


def load_nlvr2(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """NLVR2, split `train`, `dev` or `test1`. Reads

        nlvr2/data/<split>.json   JSON lines {identifier, sentence, label ("True"/"False"), directory (train), ...}
        nlvr2/images/train/<directory>/<prefix>-img0.png and -img1.png    (train)
        nlvr2/images/<split>/<prefix>-img0.png and -img1.png              (dev, test1)

    where <prefix> is the identifier without its last part (train-10171-0-0 -> train-10171-0)."""
    _split_check("nlvr2", split, ("train", "dev", "test1"))
    path = Path(data_dir) / "nlvr2" / "data" / f"{split}.json"
    bad = _BadRecords(skip_bad)

    def parse(r, n):
        identifier = _get(r, "identifier")
        parts = identifier.split("-")
        if len(parts) != 4 or parts[0] != split:
            raise _Malformed(f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence> of split {split}")
        label = _get(r, "label")
        if label not in NLVR2_LABELS:
            raise _Malformed(f"label {label!r} is neither True nor False")
        folder = f"nlvr2/images/{split}"
        if split == "train":
            folder += f"/{_get(r, 'directory', int)}"
        prefix = "-".join(parts[:3])
        return Example(identifier, (f"{folder}/{prefix}-img0.png", f"{folder}/{prefix}-img1.png"),
                       _get(r, "sentence"), NLVR2_LABELS[label], (), (), "nlvr2")

    out = _parse_jsonl(path, bad, "identifier", parse)
    bad.log()
    return out


# --- SNLI-VE ----------------------------------------------------------------------------------------------

def load_snli_ve(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """SNLI-VE (visual entailment over Flickr30k), split `train`, `dev` or `test`. Reads

        snli-ve/snli_ve_<split>.jsonl       JSON lines {pairID, Flikr30kID, sentence2, gold_label, ...}
        snli-ve/flickr30k-images/<Flikr30kID>

    The hypothesis is `sentence2` (the image is the premise). Pairs whose `gold_label` is "-" (SNLI's mark for
    no annotator consensus) are dropped and counted in the log; any other label outside entailment / neutral /
    contradiction is a bad record."""
    _split_check("snli-ve", split, ("train", "dev", "test"))
    path = Path(data_dir) / "snli-ve" / f"snli_ve_{split}.jsonl"
    bad = _BadRecords(skip_bad)
    dropped = 0

    def parse(r, n):
        nonlocal dropped
        label = _get(r, "gold_label")
        if label == "-":
            dropped += 1
            return None
        if label not in ENTAILMENT_LABELS:
            raise _Malformed(f"gold_label {label!r} is none of {', '.join(ENTAILMENT_LABELS)}")
        return Example(str(_get(r, "pairID", (str, int))), (f"snli-ve/flickr30k-images/{_get(r, 'Flikr30kID')}",),
                       _get(r, "sentence2"), label, (), (), "snli-ve")

    out = _parse_jsonl(path, bad, "pairID", parse)
    if dropped:
        log.info("snli-ve %s: dropped %d pairs without a gold label", split, dropped)
    bad.log()
    return out


# --- VCR --------------------------------------------------------------------------------------------------

_ATTACH = re.compile(r"[?.!,;:]+|'\w*|n't")  # tokens written without a space before them


def _vcr_text(tokens, objects: list[str], field_name: str) -> str:
    """VCR's token list as text: an object reference [i, j, ...] becomes the objects' names ("person and dog")."""
    if not isinstance(tokens, list) or not tokens:
        raise _Malformed(f"field {field_name!r} must be a non-empty token list")
    words = []
    for tok in tokens:
        if isinstance(tok, list):
            if not tok or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(objects)
                                  for i in tok):
                raise _Malformed(f"field {field_name!r} refers to object {tok}, but the record has "
                                 f"{len(objects)} objects")
            words.append(" and ".join(objects[i] for i in tok))
        elif isinstance(tok, str):
            if words and _ATTACH.fullmatch(tok):
                words[-1] += tok
            else:
                words.append(tok)
        else:
            raise _Malformed(f"field {field_name!r} has a token {tok!r} that is neither text nor object indices")
    return " ".join(words)


def load_vcr(data_dir: Path, split: str, skip_bad: bool = False) -> list[Example]:
    """VCR question answering (Q -> A), split `train` or `val` (test has no labels). Reads

        vcr/<split>.jsonl            JSON lines {annot_id, img_fn, objects, question, answer_choices (4),
                                     answer_label, ...}; question and choices are token lists where a list of
                                     integers refers to entries of `objects`
        vcr/vcr1images/<img_fn>

    The four candidates are the choices as text (object references named from `objects`); the answer is the
    candidate at `answer_label`, which must be 0-3. qtype is `vcr`."""
    _split_check("vcr", split, ("train", "val"))
    path = Path(data_dir) / "vcr" / f"{split}.jsonl"
    bad = _BadRecords(skip_bad)

    def parse(r, n):
        objects = _get(r, "objects", list)
        if not all(isinstance(o, str) for o in objects):
            raise _Malformed("field 'objects' must be a list of names")
        choices = _get(r, "answer_choices", list)
        if len(choices) != CHOICES:
            raise _Malformed(f"has {len(choices)} answer_choices, expected {CHOICES}")
        candidates = tuple(_vcr_text(c, objects, "answer_choices") for c in choices)
        label = _get(r, "answer_label", int)
        if not 0 <= label < CHOICES:
            raise _Malformed(f"answer_label {label} is out of range 0-{CHOICES - 1}")
        return Example(str(_get(r, "annot_id")), (f"vcr/vcr1images/{_get(r, 'img_fn')}",),
                       _vcr_text(_get(r, "question", list), objects, "question"), candidates[label], (),
                       candidates, "vcr")

    out = _parse_jsonl(path, bad, "annot_id", parse)
    bad.log()
    return out


# --- datasets and benchmarks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A dataset: its client task, its loader, and which official splits give train/val and test."""

    task: str                 # feddat.data.pool.TASKS
    load: Callable            # (data_dir, split, [subset], skip_bad=...) -> list[Example]
    train_split: str          # the official split train and val are drawn from
    test_split: str           # the official split with labels that test is drawn from


DATASETS = {
    "vqav2": Source("vqa", load_vqav2, "train2014", "val2014"),
    "gqa": Source("vqa", load_gqa, "train", "testdev"),
    "vizwiz": Source("vqa", load_vizwiz, "train", "val"),
    "vqa-abstract": Source("vqa", load_vqa_abstract, "train2015", "val2015"),
    "cocoqa": Source("vqa", load_cocoqa, "train", "test"),
    "aqua": Source("vqa", load_aqua, "train", "test"),
    "clove-function": Source("vqa", load_clove_function, "train", "val"),
    "clove-scene": Source("vqa", load_clove_scene, "train", "val"),
    "nlvr2": Source("pair", load_nlvr2, "train", "test1"),
    "snli-ve": Source("entailment", load_snli_ve, "train", "test"),
    "vcr": Source("choice", load_vcr, "train", "val"),
}


@dataclass(frozen=True)
class RealClient:
    name: str
    dataset: str              # a key of DATASETS
    subset: str | None = None  # CLOVE: the split letter

    def load(self, data_dir: Path, split: str, skip_bad: bool) -> list[Example]:
        subset = () if self.subset is None else (self.subset,)
        return DATASETS[self.dataset].load(Path(data_dir), split, *subset, skip_bad=skip_bad)


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()  # ShopAndDining -> shop-and-dining


# Clients in the paper's order (docs/datasets.md, "Benchmarks").
REAL_BENCHMARKS = {
    "domain": (RealClient("aqua", "aqua"), RealClient("vqa-abstract", "vqa-abstract"), RealClient("vizwiz", "vizwiz"),
               RealClient("toronto", "cocoqa"), RealClient("gqa", "gqa")),
    "function": tuple(RealClient(name, "clove-function", k) for k, name in CLOVE_FUNCTION.items()),
    "scene": tuple(RealClient(_kebab(name), "clove-scene", k) for k, name in CLOVE_SCENE.items()),
    "task": (RealClient("vqav2", "vqav2"), RealClient("nlvr2", "nlvr2"), RealClient("snli-ve", "snli-ve"),
             RealClient("vcr", "vcr")),
}


def real_clients(benchmark: str, clients: list[str] | None = None) -> list[tuple[int, RealClient]]:
    """(position in the benchmark, client) for every client, or for the named ones."""
    if benchmark not in REAL_BENCHMARKS:
        raise FedDATError(f"no real-data benchmark {benchmark!r}; choose one of {', '.join(REAL_BENCHMARKS)}")
    specs = list(enumerate(REAL_BENCHMARKS[benchmark]))
    if clients is None:
        return specs
    names = [c.name for _, c in specs]
    unknown = [c for c in clients if c not in names]
    if unknown:
        raise FedDATError(f"benchmark {benchmark} has no client {', '.join(unknown)}; its clients are "
                          f"{', '.join(names)}")
    return [(i, c) for i, c in specs if c.name in clients]


# --- preprocessing ----------------------------------------------------------------------------------------

def top_answers(examples: list[Example], k: int) -> list[str]:
    """The k most frequent answers (ties: alphabetical order), most frequent first."""
    counts = Counter(e.answer for e in examples)
    return sorted(counts, key=lambda a: (-counts[a], a))[:k]


def keep_top_answers(name: str, train: list[Example], test: list[Example], k: int
                     ) -> tuple[list[Example], list[Example]]:
    """Both pools restricted to the questions whose answer is among the k most frequent training answers."""
    keep = set(top_answers(train, k))
    kept_train = [e for e in train if e.answer in keep]
    kept_test = [e for e in test if e.answer in keep]
    log.info("%s: kept %d of %d train and %d of %d test questions (answers among the %d most frequent training "
             "answers)", name, len(kept_train), len(train), len(kept_test), len(test), len(keep))
    return kept_train, kept_test


def client_examples(client: RealClient, data_dir: Path, seed: int, index: int, top_k: int = TOP_K,
                    skip_bad: bool = False) -> dict[str, list[Example]]:
    """A client's candidate pools, each in its seeded order: `train` (train, then val, are taken from its front)
    and `test`. VQA-style clients keep only questions whose answer is among their `top_k` training answers."""
    source = DATASETS[client.dataset]
    train = client.load(data_dir, source.train_split, skip_bad)
    test = client.load(data_dir, source.test_split, skip_bad)
    if source.task == "vqa":
        train, test = keep_top_answers(client.name, train, test, top_k)
    order = {name: np.random.default_rng([seed, index, k]).permutation(len(pool))
             for k, (name, pool) in enumerate((("train", train), ("test", test)))}
    return {"train": [train[i] for i in order["train"]], "test": [test[i] for i in order["test"]]}


class _Images:
    """Images decoded once each (RGB, resized to size x size, uint8), by path relative to the data directory."""

    def __init__(self, data_dir: Path, size: int):
        self.data_dir, self.size = Path(data_dir), size
        self.arrays: dict[str, np.ndarray] = {}
        self.failed: dict[str, str] = {}

    def problem(self, rel: str) -> str | None:
        """None once `rel` is decoded; else why it cannot be."""
        if rel in self.arrays:
            return None
        if rel not in self.failed:
            path = self.data_dir / rel
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
                self.arrays[rel] = np.asarray(rgb, dtype=np.uint8)
                return None
            except FileNotFoundError:
                self.failed[rel] = "missing image file"
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.failed[rel] = f"unreadable image ({type(e).__name__}: {e})"
        return self.failed[rel]


def _take(pool: list[Example], start: int, n: int, images: _Images, bad: _BadRecords, desc: str,
          progress: bool) -> tuple[list[Example], int]:
    """The first n examples of pool[start:] whose images all decode; and where the next take starts."""
    out = []
    i = start
    with tqdm(total=n, desc=desc, unit="question", disable=not progress, leave=False) as bar:
        while len(out) < n and i < len(pool):
            e = pool[i]
            i += 1
            broken = [(rel, p) for rel, p in ((rel, images.problem(rel)) for rel in e.images) if p]
            if broken:
                bad(images.data_dir / broken[0][0], f"record {e.id}", broken[0][1], group=f"{desc} images")
                continue
            out.append(e)
            bar.update()
    return out, i


def examples_to_records(examples: list[Example], task: str, images: _Images) -> Records:
    """Records over decoded images: each distinct image stored once, each question pointing at it."""
    index: dict[str, int] = {}
    for e in examples:
        for rel in e.images:
            index.setdefault(rel, len(index))
    size = images.size
    stacked = np.stack([images.arrays[rel] for rel in index]) if index else np.zeros((0, size, size, 3), np.uint8)
    empty = np.zeros((len(index), 16), dtype=np.int64)
    n = len(examples)
    with_annotators = task == "vqa" and any(e.annotator_answers for e in examples)
    return Records(
        images=stacked, patch_colors=empty, patch_shapes=empty.copy(),
        image_index=np.asarray([index[e.images[0]] for e in examples], dtype=np.int64),
        questions=[e.text for e in examples], answers=[e.answer for e in examples],
        qtypes=[e.qtype for e in examples], shifted=[False] * n, synonym=[False] * n, task=task,
        image_index2=np.asarray([index[e.images[1]] for e in examples], dtype=np.int64) if task == "pair" else None,
        candidates=[list(e.candidates) for e in examples] if task == "choice" else None,
        # a question without annotators (a mixed source) counts its one answer as every annotator's
        annotator_answers=[list(e.annotator_answers) or [e.answer] * 10 for e in examples] if with_annotators
        else None,
        ids=[e.id for e in examples])


@dataclass
class RealSplit:
    examples: list[Example]
    records: Records = field(repr=False)


def load_real_splits(benchmark: str, data_dir: Path, seed: int, sizes: Sizes, image_size: int,
                     skip_bad: bool = False, clients: list[str] | None = None, top_k: int = TOP_K,
                     progress: bool = True
                     ) -> dict[str, dict[str, RealSplit]]:
    """Like `load_real_benchmark`, with each split's chosen examples beside its records."""
    sizes.validate()
    if not isinstance(image_size, int) or image_size <= 0:
        raise FedDATError(f"image size must be a positive integer, got {image_size!r}")
    if not Path(data_dir).is_dir():
        raise FedDATError(f"data directory {data_dir} does not exist")
    out = {}
    for index, client in real_clients(benchmark, clients):
        pools = client_examples(client, data_dir, seed, index, top_k, skip_bad)
        task = DATASETS[client.dataset].task
        images = _Images(data_dir, image_size)
        bad = _BadRecords(skip_bad)
        chosen = {}
        chosen["train"], nxt = _take(pools["train"], 0, sizes.train, images, bad, f"{client.name} train", progress)
        chosen["val"], _ = _take(pools["train"], nxt, sizes.val, images, bad, f"{client.name} val", progress)
        chosen["test"], _ = _take(pools["test"], 0, sizes.test, images, bad, f"{client.name} test", progress)
        bad.log()
        for split, examples in chosen.items():
            wanted = getattr(sizes, split)
            if len(examples) < wanted:
                log.warning("%s: only %d %s questions available (asked for %d)", client.name, len(examples), split,
                            wanted)
        out[client.name] = {s: RealSplit(e, examples_to_records(e, task, images)) for s, e in chosen.items()}
    return out


def load_real_benchmark(benchmark: str, data_dir: Path, seed: int, sizes: Sizes, image_size: int,
                        skip_bad: bool = False, clients: list[str] | None = None, top_k: int = TOP_K,
                        progress: bool = True
                        ) -> dict[str, dict[str, Records]]:
    """Every client of a real-data benchmark, {client: {"train"|"val"|"test": Records}}, from `data_dir`.

    `sizes` (feddat.data.sizes.Sizes) are the questions per split; train and val come from the source's
    official training split (disjoint), test from its official split with labels. `seed` fixes which questions;
    `image_size` the side images are resized to; `clients` a subset of the benchmark's clients (default: all);
    `top_k` the label space of VQA-style clients; `skip_bad` skips (and logs) bad records instead of raising."""
    splits = load_real_splits(benchmark, data_dir, seed, sizes, image_size, skip_bad, clients, top_k, progress)
    return {client: {s: v.records for s, v in per.items()} for client, per in splits.items()}


def example_json(e: Example) -> dict:
    """An Example as one line of OUT/records/<client>/<split>.jsonl."""
    return {"id": e.id, "images": list(e.images), "text": e.text, "answer": e.answer,
            "annotator_answers": list(e.annotator_answers), "candidates": list(e.candidates), "qtype": e.qtype}


def write_records(splits: dict[str, dict[str, RealSplit]], out_dir: Path) -> list[Path]:
    """OUT/records/<client>/<split>.jsonl, one JSON object per chosen record; returns the files written."""
    written = []
    for client, per in splits.items():
        folder = Path(out_dir) / "records" / client
        folder.mkdir(parents=True, exist_ok=True)
        for split, v in per.items():
            path = folder / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for e in v.examples:
                    f.write(json.dumps(example_json(e), ensure_ascii=False) + "\n")
            written.append(path)
    return written
