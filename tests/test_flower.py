"""The Flower engine gives the in-process engine's numbers for the same config and seed."""

from __future__ import annotations

import pytest

from feddat.config import RunConfig

TOL = 1e-6


def test_flower_app_config_is_valid_and_matches_runconfig():
    """pyproject's Flower run config is accepted by flwr and gives RunConfig's defaults; records round-trip."""
    import tomllib
    from pathlib import Path

    from flwr.cli.config_utils import load_and_validate

    from feddat.federation.flower_app import client_index, config_from_values, config_to_record

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    load_and_validate(pyproject, check_module=True)
    values = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    cfg, out = config_from_values(values)
    assert cfg == RunConfig() and out is None
    custom = RunConfig(method="fedavg-adapter", rounds=3, model_path="/x", lr_adapter=1e-4, engine="flower")
    assert config_from_values(dict(config_to_record(custom)))[0] == custom
    assert client_index({"partition-id": 2, "num-partitions": 5}, 5) == 2
    assert client_index({"client-id": 4}, 5) == 4
    for bad in ({}, {"client-id": 5}, {"client-id": "x"}):
        with pytest.raises(Exception, match="client|integer|range"):
            client_index(bad, 5)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOL for k in a)


@pytest.mark.integration
def test_flower_matches_inprocess(tiny_config, tmp_path):
    from feddat.federation.flower_app import run_flower
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
            assert _close(g["train"][client], r["train"][client]), (g["round"], client)
        assert _close(g["test"], r["test"]), g["round"]
        assert abs(g["avg_score"] - r["avg_score"]) <= TOL
        assert "missing_clients" not in g
    gf, rf = got["final"], ref["final"]
    assert _close(gf["clients"], rf["clients"])
    assert abs(gf["avg_score"] - rf["avg_score"]) <= TOL
    assert abs(gf["avg_score_se"] - rf["avg_score_se"]) <= TOL
    assert gf["views"].keys() == rf["views"].keys() == {"teacher", "student", "local"}
    for view in rf["views"]:
        assert _close(gf["views"][view]["clients"], rf["views"][view]["clients"]), view
    assert gf.get("breakdown", {}).keys() == rf.get("breakdown", {}).keys()
    for client in rf.get("breakdown", {}):
        assert _close(gf["breakdown"][client], rf["breakdown"][client]), client
