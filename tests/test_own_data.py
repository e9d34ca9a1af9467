"""Training on the user's own client folders (feddat.data.folders) from the command line: run, eval, predict."""

import json
from collections import Counter

import pytest

from feddat.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The Domain benchmark written as five client folders, as `feddat data --export` writes them."""
    root = tmp_path_factory.mktemp("own")
    cache = tmp_path_factory.mktemp("cache")
    assert main(["data", "--benchmark", "domain", "--export", str(root / "clients"), "--cache-dir", str(cache),
                 "--train-per-client", "32", "--val-per-client", "8", "--test-per-client", "32"]) == 0
    return root / "clients"


def _flags(tiny_backbone_dir, tmp_path):
    return ["--model-path", str(tiny_backbone_dir), "--cache-dir", str(tmp_path / "cache"), "--rounds", "2",
            "--batch-size", "16", "--threads", "1", "--reduction", "4", "--quiet"]


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_run_on_a_folder_of_client_folders(folders, tiny_backbone_dir, tmp_path, engine, capsys):
    out = tmp_path / "run"
    assert main(["run", "--clients-dir", str(folders), "--out", str(out), "--engine", engine,
                 *_flags(tiny_backbone_dir, tmp_path)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["clients"] == ["clipart", "textured", "night", "sketch", "blurry"]  # the export's clients.json
    assert set(results["final"]["clients"]) == set(results["clients"])
    assert f"on {folders}" in capsys.readouterr().out
    if engine == "inprocess":  # the saved models re-score as the run scored them, from the same folders
        assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
        again = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert again["final"]["clients"] == pytest.approx(results["final"]["clients"], abs=1e-6)
        image = folders / "clipart" / "test" / "000000.png"
        if not image.exists():
            image = next((folders / "clipart" / "test").glob("*.png"))
        capsys.readouterr()
        assert main(["predict", "--run", str(out), "--client", "clipart", "--image", str(image),
                     "--question", "what color is the circle ?", "--top-k", "2"]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_clients_one_by_one_and_their_names(folders, tiny_backbone_dir, tmp_path):
    out = tmp_path / "pairs"
    assert main(["run", "--client", f"a={folders / 'night'}", "--client", f"b={folders / 'sketch'}", "--out",
                 str(out), "--method", "fedavg-adapter", *_flags(tiny_backbone_dir, tmp_path)]) == 0
    assert json.loads((out / "results.json").read_text())["clients"] == ["a", "b"]


@pytest.mark.parametrize("flags, message", [
    (["--client", "a=X", "--client", "a=Y"], "two clients are named 'a'"),
    (["--client", "noequals"], "is not NAME=PATH"),
    (["--clients-dir", "DIR", "--data-dir", "DIR"], "cannot go with data-dir"),
    (["--clients-dir", "DIR", "--client", "a=DIR/clipart"], "clients-dir cannot go with client: give the clients"),
    (["--clients-dir", "DIR", "--partition", "iid"], "partition iid needs num-clients >= 1"),
    (["--clients-dir", "DIR", "--nodes", "2"], "drop clients-dir"),
    (["--clients-dir", "DIR/none"], "does not exist"),
    (["--clients-dir", "DIR", "--columns", "questoin"], "column mapping 'questoin' is not NAME=COLUMN"),
])
def test_bad_own_data_options_stop_with_one_line(folders, tmp_path, flags, message, capsys):
    flags = [f.replace("DIR", str(folders)) for f in flags]
    assert main(["run", "--out", str(tmp_path / "bad"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_describe_client_folders(folders, tmp_path, capsys):
    """`feddat data --clients-dir` writes the sheets and statistics a benchmark gets, read as a run reads them."""
    from PIL import Image

    out = tmp_path / "report"
    assert main(["data", "--clients-dir", str(folders), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["clients"]) == ["clipart", "textured", "night", "sketch", "blurry"]  # as clients.json lists
    for name, c in stats["clients"].items():
        assert c["sizes"] == {"train": 32, "val": 8, "test": 32} and c["task"] == "vqa"
        assert sum(c["answers"].values()) == sum(c["qtypes"].values()) == 72
        rows = [json.loads(x) for x in (folders / name / "test" / "metadata.jsonl").read_text().splitlines()]
        assert Counter(r["qtype"] for r in rows) <= Counter(c["qtypes"])  # the folder's own question types
        assert Image.open(out / f"samples_{name}.png").size[0] > 100
    assert "| clipart | 32 | 8 | 32 |" in capsys.readouterr().out
    assert main(["data", "--client", f"a={folders / 'night'}", "--out", str(tmp_path / "one"), "--cache-dir",
                 str(tmp_path / "c")]) == 0
    assert list(json.loads((tmp_path / "one" / "stats.json").read_text())["clients"]) == ["a"]
    capsys.readouterr()
    assert main(["data", "--clients-dir", str(folders)]) == 2
    assert "needs --out DIR" in capsys.readouterr().err


def test_a_partition_of_your_folders(folders, tiny_backbone_dir, tmp_path):
    """--partition over client folders pools their items and splits them over num-clients clients (each item
    once with iid), sharing one label space; a run on it trains and its saved models re-score alike."""
    from feddat.data.folders import load_partitioned_folders
    from feddat.data.partition import Partition
    from feddat.models.backbone import load_backbone

    _, tok = load_backbone(tiny_backbone_dir)
    pairs = [(n, folders / n) for n in ("clipart", "night")]
    parts = load_partitioned_folders(pairs, Partition("iid", 3), tok, 8, 48, 0, cache_dir=tmp_path / "c")
    assert [c.name for c in parts] == ["part-0", "part-1", "part-2"]
    questions = Counter(q for c in parts for s in (c.train, c.val, c.test) for q in s.questions)
    rows = [json.loads(x) for n, _ in pairs for s in ("train", "validation", "test")
            for x in (folders / n / s / "metadata.jsonl").read_text().splitlines()]
    assert questions == Counter(r["question"] for r in rows)  # every item of both folders, once
    assert all(c.answers == parts[0].answers for c in parts) and all(len(c.test) >= 1 for c in parts)
    skewed = load_partitioned_folders(pairs, Partition("pathological", 3, classes=2), tok, 8, 48, 0,
                                      cache_dir=tmp_path / "c")
    for c in skewed:  # two answers per client
        labels = c.train.labels if c.train.labels.dim() == 1 else c.train.labels.argmax(dim=1)
        assert len(set(labels.tolist())) <= 2

    out = tmp_path / "run"
    assert main(["run", "--clients-dir", str(folders), "--partition", "dirichlet", "--num-clients", "4", "--out",
                 str(out), "--method", "fedavg-adapter", *_flags(tiny_backbone_dir, tmp_path)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["clients"] == ["part-0", "part-1", "part-2", "part-3"]
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["final"]["clients"] == pytest.approx(results["final"]["clients"], abs=1e-6)


@pytest.mark.integration
def test_compare_and_tune_on_your_folders_with_client_sampling(folders, tiny_backbone_dir, tmp_path):
    """`feddat compare` and `feddat tune` take --clients-dir as `run` does; --clients-per-round samples among the
    folders' clients (each round's trained clients in the run's history)."""
    flags = [*_flags(tiny_backbone_dir, tmp_path), "--clients-dir", str(folders), "--clients-per-round", "2"]
    out = tmp_path / "compare"
    assert main(["compare", "--methods", "feddat,fedavg-adapter", "--seeds", "0", "--out", str(out), *flags]) == 0
    table = json.loads((out / "table.json").read_text())
    assert {m: row["status"] for m, row in table["methods"].items()} == {"feddat": "ok", "fedavg-adapter": "ok"}
    for m in ("feddat", "fedavg-adapter"):
        results = json.loads((out / m / "seed0" / "results.json").read_text())
        assert results["clients"] == ["clipart", "textured", "night", "sketch", "blurry"]
        assert results["config"]["clients_dir"] == str(folders)
        assert all(len(r["train"]) == 2 for r in results["rounds"])
    tuned = tmp_path / "tune"
    assert main(["tune", "--method", "fedavg-adapter", "--grid", "lr_adapter=0.001,0.01", "--out", str(tuned), *flags]) == 0
    search = json.loads((tuned / "tune.json").read_text())["methods"]["fedavg-adapter"]
    assert [s["status"] for s in search["settings"]] == ["ok", "ok"] and search["best"]["lr_adapter"] in (0.001, 0.01)
