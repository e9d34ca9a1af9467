"""The Flower engine gives the in-process engine's numbers for the same config and seed."""

from __future__ import annotations

import pytest

from feddat.config import RunConfig
from tiny import close

TOL = 1e-6


def test_flower_run_config_is_valid_and_matches_runconfig():
    """pyproject's Flower run config is accepted by flwr and gives RunConfig's defaults; records round-trip."""
    import tomllib
    from pathlib import Path

    from flwr.cli.config_utils import load_and_validate

    from feddat.federation.flower.client_app import client_index
    from feddat.federation.flower.records import config_from_values, config_to_record

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    load_and_validate(pyproject, check_module=True)
    values = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    cfg, out = config_from_values(values)
    assert cfg == RunConfig().validate() and out is None  # validate() fills in the benchmark's split sizes
    assert (cfg.train_per_client, values["train-per-client"]) == (400, 0)
    fields = {k.replace("_", "-") for k in RunConfig().to_dict()} - {"engine"}  # engine: flwr run is Flower
    assert fields <= values.keys(), f"missing from pyproject's Flower config: {sorted(fields - values.keys())}"
    custom = RunConfig(method="fedavg-adapter", rounds=3, model_path="/x", lr_adapter=1e-4, engine="flower")
    assert config_from_values(dict(config_to_record(custom)))[0] == custom.validate()
    assert client_index({"partition-id": 2, "num-partitions": 5}, 5) == 2
    assert client_index({"client-id": 4}, 5) == 4
    for bad in ({}, {"client-id": 5}, {"client-id": "x"}):
        with pytest.raises(Exception, match="client|integer|range"):
            client_index(bad, 5)


@pytest.mark.integration
def test_flower_matches_inprocess(tiny_config, tmp_path):
    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = tiny_config(method="feddat")
    ref = run(cfg, out_dir=None, progress=False)
    out = tmp_path / "flower"
    got = run_flower(cfg, out_dir=out, progress=False)

    assert (out / "results.json").exists()
    assert got["config"]["engine"] == "flower"
    assert {k: v for k, v in got["config"].items() if k != "engine"} == \
        {k: v for k, v in ref["config"].items() if k != "engine"}
    assert got["clients"] == ref["clients"] and got["label_spaces"] == ref["label_spaces"]
    assert len(got["rounds"]) == len(ref["rounds"]) == 2
    for g, r in zip(got["rounds"], ref["rounds"]):
        assert g["round"] == r["round"]
        assert g["bytes_sent"] == r["bytes_sent"]
        assert g["train"].keys() == r["train"].keys()
        for client in r["train"]:
            assert close(g["train"][client], r["train"][client]), (g["round"], client)
        assert close(g["test"], r["test"]), g["round"]
        assert abs(g["avg_score"] - r["avg_score"]) <= TOL
        assert "missing_clients" not in g
    gf, rf = got["final"], ref["final"]
    assert close(gf["clients"], rf["clients"])
    assert abs(gf["avg_score"] - rf["avg_score"]) <= TOL
    assert abs(gf["avg_score_se"] - rf["avg_score_se"]) <= TOL
    assert gf["views"].keys() == rf["views"].keys() == {"teacher", "student", "local"}
    for view in rf["views"]:
        assert close(gf["views"][view]["clients"], rf["views"][view]["clients"]), view
    assert gf.get("breakdown", {}).keys() == rf.get("breakdown", {}).keys()
    for client in rf.get("breakdown", {}):
        assert close(gf["breakdown"][client], rf["breakdown"][client]), client


