"""End-to-end behaviour of `feddat run` on a tiny backbone and tiny data."""

import json

import pytest

from feddat.cli import main
from feddat.errors import FedDATError
from feddat.federation.inprocess import run


def test_same_seed_gives_same_numbers_and_other_seed_differs(tiny_config):
    a = run(tiny_config(method="feddat", seed=3), progress=False)
    b = run(tiny_config(method="feddat", seed=3), progress=False)
    c = run(tiny_config(method="feddat", seed=4), progress=False)
    assert a["final"]["clients"] == b["final"]["clients"]
    assert [r["train"] for r in a["rounds"]] == [r["train"] for r in b["rounds"]]
    assert [r["train"] for r in a["rounds"]] != [r["train"] for r in c["rounds"]]


def test_only_the_global_adapter_travels(tiny_config):
    feddat = run(tiny_config(method="feddat", rounds=1), progress=False)
    fedavg = run(tiny_config(method="fedavg-adapter", rounds=1), progress=False)
    local = run(tiny_config(method="local-adapter", rounds=1), progress=False)
    sent = feddat["rounds"][0]["bytes_sent"]
    assert sent == fedavg["rounds"][0]["bytes_sent"]
    # tiny backbone: hidden 32, 2 layers, reduction 4 -> bottleneck 8; per layer down (32x8 + 8) and up
    # (8x32 + 32), float32
    assert set(sent.values()) == {2 * (32 * 8 + 8 + 8 * 32 + 32) * 4}
    assert set(local["rounds"][0]["bytes_sent"].values()) == {0}


def test_cli_run_writes_results_and_curves(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--quiet", "--model-path", cfg.model_path, "--cache-dir", cfg.cache_dir,
            "--rounds", "2", "--train-per-client", "32", "--val-per-client", "8", "--test-per-client", "32",
            "--batch-size", "16", "--threads", "1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "curves.png").stat().st_size > 1000
    assert results["config"]["method"] == "feddat" and len(results["rounds"]) == 2
    final = results["final"]
    assert set(final["clients"]) == set(results["clients"]) and len(results["clients"]) == 5
    assert final["avg_score"] == pytest.approx(sum(final["clients"].values()) / 5)
    assert final["avg_score_se"] > 0
    assert set(final["views"]) == {"teacher", "student", "local"}
    for r in results["rounds"]:
        assert set(r["test"]) == set(results["clients"]) and set(r["bytes_sent"]) == set(results["clients"])
        assert all("loss" in m for m in r["train"].values())
    captured = capsys.readouterr()
    assert "clipart" in captured.out and "mean" in captured.out
    assert "Loading weights" not in captured.err and "it/s" not in captured.err  # --quiet: no bars at all
    # a second run into the same directory is refused and leaves the results alone
    before = (out / "results.json").read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--rounds", "0"], "rounds must be a positive integer"),
    (["--lr-adapter", "-1"], "lr-adapter must be a positive number"),
    (["--aggregation", "mean"], "aggregation must be one of"),
    (["--aggregation", "krum", "--byzantine", "2"], "krum needs n > 2f + 2 clients"),
    (["--aggregation", "bulyan"], "bulyan needs n >= 4f + 3 clients"),
    (["--train-per-client", "-1"], "train-per-client must be a positive integer (or 0: the benchmark's default)"),
    (["--fault-injection", "explode:night"], "unknown kind 'explode'"),
    (["--dp-noise-multiplier", "1"], "dp-noise-multiplier needs dp-clip > 0"),
    (["--model-path", "/nonexistent/vilt"], "could not load a ViLT backbone"),
])
def test_cli_errors_are_one_line_with_exit_code_2(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--quiet", "--cache-dir", str(tmp_path / "c")] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "results.json").exists()


def test_unreadable_cache_is_reported(tiny_config, tmp_path, capsys):
    """The generator's records and the client folders written from them: damage to either names the file and
    says to delete it; deleted, they are written again and the run's numbers are the same."""
    import shutil
    from pathlib import Path

    cfg = tiny_config(cache_dir=str(tmp_path / "own-cache"))
    first = run(cfg, progress=False)["final"]
    (folders,) = (Path(cfg.cache_dir) / "clients").iterdir()
    (folders / "clients.json").write_text("{")
    with pytest.raises(FedDATError, match="damaged.*delete that folder"):
        run(cfg, progress=False)
    shutil.rmtree(folders)
    assert run(cfg, progress=False)["final"] == first
    (folders / "clipart" / "test" / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(FedDATError, match=f"clipart.*delete {folders} and they will be written again"):
        run(cfg, progress=False)
    shutil.rmtree(folders)
    (cache,) = Path(cfg.cache_dir).glob("*.npz")
    cache.write_bytes(b"not a zip file")
    with pytest.raises(FedDATError, match="unreadable.*delete it"):
        run(cfg, progress=False)


@pytest.mark.parametrize("values, message", [
    ({"rounds": "3"}, "rounds must be a positive integer, got '3'"),
    ({"dp_clip": "1"}, "dp-clip must be a finite number >= 0 (0 = off), got '1'"),
    ({"fault_injection": 3}, "fault-injection must be a string"),
    ({"rouns": 3}, "unknown config keys ['rouns']"),
])
def test_config_file_of_wrong_types_is_refused(values, message, tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps(values))
    assert main(["run", "--out", str(tmp_path / "out"), "--quiet", "--config", str(tmp_path / "cfg.json")]) == 2
    assert message in capsys.readouterr().err


def test_malformed_input_records_are_named(tmp_path):
    from feddat.cli import _read_jsonl
    from feddat.errors import FedDATError

    path = tmp_path / "in.jsonl"
    path.write_text('{"image": "a.png", "question": "q"}\n{"image": "b.png"\n')
    with pytest.raises(FedDATError, match="in.jsonl line 2 is not JSON"):
        _read_jsonl(path)
    path.write_text('{"image": "a.png", "question": "q"}\n\n{"image": 3, "question": "q"}\n')
    with pytest.raises(FedDATError, match='line 3 needs string fields "image"'):
        _read_jsonl(path)
