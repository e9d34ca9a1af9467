"""Experiment tracking: what TensorBoard and MLflow (offline stores) hold equals results.json."""

from __future__ import annotations

import json
import sys

import pytest

from feddat.cli import main
from feddat.errors import FedDATError
from feddat.eval.tracking import config_params, final_metrics, round_metrics
from feddat.federation.inprocess import run


def expected_metrics(results: dict) -> dict[str, dict[int, float]]:
    """{name: {step: value}} that a tracker must hold for a results.json."""
    out: dict[str, dict[int, float]] = {}
    for entry in results["rounds"]:
        for k, v in round_metrics(entry).items():
            out.setdefault(k, {})[entry["round"] + 1] = v
    for k, v in final_metrics(results).items():
        out.setdefault(k, {})[results["rounds"][-1]["round"] + 1] = v
    return out


def test_metric_names_follow_results_json():
    entry = {"round": 0, "train": {"a": {"loss": 1.5}}, "bytes_sent": {"a": 10}, "seconds": 0.5,
             "test": {"a": 0.25}, "avg_score": 0.25}
    assert round_metrics(entry) == {"test/a": 0.25, "avg_score": 0.25, "train/a/loss": 1.5, "bytes_sent/a": 10.0,
                                    "seconds": 0.5}
    final = {"final": {"clients": {"a": 0.5}, "avg_score": 0.5, "avg_score_se": 0.1,
                       "views": {"student": {"clients": {"a": 0.4}, "avg_score": 0.4}},
                       "breakdown": {"a": {"qtype:color": 1.0}}}, "wall_seconds": 3.0}
    assert final_metrics(final) == {"final/clients/a": 0.5, "final/avg_score": 0.5, "final/avg_score_se": 0.1,
                                    "final/views/student/clients/a": 0.4, "final/views/student/avg_score": 0.4,
                                    "final/breakdown/a/qtype:color": 1.0, "wall_seconds": 3.0}
    assert config_params({"model_path": None, "rounds": 2, "lr": 0.1}) == {"model_path": "None", "rounds": 2,
                                                                           "lr": 0.1}


def test_tensorboard_logs_what_results_json_holds(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = tiny_config(tracker="tensorboard")
    results = run(cfg, out_dir=tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["tracker"] == "tensorboard"
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    want = expected_metrics(results)
    assert set(ea.Tags()["scalars"]) == set(want)
    for name, by_step in want.items():
        got = {e.step: e.value for e in ea.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-6), name  # TensorBoard stores float32
    for client in results["clients"]:
        assert f"test/{client}" in want and f"train/{client}/kd_student" in want and f"bytes_sent/{client}" in want
    start = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    params = config_params(results["config"])
    assert set(hparams) == set(params)
    assert hparams["method"].string_value == "feddat" and hparams["rounds"].number_value == 2
    assert hparams["cache_dir"].string_value == cfg.cache_dir and hparams["tracker"].string_value == "tensorboard"


def test_mlflow_logs_what_results_json_holds(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "feddat-test")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet", "--tracker", "mlflow", "--model-path", tiny_config().model_path,
                 "--cache-dir", tiny_config().cache_dir, "--rounds", "2", "--train-per-client", "32",
                 "--val-per-client", "8", "--test-per-client", "32", "--batch-size", "16", "--threads", "1",
                 "--method", "fedavg-adapter"]) == 0
    results = json.loads((out / "results.json").read_text())
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run_info,) = client.search_runs([client.get_experiment_by_name("feddat-test").experiment_id])
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "run"
    assert run_info.data.params == {k: str(v) for k, v in config_params(results["config"]).items()}
    want = expected_metrics(results)
    assert set(run_info.data.metrics) == set(want)
    for name, by_step in want.items():
        history = client.get_metric_history(run_info.info.run_id, name)
        assert {m.step: m.value for m in history} == by_step, name  # MLflow keeps doubles: exact


def test_missing_tracker_package_says_how_to_install(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FedDATError, match=r"needs the mlflow package.*pip install 'feddat\[track\]'"):
        run(tiny_config(tracker="mlflow"), progress=False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(FedDATError, match=r"needs the wandb package.*pip install 'feddat\[track\]'"):
        run(tiny_config(tracker="wandb"), progress=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(FedDATError, match=r"needs the tensorboard package.*pip install 'feddat\[track\]'"):
        run(tiny_config(tracker="tensorboard"), progress=False)


def test_unknown_tracker_is_a_config_error(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "o"), "--quiet", "--tracker", "neptune"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown tracker 'neptune'" in err and len(err.splitlines()) == 1


def test_wandb_offline(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = run(tiny_config(tracker="wandb", rounds=1), out_dir=tmp_path / "run", progress=False)
    assert results["final"] is not None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