@pytest.mark.integration
def test_flower_faults_and_dp_match_inprocess(tiny_config):
    """Crashed, flaky (retried) and hostile clients and central DP: both engines leave out, reject, retry and
    aggregate alike."""
    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = tiny_config(method="feddat", aggregation="equal", min_clients=4, round_retries=1, dp_clip=0.2,
                      dp_noise_multiplier=0.5,
                      fault_injection="crash:textured@2,flaky:clipart@1,nan:night@1,signflip:blurry")
    ref = run(cfg, progress=False)
    got = run_flower(cfg, progress=False)
    assert got["privacy"] == ref["privacy"]
    for g, r in zip(got["rounds"], ref["rounds"]):
        for key in ("missing_clients", "rejected_clients"):
            assert g.get(key, {}).keys() == r.get(key, {}).keys(), (g["round"], key)
        assert g.get("attempts") == r.get("attempts")
        assert close(g["update_norms"], r["update_norms"]) and g["bytes_sent"] == r["bytes_sent"]
        assert g["dp"]["noise_std"] == r["dp"]["noise_std"] and g["dp"]["clipped_clients"] == r["dp"]["clipped_clients"]
        for client in r["train"]:
            assert close(g["train"][client], r["train"][client]), (g["round"], client)
        assert close(g["test"], r["test"])
    assert ref["rounds"][0]["attempts"] == 2 and set(ref["rounds"][0]["rejected_clients"]) == {"night"}
    assert got["rounds"][1]["missing_clients"]["textured"] == "failed: injected crash of client textured in round 2"
    assert close(got["final"]["clients"], ref["final"]["clients"])


@pytest.mark.integration
def test_flower_round_failure_is_raised(tiny_config):
    from feddat.errors import FedDATError
    from feddat.federation.flower.server_app import run_flower

    with pytest.raises(FedDATError, match="round 1 failed: 4 of 5 clients .* min-clients=5"):
        run_flower(tiny_config(rounds=1, min_clients=5, fault_injection="crash:sketch@1"), progress=False)


@pytest.mark.integration
def test_flower_run_resumes_from_its_checkpoint(tiny_config, tmp_path):
    """The server checkpoints every round; clients keep their private state in client-state-dir. A run whose
    server died after the clients trained round 3 resumes after round 2 to the same numbers (the clients'
    round-3 states on disk are not used; night, which crashed in round 3, reads its round-2 state)."""
    import shutil

    from feddat.errors import FedDATError
    from feddat.federation.checkpoint import complete_checkpoints, load_checkpoint
    from feddat.federation.flower.server_app import run_flower

    cfg = tiny_config(rounds=3, client_state_dir=str(tmp_path / "states"), fault_injection="crash:night@3")
    out = tmp_path / "run"
    ref = run_flower(cfg, out_dir=out, progress=False)
    assert [p.name for p in complete_checkpoints(out)] == ["round-0002", "round-0003"]
    shutil.rmtree(complete_checkpoints(out)[-1])
    (out / "results.json").unlink()
    ck = load_checkpoint(out)
    assert ck.round == 2 and ck.states == {} and ck.config["engine"] == "flower"
    with pytest.raises(FedDATError, match="client-state-dir unset"):
        run_flower(cfg.__class__(**{**cfg.to_dict(), "client_state_dir": None}), out_dir=out, resume=ck)
    got = run_flower(cfg, out_dir=out, progress=False, resume=ck)
    for key in ("clients", "label_spaces", "final"):
        assert got[key] == ref[key], key
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in got["rounds"]] == [strip(r) for r in ref["rounds"]]
    assert set(got["rounds"][2]["missing_clients"]) == {"night"}


@pytest.mark.integration
def test_flower_task_benchmark_matches_inprocess(tiny_config):
    """Clients with different heads (VQA soft scores, image pairs, entailment, multiple choice) on Flower: the
    same numbers as in-process, and results.json says each client's task and metric."""
    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = tiny_config(benchmark="task", rounds=1)
    ref = run(cfg, progress=False)
    got = run_flower(cfg, progress=False)
    assert got["tasks"] == ref["tasks"]
    assert {c: t["task"] for c, t in got["tasks"].items()} == \
        {"vqa": "vqa", "pair": "pair", "entailment": "entailment", "choice": "choice"}
    assert got["tasks"]["vqa"]["metric"] == "vqa-score"
    assert close(got["final"]["clients"], ref["final"]["clients"])
