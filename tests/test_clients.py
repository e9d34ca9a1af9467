"""One data path (feddat.data.clients): a benchmark is written once as client folders, and runs read folders."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest

from feddat.cli import main
from feddat.data import clients as clients_module
from feddat.data.clients import benchmark_folders, fingerprint, load_benchmark
from feddat.data.folders import load_client_folder
from feddat.data.partition import Partition
from feddat.data.questions import WORDS
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError
from feddat.federation.inprocess import run
from feddat.models.backbone import build_word_tokenizer

SIZES = Sizes(16, 8, 16)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def test_a_benchmark_run_is_a_run_on_its_exported_folders(tiny_config, tmp_path):
    """`feddat run --benchmark domain` and `feddat run --clients-dir` on the folders `feddat data --export` writes
    (its clients.json numbers them in the benchmark's order; a client's position seeds it): the same numbers,
    round by round."""
    cfg = tiny_config()
    export = tmp_path / "export"
    assert main(["data", "--benchmark", "domain", "--export", str(export), "--cache-dir", str(tmp_path / "c"),
                 "--train-per-client", str(cfg.train_per_client), "--val-per-client", str(cfg.val_per_client),
                 "--test-per-client", str(cfg.test_per_client)]) == 0
    bench = run(cfg, progress=False)
    own = run(tiny_config(clients_dir=str(export)), progress=False)
    assert own["clients"] == bench["clients"] and own["label_spaces"] == bench["label_spaces"]
    assert own["train_counts"] == bench["train_counts"]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in own["rounds"]] == [strip(r) for r in bench["rounds"]]
    assert own["final"]["clients"] == bench["final"]["clients"]


def test_the_folders_are_written_once_and_keyed_by_their_content(tmp_path):
    first = benchmark_folders("task", 0, SIZES, tmp_path)
    root = first[0][1].parent
    assert [n for n, _ in first] == ["vqa", "pair", "entailment", "choice"]  # the benchmark's order, not sorted
    assert json.loads((root / "vqa" / "client.json").read_text())["source"]["benchmark"] == "task"
    stamp = (root / "clients.json").stat().st_mtime_ns
    assert benchmark_folders("task", 0, SIZES, tmp_path) == first
    assert (root / "clients.json").stat().st_mtime_ns == stamp  # read, not written again
    other = benchmark_folders("task", 1, SIZES, tmp_path)[0][1].parent
    assert other != root and {p.name for p in (tmp_path / "clients").iterdir()} == {root.name, other.name}


def test_two_processes_writing_the_same_folders_at_once(tmp_path, monkeypatch):
    """Each writes beside the final folder; the first rename wins, the other's copy is removed and the winner's
    folders are read."""
    real_export = clients_module.export_benchmark
    winner = {}

    def racing(benchmark, seed, sizes, out_dir, *args, **kwargs):
        written = real_export(benchmark, seed, sizes, out_dir, *args, **kwargs)
        final = Path(out_dir).parent / Path(out_dir).name.split(".tmp-")[0].lstrip(".")
        other = final.parent / ".other"  # another process finishes first
        real_export(benchmark, seed, sizes, other, *args, **kwargs)   # its clients.json included
        os.rename(other, final)
        winner["inode"] = final.stat().st_ino
        return written

    monkeypatch.setattr(clients_module, "export_benchmark", racing)
    got = benchmark_folders("domain", 0, SIZES, tmp_path)
    root = got[0][1].parent
    assert root.stat().st_ino == winner["inode"]
    assert [p.name for p in (tmp_path / "clients").iterdir()] == [root.name]  # no temporary folder left
    assert all(p.is_dir() for _, p in got)


def test_a_partition_is_written_with_its_shared_label_space(tok, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few training items per part
        parts = load_benchmark("domain", 0, SIZES, tok, 12, tmp_path, partition=Partition("iid", 3))
    assert [c.name for c in parts] == ["part-0", "part-1", "part-2"]
    assert all(c.answers == parts[0].answers for c in parts)
    assert len(parts[0].answers) > 1
    info = json.loads((tmp_path / "clients").glob("domain-*/part-1/client.json").__next__().read_text())
    assert info["answers"] == parts[0].answers and info["source"]["partition"]["kind"] == "iid"


def test_a_saved_models_label_space_is_kept_when_scoring(tok, tmp_path):
    """label_spaces (scoring a saved model on another benchmark's client of its name): answers outside it are
    label -1 and count as wrong."""
    plain = {c.name: c for c in load_benchmark("domain", 0, SIZES, tok, 12, tmp_path)}
    given = ["red", "blue"]
    fixed = load_benchmark("domain", 0, SIZES, tok, 12, tmp_path, label_spaces={"night": given})
    night = next(c for c in fixed if c.name == "night")
    assert night.answers == given and night.report.answers_from == "given"
    assert next(c for c in fixed if c.name == "clipart").answers == plain["clipart"].answers
    rows = [json.loads(x) for x in (Path(plain["night"].report.path) / "test" / "metadata.jsonl").read_text()
            .splitlines()]
    want = [given.index(r["answer"]) if r["answer"] in given else -1 for r in rows]
    assert night.test.labels.tolist() == want and 0 < want.count(-1) < len(want)


def test_a_real_data_fingerprint_follows_the_files(tmp_path):
    data = tmp_path / "data"
    (data / "vqa" / "images").mkdir(parents=True)
    (data / "vqa" / "questions.json").write_text("[1]")
    (data / "vqa" / "images" / "1.jpg").write_bytes(b"x")
    before = fingerprint(data)
    assert fingerprint(data) == before
    (data / "vqa" / "images" / "1.jpg").write_bytes(b"yy")  # an image rewritten in place: not stat'ed
    assert fingerprint(data) == before
    (data / "vqa" / "questions.json").write_text("[1, 2]")  # annotations rewritten
    changed = fingerprint(data)
    assert changed != before
    time.sleep(0.01)
    (data / "vqa" / "images" / "2.jpg").write_bytes(b"z")  # an image added: its folder changed
    assert fingerprint(data) != changed


# --- client.json "answers" ----------------------------------------------------------------------------------

def _folder(root: Path, info: dict | None) -> Path:
    from test_folders import split_client

    split_client(root)
    if info is not None:
        (root / "client.json").write_text(json.dumps(info))
    return root


def test_client_json_answers_fix_the_label_space(tok, tmp_path):
    path = _folder(tmp_path / "c", {"task": "vqa", "answers": ["red", "yellow"]})
    client = load_client_folder(path, tok, 12, 48, 0, cache_dir=tmp_path / "hf")
    assert client.answers == ["red", "yellow"] and client.report.answers_from == "client.json"
    assert client.report.unknown_answers["test"] > 0  # blue and green: outside, counted wrong
    again = load_client_folder(path, tok, 12, 48, 0, cache_dir=tmp_path / "hf", answers=["blue", "red"])
    assert again.answers == ["blue", "red"] and again.report.answers_from == "given"


@pytest.mark.parametrize("answers, message", [
    ("red", "answers must be a list of distinct non-empty strings"),
    (["red", "red"], "answers must be a list of distinct non-empty strings"),
    ([], "answers must be a list of distinct non-empty strings"),
])
def test_bad_client_json_answers_are_refused(tok, tmp_path, answers, message):
    path = _folder(tmp_path / "c", {"task": "vqa", "answers": answers})
    with pytest.raises(FedDATError, match=f"client.json: {message}"):
        load_client_folder(path, tok, 12, 48, 0, cache_dir=tmp_path / "hf")


def test_client_json_answers_are_for_vqa_clients_only(tok, tmp_path):
    path = _folder(tmp_path / "c", {"task": "entailment", "answers": ["yes"]})
    with pytest.raises(FedDATError, match="answers sets a VQA client's label space"):
        load_client_folder(path, tok, 12, 48, 0, cache_dir=tmp_path / "hf")


def test_a_clients_json_orders_the_folders_it_lists_first(tmp_path):
    from feddat.data.folders import client_dirs, write_order

    for name in ("b", "a", "c", "d"):
        (tmp_path / name).mkdir()
    assert [n for n, _ in client_dirs(tmp_path)] == ["a", "b", "c", "d"]  # no clients.json: by name
    write_order(tmp_path, ["c", "a", "gone"])
    write_order(tmp_path, ["a", "b"])                                        # an export into the same folder adds
    assert json.loads((tmp_path / "clients.json").read_text()) == ["c", "a", "gone", "b"]
    assert [n for n, _ in client_dirs(tmp_path)] == ["c", "a", "b", "d"]  # listed first, the rest by name
    (tmp_path / "clients.json").write_text('{"c": 1}')
    with pytest.raises(FedDATError, match=r"clients.json is not a list of client folder names.*delete it"):
        client_dirs(tmp_path)
    (tmp_path / "clients.json").write_text("[c, a")
    with pytest.raises(FedDATError, match=r"clients.json is unreadable"):
        client_dirs(tmp_path)
