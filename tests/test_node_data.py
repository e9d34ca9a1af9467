"""A federation whose SuperNodes bring their own data (`nodes`, node config data=PATH): the config's rules, what a
node runs, and a real deployment where each node holds only its own folder and only the global adapter and
aggregate numbers reach the server."""

from __future__ import annotations

import json
import shutil
import time
import tomllib

import pytest

from feddat.config import RunConfig
from feddat.errors import FedDATError
from tiny import close

TOL = 1e-6


# ----- fast: the config and a node's view -----
@pytest.mark.parametrize("values, message", [
    (dict(nodes=3, data_dir="."), "drop data-dir"),
    (dict(nodes=3, partition="iid", num_clients=4), "drop partition iid"),
    (dict(nodes=3, clients=2), "drop clients"),
    (dict(nodes=3, clients_dir="."), "drop clients-dir"),
    (dict(nodes=-1), "nodes must be"),
    (dict(nodes=2, min_clients=3), "min-clients must be an integer from 1 to"),
    (dict(nodes=2, clients_per_round=3), "clients-per-round must be a count from 1 to the run's 2 clients"),
])
def test_nodes_config_is_checked(values, message):
    with pytest.raises(FedDATError, match=message):
        RunConfig(**values).validate()


def test_nodes_size_the_federation_and_name_no_client():
    cfg = RunConfig(nodes=4, clients_per_round=0.5, min_clients=2).validate()
    assert cfg.n_clients == 4 and cfg.round_size() == 2 and cfg.client_names() == []
    assert cfg.max_train_examples > 10 ** 9  # the nodes' own counts are not capped by a benchmark's size


def test_a_resume_needs_every_node_to_keep_its_state_on_disk(tmp_path):
    """SuperNodes may set client-state-dir in their own node config: whether a run can go on is what they
    report, and a node that kept its state in memory is named."""
    import torch

    from feddat.federation.checkpoint import Checkpoint
    from feddat.federation.flower.server_app import check_resumable

    cfg = RunConfig(nodes=2, rounds=3).validate()
    ck = Checkpoint(tmp_path, 1, cfg.to_dict(), None, {}, {}, torch.zeros(1), {"rounds": []})
    check_resumable(cfg, ck, {})                             # before the nodes answer: only the round is checked
    check_resumable(cfg, ck, {"a": True, "b": True})
    with pytest.raises(FedDATError, match=r"client\(s\) b keep their private state in memory.*client-state-dir"):
        check_resumable(cfg, ck, {"a": True, "b": False})
    with pytest.raises(FedDATError, match="client-state-dir unset"):  # a simulation: its run config decides
        check_resumable(cfg, ck)
    with pytest.raises(FedDATError, match="the run is complete"):
        check_resumable(cfg, Checkpoint(tmp_path, 3, cfg.to_dict(), None, {}, {}, torch.zeros(1), {}), {})


def test_nodes_need_supernodes(tmp_path):
    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = RunConfig(nodes=2).validate()
    for engine in (run, run_flower):
        with pytest.raises(FedDATError, match="needs SuperNodes of their own"):
            engine(cfg, progress=False)


def test_a_node_runs_its_own_folder_as_its_one_client(tmp_path):
    from feddat.federation.flower.client_app import node_data_config

    folder = tmp_path / "clinic-a"
    folder.mkdir()
    server = RunConfig(nodes=3).validate()
    cfg = node_data_config(server, {"data": str(folder)})
    assert cfg.client_folders() == [("clinic-a", folder.resolve())] and cfg.n_clients == 3
    assert node_data_config(server, {"data": str(folder), "name": "a"}).client_names() == ["a"]
    with pytest.raises(FedDATError, match="start it with --node-config 'data=PATH'"):
        node_data_config(server, {"client-id": 0})
    with pytest.raises(FedDATError, match="no such file or folder on this node"):
        node_data_config(server, {"data": str(tmp_path / "gone")})
    with pytest.raises(FedDATError, match="a client name is a folder-like word"):
        node_data_config(server, {"data": str(folder), "name": "a,b"})
    with pytest.raises(FedDATError, match="start the run with nodes="):
        node_data_config(RunConfig().validate(), {"data": str(folder)})
    assert node_data_config(RunConfig().validate(), {"client-id": 1}) == RunConfig().validate()


def test_the_standard_error_from_reported_variances_equals_the_per_item_one():
    import torch

    from feddat.eval.results import History, item_var
    from feddat.federation.rounds import finish_history

    class Method:
        predict_view, report_views = "student", ()

    scores = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.5, 1.0]}
    full = {c: {"student": {"score": sum(s) / len(s), "scores": torch.tensor(s)}} for c, s in scores.items()}
    kept = {c: {"student": {"score": sum(s) / len(s), "item_var": item_var(s)}} for c, s in scores.items()}
    got = []
    for evals in (full, kept):
        h = History({}, list(scores), {})
        finish_history(h, Method(), evals, 1.0)
        got.append(h.data["final"]["avg_score_se"])
    assert got[0] == pytest.approx(got[1], abs=1e-12) and got[0] > 0


