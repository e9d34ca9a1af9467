"""`feddat run` and `feddat eval` on the real datasets' formats (tiny fixtures written in their layouts)."""

from __future__ import annotations

import json
import shutil

import pytest

from feddat.cli import main
from feddat.errors import FedDATError

from test_real_datasets import MAKERS

SIZES = ["--train-per-client", "2", "--val-per-client", "1", "--test-per-client", "2"]


@pytest.fixture(scope="module")
def real_task_run(tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-task")
    MAKERS["task"](root / "data")
    code = main(["run", "--benchmark", "task", "--data-dir", str(root / "data"), "--model-path", str(tiny_backbone_dir),
                 "--rounds", "2", "--batch-size", "2", "--reduction", "4", "--threads", "1", "--quiet",
                 "--cache-dir", str(root / "cache"), "--out", str(root / "run"), *SIZES])
    assert code == 0
    return root, json.loads((root / "run" / "results.json").read_text())


def test_run_on_real_task_data_gives_each_client_its_task(real_task_run):
    root, results = real_task_run
    assert results["clients"] == ["vqav2", "nlvr2", "snli-ve", "vcr"]
    assert results["tasks"]["vqav2"] == {"task": "vqa", "metric": "vqa-score"}
    assert results["tasks"]["nlvr2"]["task"] == "pair" and results["tasks"]["vcr"]["task"] == "choice"
    assert results["label_spaces"]["snli-ve"] == ["contradiction", "entailment", "neutral"]
    assert results["config"]["data_dir"] == str(root / "data")
    assert all(0 <= v <= 1 for v in results["final"]["clients"].values())


def test_eval_reads_the_real_data_again_and_from_a_moved_copy(real_task_run, capsys):
    root, results = real_task_run
    assert main(["eval", "--run", str(root / "run"), "--out", str(root / "eval"), "--quiet"]) == 0
    assert json.loads((root / "eval" / "eval.json").read_text())["final"]["clients"] == results["final"]["clients"]
    shutil.copytree(root / "data", root / "moved")
    assert main(["eval", "--run", str(root / "run"), "--data-dir", str(root / "moved"), "--out", str(root / "eval2"),
                 "--quiet"]) == 0
    again = json.loads((root / "eval2" / "eval.json").read_text())
    assert again["final"]["clients"] == results["final"]["clients"]
    assert again["data"] == {"benchmark": "task", "data_dir": str(root / "moved"), "seed": 0, "split": "test"}
    assert "vqa: vqa-score" in capsys.readouterr().out


def test_eval_on_another_benchmark_names_the_missing_clients(real_task_run, capsys):
    from feddat.inference import evaluate_run

    root, _ = real_task_run
    with pytest.raises(FedDATError, match="domain in .* has no client vqav2, nlvr2, snli-ve, vcr"):
        evaluate_run(root / "run", benchmark="domain")
    assert main(["eval", "--run", str(root / "run"), "--data-dir", str(root / "nowhere"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_run_refuses_a_benchmark_without_real_form_and_a_missing_dir(tmp_path, capsys):
    assert main(["run", "--benchmark", "domain-noskill", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no real-data form" in capsys.readouterr().err
    assert main(["run", "--benchmark", "domain", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "not a directory" in capsys.readouterr().err
