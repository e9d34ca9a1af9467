"""Client folders (feddat.data.folders): the ImageFolder-style format, its writer, lazily decoded splits, and
one clear error (or warning, or count) per kind of bad data."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feddat.data.benchmarks import ClientData, client_records, label_space, records_split
from feddat.data.clients import export_benchmark
from feddat.data.folders import (FolderClient, check_unique_names, export_client, load_client_folder, load_clients,
                                 load_clients_dir, parse_columns)
from feddat.data.lazy import ImageTable, LazyPixels, LazySplit
from feddat.data.pool import pixel_tensor
from feddat.data.questions import WORDS
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError
from feddat.models.backbone import build_word_tokenizer

TEXT_LEN = 12
SIZE = 48


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


@pytest.fixture()
def hf_cache(tmp_path):
    return tmp_path / "hf-cache"


def _image(i: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


def write_folder(folder: Path, rows: list[dict], n_images: int | None = None, meta: str = "metadata.jsonl") -> Path:
    """A folder with images 0.png ... (n-1).png (random 16x16) and a metadata file of `rows`."""
    folder.mkdir(parents=True, exist_ok=True)
    n = n_images if n_images is not None else len(rows)
    for i in range(n):
        Image.fromarray(_image(i)).save(folder / f"{i}.png")
    if meta.endswith(".jsonl"):
        (folder / meta).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(folder / meta, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return folder


def vqa_rows(n: int, answers=("red", "blue", "green"), offset: int = 0) -> list[dict]:
    return [{"file_name": f"{i}.png", "question": "what color is the circle ?",
             "answer": answers[(i + offset) % len(answers)]} for i in range(n)]


def split_client(root: Path, n_train=24, n_val=6, n_test=8, **kw) -> Path:
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        write_folder(root / split, vqa_rows(n, **kw))
    return root


def memory_clients(benchmark: str, sizes: Sizes, tok, cache) -> list[ClientData]:
    """The benchmark's clients held in memory, every image a tensor (`records_split`): the reference."""
    out = []
    for name, splits in client_records(benchmark, 0, sizes, cache).items():
        answers = label_space(splits["train"].task, splits["train"])
        lookup = {a: i for i, a in enumerate(answers)}
        out.append(ClientData(name, answers, *(records_split(splits[s], tok, TEXT_LEN, lookup)
                                               for s in ("train", "val", "test")), task=splits["train"].task))
    return out


def load(path, tok, hf_cache, **kw) -> FolderClient:
    return load_client_folder(path, tok, TEXT_LEN, SIZE, 0, cache_dir=hf_cache, **kw)


def assert_same_client(mem, fol):
    assert fol.name == mem.name and fol.task == mem.task and fol.answers == mem.answers
    assert fol.metric == mem.metric
    for s in ("train", "val", "test"):
        a, b = getattr(mem, s), getattr(fol, s)
        assert isinstance(b, LazySplit) and isinstance(b.pixels, LazyPixels)
        assert len(a) == len(b)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert a.labels.dtype == b.labels.dtype and torch.equal(a.labels, b.labels)
        assert a.questions == b.questions and a.candidates == b.candidates
        assert (a.qtypes == b.qtypes).all() and (a.shifted == b.shifted).all() and (a.synonym == b.synonym).all()
        assert (a.image_index2 is None) == (b.image_index2 is None)
        idx = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:11]
        ba, bb = a.batch(idx), b.batch(idx)
        assert ba.keys() == bb.keys()
        for k in ba:
            assert torch.equal(ba[k], bb[k]), (mem.name, s, k)