# ----- a deployment of SuperNodes with their own folders -----
def _run_config(cfg) -> dict:
    default = RunConfig()
    return {k.replace("_", "-"): v for k, v in cfg.to_dict().items()
            if k != "engine" and v is not None and v != getattr(default, k)}


@pytest.mark.integration
def test_a_federation_of_nodes_with_their_own_folders(tiny_config, tmp_path, capsys):
    """Three SuperNodes (TLS and authentication on), each given a client folder that exists only in its own
    directory: the run gives the in-process numbers on the same folders; the server's messages from the clients
    held only the global adapter's arrays and numbers; each model was saved on its node's disk and nowhere else,
    and re-scores there."""
    from feddat.cli import main
    from feddat.federation.checkpoint import complete_checkpoints, load_checkpoint
    from feddat.federation.deploy.deployment import Deployment
    from feddat.federation.inprocess import run

    t0 = time.time()
    export = tmp_path / "export"
    assert main(["data", "--benchmark", "domain", "--export", str(export), "--cache-dir", str(tmp_path / "gen"),
                 "--train-per-client", "32", "--val-per-client", "8", "--test-per-client", "32"]) == 0
    work = tmp_path / "deploy"
    names = ["clipart", "night", "textured"]
    folders = []
    for i, name in enumerate(names):  # each party's folder on its own "machine" only
        folders.append(shutil.copytree(export / name, work / "nodes" / str(i) / "data" / name))
    shutil.rmtree(export)
    ref = run(tiny_config(client_data=",".join(f"{n}={f}" for n, f in zip(names, folders)), eval_every=2,
                          cache_dir=str(tmp_path / "ref-cache")), progress=False)
    cfg = tiny_config(nodes=3, eval_every=2)
    with Deployment(work, client_data=folders, echo=None) as d:
        got = d.run(_run_config(cfg), timeout=900)
    capsys.readouterr()

    run_config = tomllib.loads((work / "run-config.toml").read_text())
    assert run_config["nodes"] == 3 and not any(str(f) in json.dumps(run_config) for f in folders)
    assert got["clients"] == ref["clients"] == names
    assert got["train_counts"] == {n: 32 for n in names} and got["label_spaces"] == {}
    for g, r in zip(got["rounds"], ref["rounds"]):
        for client in r["train"]:
            assert close(g["train"][client], r["train"][client], TOL), (g["round"], client)
    assert close(got["final"]["clients"], ref["final"]["clients"], TOL)
    assert got["final"]["avg_score_se"] == pytest.approx(ref["final"]["avg_score_se"], abs=1e-9)

    # what reached the server: per reply, its records' keys and value types
    shared = set(load_checkpoint(d.out).global_state)
    lines = [json.loads(x) for x in (d.out / "received.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"describe", "start", "train", "evaluate"}
    for x in lines:
        records = x["content"]
        assert set(records) <= {"arrays", "metrics", "client"}, x
        assert set(records.get("arrays", {}).get("arrays", {})) in (set(), shared), x  # the global adapter only
        assert set(records["metrics"]["metrics"].values()) <= {"int", "float"}, x   # numbers, no lists
        if x["stage"] == "describe":
            assert set(records["metrics"]["metrics"]) == {"num-examples", "keeps-state"}
            assert records["client"] == {"config": {"name": "str", "task": "str"}}
        else:
            assert "client" not in records, x
            assert "scores" not in records["metrics"]["metrics"]
        if x["stage"] in ("start", "evaluate"):
            assert "arrays" not in records, x

    # every node kept its own model and scores on its own disk, and nowhere else has them
    assert not (d.out / "clients").exists()
    for i, (name, folder) in enumerate(zip(names, folders)):
        node_out = work / "nodes" / str(i) / "out"
        assert f"serving client {name} from {folder}" in (work / "logs" / f"supernode-{i}.log").read_text()
        assert [p.name for p in (node_out / "clients").iterdir()] == [name]
        mine = json.loads((node_out / "results.json").read_text())
        assert mine["config"]["client_data"] == f"{name}={folder}"    # the only data it was given
        assert mine["final"]["clients"][name] == pytest.approx(got["final"]["clients"][name], abs=TOL)
    assert main(["eval", "--run", str(work / "nodes" / "1" / "out"), "--out", str(tmp_path / "eval"),
                 "--quiet"]) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["final"]["clients"]["night"] == pytest.approx(got["final"]["clients"]["night"], abs=TOL)

    # the server died after the last round: resumed from round 1's checkpoint (each node reads its private state
    # of round 1 from its own client-state dir), the run ends with the same numbers
    ckpts = complete_checkpoints(d.out)
    assert [p.name for p in ckpts] == ["round-0001", "round-0002"]
    shutil.rmtree(ckpts[-1])
    with Deployment(work, client_data=folders, echo=None) as d:
        resumed = d.run({**_run_config(cfg), "resume-dir": str(d.out)}, timeout=900)
    assert resumed["rounds"][0] == got["rounds"][0]  # round 1 from the checkpoint's history
    assert close(resumed["final"]["clients"], got["final"]["clients"], TOL)
    print(f"deployment of nodes with their own data: {time.time() - t0:.0f} s")