# --- round trip -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("benchmark", ["domain", "task"])
def test_an_exported_benchmark_reads_back_as_load_benchmark_builds_it(benchmark, tok, tmp_path, hf_cache):
    """Labels (task: soft VQA scores, entailment, image pairs, multiple choice), questions, diagnostics and the
    pixel values of every batch equal the in-memory path's."""
    sizes = Sizes(16, 8, 16)
    cache = tmp_path / "cache"
    mem = memory_clients(benchmark, sizes, tok, cache)
    folders = export_benchmark(benchmark, 0, sizes, tmp_path / "clients", cache_dir=cache)
    assert [p.name for p in folders] == [c.name for c in mem]
    assert not [p for p in (tmp_path / "clients").iterdir() if p.name.startswith(".")]  # no temporary folders left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 training items: the few-items warning
        loaded = {c.name: c for c in load_clients_dir(tmp_path / "clients", tok, TEXT_LEN, SIZE, 0,
                                                     cache_dir=hf_cache)}
    for c in mem:
        assert_same_client(c, loaded[c.name])
    if benchmark == "task":
        assert loaded["vqa"].train.labels.is_floating_point() and loaded["pair"].train.image_index2 is not None
        assert json.loads((tmp_path / "clients" / "pair" / "client.json").read_text())["task"] == "pair"
        line = json.loads((tmp_path / "clients" / "choice" / "test" / "metadata.jsonl").read_text().splitlines()[0])
        assert len(line["candidates"]) == 4 and line["answer"] in line["candidates"]


def test_an_exported_folder_is_an_imagefolder_datasets_loads(tok, tmp_path, hf_cache, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    from feddat.data.benchmarks import client_records

    recs = client_records("domain", 0, Sizes(8, 4, 6), cache_dir=tmp_path / "cache")
    path = export_client(recs["night"], tmp_path / "out", "night")
    ds = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=str(hf_cache))
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"].num_rows == 8 and {"image", "question", "answer", "qtype"} <= set(ds["train"].column_names)
    first = ds["train"][0]
    r = recs["night"]["train"]
    assert first["question"] == r.questions[0] and first["answer"] == r.answers[0]
    assert np.array_equal(np.asarray(first["image"].convert("RGB")), r.images[r.image_index[0]])


def test_export_is_atomic_and_does_not_overwrite_by_default(tmp_path, monkeypatch):
    from feddat.data.benchmarks import client_records

    recs = client_records("domain", 0, Sizes(4, 2, 2), cache_dir=tmp_path / "cache")["clipart"]
    out = tmp_path / "out"
    export_client(recs, out, "a")
    with pytest.raises(FedDATError, match="already exists.*overwrite=True"):
        export_client(recs, out, "a")
    saved = Image.Image.save
    calls = {"n": 0}

    def failing_save(self, *a, **k):  # the disk fills up half-way through the second export
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("No space left on device")
        return saved(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        export_client(recs, out, "b")
    with pytest.raises(OSError):
        calls["n"] = 0
        export_client(recs, out, "a", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # no half-written b, no temporary folders, a intact
    assert len((out / "a" / "train" / "metadata.jsonl").read_text().splitlines()) == 4


# --- the format -------------------------------------------------------------------------------------------

def test_a_folder_without_split_folders_is_split_by_seed_70_10_20_by_image(tok, tmp_path, hf_cache):
    rows = vqa_rows(50)
    rows += [{**r, "question": "is there a circle ?", "answer": "yes"} for r in rows[:10]]  # images 0-9: 2 questions
    path = write_folder(tmp_path / "c", rows, n_images=50)
    client = load(path, tok, hf_cache)
    assert client.report.split_by_seed == "all"
    images = {s: {q for q in getattr(client, s).images.paths} for s in ("train", "val", "test")}
    assert [len(images[s]) for s in ("train", "val", "test")] == [35, 5, 10]
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    assert len(client.train) + len(client.val) + len(client.test) == 60  # an image's questions stay together
    again = load(path, tok, hf_cache)
    assert again.test.questions == client.test.questions and torch.equal(again.test.labels, client.test.labels)
    other = load_client_folder(path, tok, TEXT_LEN, SIZE, 1, cache_dir=hf_cache)
    assert {q for q in other.test.images.paths} != images["test"]


def test_validation_is_held_out_of_train_when_only_train_and_test_exist(tok, tmp_path, hf_cache):
    write_folder(tmp_path / "c" / "train", vqa_rows(40))
    write_folder(tmp_path / "c" / "test", vqa_rows(10))
    client = load(tmp_path / "c", tok, hf_cache)
    assert (len(client.train), len(client.val), len(client.test)) == (35, 5, 10)
    assert client.report.split_by_seed == "validation"


def test_csv_metadata_soft_scores_and_a_column_mapping(tok, tmp_path, hf_cache):
    """metadata.csv with a JSON list of annotators' answers, a question column named `q`, and optional qtype."""
    rows = [{"file_name": f"{i}.png", "q": "what color is the circle ?", "answer": "Red " if i % 2 else "blue",
             "answers": ["red"] * 3 + ["blue"] if i % 2 else ["blue"] * 4, "qtype": "color"} for i in range(24)]
    for split in ("train", "validation", "test"):
        write_folder(tmp_path / "c" / split, rows, meta="metadata.csv")
    client = load(tmp_path / "c", tok, hf_cache, columns=parse_columns("question=q"))
    assert client.task == "vqa" and client.answers == ["blue", "red"]  # answers compare case/space-insensitively
    assert client.metric == "vqa-score"
    assert torch.allclose(client.train.labels[1], torch.tensor([0.3, 0.9]))
    assert torch.allclose(client.train.labels[0], torch.tensor([1.0, 0.0]))
    assert set(client.train.qtypes.tolist()) == {"color"} and client.report.task_from == "inferred from the columns"


def test_a_saved_dataset_with_embedded_images_and_a_column_mapping(tok, tmp_path, hf_cache):
    """A `save_to_disk` DatasetDict (train, test) whose images are embedded datasets.Image values, read with
    --columns image=img,question=q,answer=label; and the same data as one parquet file (split by seed)."""
    import datasets

    def part(n, seed):
        imgs = [Image.fromarray(_image(seed + i, 20)) for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": imgs, "q": ["is there a circle ?"] * n, "label": ["yes" if i % 3 else "no" for i in range(n)]},
            features=datasets.Features({"img": datasets.Image(), "q": datasets.Value("string"),
                                        "label": datasets.Value("string")}))

    dd = datasets.DatasetDict({"train": part(30, 0), "test": part(8, 100)})
    dd.save_to_disk(str(tmp_path / "saved"))
    mapping = parse_columns("image=img,question=q,answer=label")
    client = load(tmp_path / "saved", tok, hf_cache, columns=mapping)
    assert (len(client.train) + len(client.val), len(client.test)) == (30, 8) and client.answers == ["no", "yes"]
    got = client.test.batch(torch.tensor([0, 5]))["pixel_values"]
    want = pixel_tensor(np.stack([np.asarray(Image.fromarray(_image(100 + i, 20)).resize((SIZE, SIZE),
                                                                                            Image.BICUBIC))
                                  for i in (0, 5)]))
    assert torch.equal(got, want)
    dd["train"].to_parquet(str(tmp_path / "one.parquet"))
    flat = load(tmp_path / "one.parquet", tok, hf_cache, columns=mapping)
    assert flat.report.split_by_seed == "all" and len(flat.train) + len(flat.val) + len(flat.test) == 30
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(tmp_path / "pq" / "data" / f"{split}-00000-of-00001.parquet"))
    hub_layout = load(tmp_path / "pq", tok, hf_cache, columns=mapping)
    assert torch.equal(hub_layout.test.batch(torch.tensor([0, 5]))["pixel_values"], want)


def test_a_hub_dataset_id_is_read_with_load_dataset(tok, tmp_path, hf_cache, monkeypatch):
    """A client path that is not on this machine and reads owner/name goes to `datasets.load_dataset` (here
    replaced by one that serves a local DatasetDict: the machine is offline); an id the Hub does not give is a
    one-line error naming it."""
    import datasets

    n = 20
    imgs = [Image.fromarray(_image(i, 20)) for i in range(n)]
    part = datasets.Dataset.from_dict({"image": imgs, "question": ["is there a circle ?"] * n,
                                       "answer": ["yes" if i % 2 else "no" for i in range(n)]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "question": datasets.Value("string"),
                                                                  "answer": datasets.Value("string")}))
    asked = []

    def fake_load_dataset(name, **kw):
        asked.append(name)
        if name != "someone/circles":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
        return datasets.DatasetDict({"train": part, "test": part.select(range(6))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    client = load("someone/circles", tok, hf_cache)
    assert asked == ["someone/circles"] and client.name == "circles" and client.answers == ["no", "yes"]
    assert len(client.test) == 6 and client.test.batch(torch.tensor([0, 1]))["pixel_values"].shape[0] == 2
    with pytest.raises(FedDATError, match="someone/absent is not a folder on this machine, and the Hugging Face Hub"):
        load("someone/absent", tok, hf_cache)
    with pytest.raises(FedDATError, match="does not exist"):
        load(tmp_path / "absent", tok, hf_cache)


def test_pair_choice_and_entailment_columns(tok, tmp_path, hf_cache):
    pair = [{"file_name": f"{i}.png", "file_name_2": f"{(i + 1) % 24}.png", "question": "both images have a circle",
             "answer": bool(i % 2)} for i in range(24)]
    choice = [{"file_name": f"{i}.png", "question": "what color is the circle ?",
               "candidates": ["red", "blue", "green"], "answer": ["red", "blue", "green"][i % 3]} for i in range(24)]
    ent = [{"file_name": f"{i}.png", "question": "the circle is red",
            "answer": ["entailment", "neutral", "contradiction"][i % 3]} for i in range(24)]
    for name, rows in (("pair", pair), ("choice", choice), ("ent", ent)):
        for split in ("train", "validation", "test"):
            write_folder(tmp_path / name / split, rows)
    p = load(tmp_path / "pair", tok, hf_cache)
    assert p.task == "pair" and p.answers == ["false", "true"] and p.train.labels[:2].tolist() == [0, 1]
    b = p.train.batch(torch.tensor([3, 23]))["pixel_values"]
    assert b.shape == (2, 2, 3, SIZE, SIZE)
    assert torch.equal(b[1, 1], p.train.pixels[int(p.train.image_index[0])])  # 23's second image is image 0
    c = load(tmp_path / "choice", tok, hf_cache)
    assert c.task == "choice" and c.answers == ["A", "B", "C"] and c.train.input_ids.shape == (24, 3, TEXT_LEN)
    assert c.train.labels[:3].tolist() == [0, 1, 2]
    e = load(tmp_path / "ent", tok, hf_cache)
    assert e.task == "entailment" and e.report.task_from == "inferred from the answers"
    assert e.train.labels[:3].tolist() == [1, 2, 0]  # ENTAILMENT_LABELS order: contradiction, entailment, neutral


def test_images_are_preprocessed_as_real_datasets_are(tok, tmp_path, hf_cache):
    """A non-square RGBA PNG comes out as feddat.data.real resizes the paper's datasets' images."""
    from feddat.data.real import _Images

    folder = tmp_path / "c"
    for split in ("train", "validation", "test"):
        write_folder(folder / split, vqa_rows(24))
    rgba = (np.random.default_rng(5).random((30, 50, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "train" / "0.png")
    client = load_client_folder(folder, tok, TEXT_LEN, 32, 0, cache_dir=hf_cache)
    ref = _Images(folder / "train", 32)
    assert ref.problem("0.png") is None
    assert torch.equal(client.train.batch(torch.tensor([0]))["pixel_values"][0],
                       pixel_tensor(ref.arrays["0.png"][None].copy())[0])


# --- lazy images ------------------------------------------------------------------------------------------

def test_a_batch_decodes_only_its_own_images_and_the_cache_stays_in_budget(tok, tmp_path, hf_cache, monkeypatch):
    client = load(split_client(tmp_path / "c", n_train=40), tok, hf_cache, image_cache_mb=0)
    decoded = []
    import feddat.data.lazy as lazy

    real_decode = lazy.decode_image
    monkeypatch.setattr(lazy, "decode_image", lambda src, size: decoded.append(src) or real_decode(src, size))
    train = client.train
    assert not torch.is_tensor(train.pixels) and train.pixels.shape == (40, 3, SIZE, SIZE)
    train.batch(torch.tensor([3, 17, 3]))
    assert sorted(Path(p).name for p in decoded) == ["17.png", "3.png"]
    table: ImageTable = train.images
    table.cache_bytes = 3 * SIZE * SIZE * 3  # room for three decoded images
    decoded.clear()
    first = train.batch(torch.arange(10))
    again = train.batch(torch.tensor([9, 8, 7]))  # the last three are kept: no decoding
    assert len(decoded) == 10 and table.cached == 3 and table._slab.nbytes == table.cache_bytes
    assert torch.equal(again["pixel_values"], first["pixel_values"][[9, 8, 7]])
    train.batch(torch.tensor([0]))
    assert len(decoded) == 11
    import pickle

    copy = pickle.loads(pickle.dumps(client))  # e.g. sent to a worker process: the decoded images stay behind
    assert copy.train.images.cached == 0
    assert torch.equal(copy.train.batch(torch.tensor([5, 1]))["pixel_values"],
                       train.batch(torch.tensor([5, 1]))["pixel_values"])


def test_a_folder_client_trains_and_scores_as_the_in_memory_one(tiny_backbone_dir, tmp_path, hf_cache):
    """Worker.fit and Worker.evaluate (with the prefix cache, which computes each split's frozen prefix through
    split.batch) give the numbers of the in-memory client of the same records; the pooled driver's raw-data size
    reads the lazy pixels."""
    from feddat.algorithms.base import LocalConfig
    from feddat.algorithms.registry import get_method
    from feddat.federation.pooled import raw_data_bytes
    from feddat.federation.worker import Worker
    from feddat.models.backbone import load_backbone

    _, tokenizer = load_backbone(tiny_backbone_dir)
    sizes = Sizes(24, 8, 16)
    mem = memory_clients("task", sizes, tokenizer, tmp_path / "cache")
    export_benchmark("task", 0, sizes, tmp_path / "clients", cache_dir=tmp_path / "cache")
    results = []
    for clients in (mem, load_clients_dir(tmp_path / "clients", tokenizer, TEXT_LEN, SIZE, 0, cache_dir=hf_cache)):
        by_name = {c.name: c for c in clients}
        backbone, _ = load_backbone(tiny_backbone_dir)  # a fresh one: a worker attaches its adapter slots to it
        torch.manual_seed(0)
        worker = Worker(get_method("fedavg-adapter"), backbone, 4, LocalConfig(batch_size=8))
        assert worker.prefix_cache is not None
        out = []
        for name in ("vqa", "pair", "choice"):
            data = by_name[name]
            state = worker.initial_state(0, data.head_spec, 0)
            fit = worker.fit(data, state, worker.initial_global(0), 0, 1, 0, 0)
            ev = worker.evaluate(data, fit.state, fit.update)
            out.append((fit.metrics, {k: v.clone() for k, v in fit.update.items()}, ev, raw_data_bytes(data)))
        results.append(out)
    for (m1, u1, e1, r1), (m2, u2, e2, r2) in zip(*results):
        assert m1 == m2 and r1 == r2
        assert all(torch.equal(u1[k], u2[k]) for k in u1)
        view = next(iter(e1))
        assert e1[view]["score"] == e2[view]["score"] and torch.equal(e1[view]["predictions"], e2[view]["predictions"])


# --- bad data ---------------------------------------------------------------------------------------------

def test_a_folder_without_metadata(tok, tmp_path, hf_cache):
    folder = tmp_path / "c"
    folder.mkdir()
    Image.fromarray(_image(0)).save(folder / "0.png")
    with pytest.raises(FedDATError, match=r"c has no metadata\.jsonl or metadata\.csv.*file_name"):
        load(folder, tok, hf_cache)
    write_folder(folder / "train", vqa_rows(24))
    (folder / "test").mkdir()
    with pytest.raises(FedDATError, match=r"test has no metadata\.jsonl"):
        load(folder, tok, hf_cache)


def test_a_mistyped_column_names_the_file_and_the_fix(tok, tmp_path, hf_cache):
    rows = [{"file_name": r["file_name"], "questoin": r["question"], "answer": r["answer"]} for r in vqa_rows(24)]
    for split in ("train", "validation", "test"):
        write_folder(tmp_path / "c" / split, rows)
    with pytest.raises(FedDATError) as e:
        load(tmp_path / "c", tok, hf_cache)
    msg = str(e.value)
    assert "train/metadata.jsonl: no column 'question'" in msg and "did you mean 'questoin'" in msg
    assert "--columns question=questoin" in msg and "\n" not in msg
    assert len(load(tmp_path / "c", tok, hf_cache, columns={"question": "questoin"}).train) == 24
    with pytest.raises(FedDATError, match="column mapping names 'qestion'.*did you mean 'question'"):
        load(tmp_path / "c", tok, hf_cache, columns={"qestion": "questoin"})


def test_a_bad_value_in_a_row_names_the_row(tok, tmp_path, hf_cache):
    rows = [{"file_name": f"{i}.png", "question": "the circle is red", "answer": "entailment"} for i in range(24)]
    rows[6]["answer"] = "maybe"
    for split in ("train", "validation", "test"):
        write_folder(tmp_path / "c" / split, rows)
    (tmp_path / "c" / "client.json").write_text('{"task": "entailment"}')
    with pytest.raises(FedDATError, match=r"train/metadata\.jsonl row 7: answer 'maybe' is not one of "
                                          r"contradiction, entailment, neutral"):
        load(tmp_path / "c", tok, hf_cache)


def test_an_image_that_does_not_decode_is_an_error_or_skipped_and_counted(tok, tmp_path, hf_cache, caplog):
    folder = split_client(tmp_path / "c")
    (folder / "train" / "5.png").write_bytes(b"this is not a png")
    data = (folder / "train" / "9.png").read_bytes()
    (folder / "train" / "9.png").write_bytes(data[:len(data) // 2])  # truncated
    with pytest.raises(FedDATError, match=r"train/metadata\.jsonl row 6: image .*5\.png cannot be decoded.*skip_bad"):
        load(folder, tok, hf_cache)
    with caplog.at_level(logging.WARNING, logger="feddat"):
        client = load(folder, tok, hf_cache, skip_bad=True)
    assert len(client.train) == 22 and client.report.skipped == {"train": 2} and client.report.bad_images == 2
    assert not {"5.png", "9.png"} & {Path(p).name for p in client.train.images.paths}
    assert "skipped 2 bad rows" in caplog.text
    client.train.batch(torch.arange(22))  # every remaining image decodes
    (folder / "train" / "7.png").unlink()  # gone after loading: the batch that needs it says which row it was
    fresh = load(folder, tok, hf_cache, skip_bad=True, check_images=False, image_cache_mb=0)
    with pytest.raises(FedDATError, match=r"image .*train/7\.png \(.*train/metadata\.jsonl row 8\) cannot be "
                                          r"decoded"):
        fresh.train.batch(torch.tensor([0, 7]))


def test_an_empty_split_is_an_error_naming_it(tok, tmp_path, hf_cache):
    folder = split_client(tmp_path / "c")
    (folder / "validation" / "metadata.jsonl").write_text("\n")
    with pytest.raises(FedDATError, match=r"client c: the validation split \(.*validation/metadata\.jsonl\) has no "
                                          r"items; add rows"):
        load(folder, tok, hf_cache)
    tiny = write_folder(tmp_path / "tiny", vqa_rows(2))  # two images cannot be split 70/10/20
    with pytest.raises(FedDATError, match=r"the (validation|test) split .* has no items; 2 images are too few"):
        load(tiny, tok, hf_cache)


def test_mixed_tasks_in_one_client(tok, tmp_path, hf_cache):
    folder = split_client(tmp_path / "c")
    pairs = [{**r, "file_name_2": "0.png", "answer": "true"} for r in vqa_rows(8)]
    write_folder(folder / "test", pairs)
    with pytest.raises(FedDATError, match=r"mixed tasks in .*train/metadata\.jsonl has neither file_name_2 nor "
                                          r"candidates but .*test/metadata\.jsonl is pair \(has file_name_2\)"):
        load(folder, tok, hf_cache)
    other = split_client(tmp_path / "d")
    (other / "client.json").write_text('{"task": "choice"}')
    with pytest.raises(FedDATError, match=r"no column 'candidates', which a choice client needs"):
        load(other, tok, hf_cache)
    rows = [{**r, "task": "vqa" if i % 2 else "pair"} for i, r in enumerate(vqa_rows(24))]
    write_folder(tmp_path / "e" / "train", rows)
    write_folder(tmp_path / "e" / "test", rows)
    with pytest.raises(FedDATError, match=r"column names several tasks \(pair, vqa\): mixed tasks"):
        load(tmp_path / "e", tok, hf_cache)


def test_a_test_answer_outside_the_training_label_space_is_counted_wrong(tok, tmp_path, hf_cache, caplog):
    folder = tmp_path / "c"
    write_folder(folder / "train", vqa_rows(24, answers=("red", "blue")))
    write_folder(folder / "validation", vqa_rows(6, answers=("red", "blue")))
    write_folder(folder / "test", vqa_rows(8, answers=("red", "purple")))
    with caplog.at_level(logging.WARNING, logger="feddat"):
        client = load(folder, tok, hf_cache)
    assert client.answers == ["blue", "red"]
    assert client.test.labels.tolist() == [1, -1] * 4
    assert client.report.unknown_answers == {"train": 0, "validation": 0, "test": 4}
    assert "4 of 8 test answers are not among its training answers" in caplog.text
    from feddat.algorithms.losses import scores

    perfect = torch.nn.functional.one_hot(client.test.labels.clamp(min=0), 2).float()
    assert scores(perfect, client.test.labels).tolist() == [1.0, 0.0] * 4  # counted as wrong


def test_a_client_with_few_training_items_warns(tok, tmp_path, hf_cache):
    folder = split_client(tmp_path / "c", n_train=5)
    with pytest.warns(UserWarning, match=r"client c: only 5 training items .*train/metadata\.jsonl"):
        load(folder, tok, hf_cache)


def test_two_clients_with_one_name(tok, tmp_path, hf_cache):
    with pytest.raises(FedDATError, match=r"two clients are named 'a': a=/x and a=/y; give each client its own name"):
        check_unique_names(["a=/x", "b=/z", "a=/y"])
    with pytest.raises(FedDATError, match="not NAME=PATH"):
        check_unique_names(["/only/a/path"])
    assert check_unique_names(["a=/x", "b=/y"]) == [("a", Path("/x")), ("b", Path("/y"))]
    root = tmp_path / "clients"
    split_client(root / "Clinic")
    if not (root / "clinic").exists():  # a case-sensitive file system: two folders whose names differ in case
        split_client(root / "clinic")
        with pytest.raises(FedDATError, match=r"two clients are named 'clinic'.*differ only in case"):
            load_clients_dir(root, tok, TEXT_LEN, SIZE, 0, cache_dir=hf_cache)
        (root / "Clinic").rename(root / "hospital")
    else:
        (root / "Clinic").rename(root / "hospital")
        split_client(root / "clinic")
    names = [c.name for c in load_clients_dir(root, tok, TEXT_LEN, SIZE, 0, cache_dir=hf_cache)]
    assert names == ["clinic", "hospital"]
    pairs = [f"x={root / 'clinic'}", f"y={root / 'hospital'}"]
    assert [c.name for c in load_clients(pairs, tok, TEXT_LEN, SIZE, 0, cache_dir=hf_cache)] == ["x", "y"]
    with pytest.raises(FedDATError, match="is one client's folder"):
        load_clients_dir(root / "clinic", tok, TEXT_LEN, SIZE, 0, cache_dir=hf_cache)


def test_parse_columns():
    assert parse_columns("image=img, question=q,answer=label,file_name_2=right") == \
        {"image": "img", "question": "q", "answer": "label", "image_2": "right"}
    with pytest.raises(FedDATError, match="not NAME=COLUMN"):
        parse_columns("image")


def test_chunked_tokenizing_gives_the_tensors_of_one_call(tok, monkeypatch):
    import feddat.data.folders as folders
    from feddat.data.pool import tokenize

    texts = [f"what color is the {w} ?" for w in ("circle", "square", "ball", "box", "triangle", "red", "x")]
    whole = tokenize(tok, texts, TEXT_LEN)
    monkeypatch.setattr(folders, "TOKENIZE_CHUNK", 3)
    chunked = folders._tokenize(tok, texts, TEXT_LEN)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
