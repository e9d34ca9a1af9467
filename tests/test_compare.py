"""The comparison harness (feddat compare), the centralised reference and the validation-split search."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from feddat.algorithms.registry import METHODS
from feddat.cli import main
from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.experiments.sweep import resolve_methods, run_comparison
from feddat.experiments.tune import parse_grid, run_tune

TINY = dict(rounds=2, train_per_client=32, val_per_client=8, test_per_client=32, batch_size=16, threads=1,
            reduction=4)


@pytest.fixture(scope="module")
def base(tiny_backbone_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return RunConfig(model_path=str(tiny_backbone_dir), cache_dir=str(cache), **TINY).validate()


@pytest.fixture(scope="module")
def compared(base, tmp_path_factory):
    """fedavg-adapter, head-only and the centralised reference over seeds 0 and 1."""
    out = tmp_path_factory.mktemp("compare")
    table = run_comparison(base, ["fedavg-adapter", "head-only", "centralised-adapter"], [0, 1], out,
                           progress=False, log=lambda line: None)
    return out, table


def _results(out, method, seed):
    return json.loads((out / method / f"seed{seed}" / "results.json").read_text())


@pytest.mark.integration
def test_table_holds_mean_and_std_over_seeds_parameters_and_bytes(compared):
    out, table = compared
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(table))
    row = table["methods"]["fedavg-adapter"]
    per_seed = [_results(out, "fedavg-adapter", s)["final"]["avg_score"] for s in (0, 1)]
    assert row["avg_score_per_seed"] == per_seed
    assert row["avg_score"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert row["avg_score"]["std"] == pytest.approx(statistics.stdev(per_seed))
    assert row["avg_score"]["se"] == pytest.approx(statistics.stdev(per_seed) / math.sqrt(2))
    clipart = [_results(out, "fedavg-adapter", s)["final"]["clients"]["clipart"] for s in (0, 1)]
    assert row["clients"]["clipart"]["mean"] == pytest.approx(sum(clipart) / 2)
    assert row["clients"]["clipart"]["std"] == pytest.approx(statistics.stdev(clipart))
    # hidden 32, bottleneck 8, 2 layers: (32*8 + 8 + 8*32 + 32) * 2 adapter parameters travel, float32
    assert row["communicated_params"] == 1104
    assert row["bytes_per_client_per_round"] == 1104 * 4
    assert row["trainable_params"] == 1104 + row["head_params"]
    head_only = table["methods"]["head-only"]
    assert (head_only["communicated_params"], head_only["bytes_per_client_per_round"]) == (0, 0)
    assert head_only["trainable_params"] == head_only["head_params"]
    md = (out / "table.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| fedavg-adapter |"))
    assert f"{row['avg_score']['mean']:.4f} ± {row['avg_score']['std']:.4f}" in line
    assert "| 1,104 | 4,416 |" in line
    assert all(c in md.splitlines()[2] for c in table["clients"])


@pytest.mark.integration
def test_centralised_row_reports_raw_data_instead_of_bytes(compared):
    out, table = compared
    row = table["methods"]["centralised-adapter"]
    res = _results(out, "centralised-adapter", 0)
    assert row["status"] == "ok" and row["communicated_params"] is None and row["bytes_per_client_per_round"] is None
    raw = res["communication"]["raw_data_bytes"]
    # at least the pixels of every training question's image, one byte per pixel and channel
    assert min(raw.values()) > 32 * 48 * 48 * 3 // 4 and row["raw_data_bytes_per_client"] == round(
        sum(raw.values()) / len(raw))
    assert all(v == 0 for r in res["rounds"] for v in r["bytes_sent"].values())
    assert row["trainable_params"] == 1104 + row["head_params"]
    line = next(x for x in (out / "table.md").read_text().splitlines() if x.startswith("| centralised-adapter |"))
    assert "| n/a | n/a (raw data:" in line


@pytest.mark.integration
def test_compare_png_is_a_png_with_the_curves(compared):
    out, table = compared
    data = (out / "compare.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    curve = table["methods"]["head-only"]["curve"]
    rounds = [_results(compared[0], "head-only", s)["rounds"] for s in (0, 1)]
    assert curve["rounds"] == [1, 2]
    assert curve["avg_score"][1] == pytest.approx((rounds[0][1]["avg_score"] + rounds[1][1]["avg_score"]) / 2)


@pytest.mark.integration
def test_second_call_runs_nothing_new(compared, base):
    out, table = compared

    def runner(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    lines = []
    again = run_comparison(base, ["fedavg-adapter", "head-only", "centralised-adapter"], [0, 1], out,
                           progress=False, log=lines.append, runner=runner)
    assert again == json.loads(json.dumps(table))
    assert len(lines) == 6 and all("finished earlier" in x for x in lines)
    assert lines[0].startswith("[1/6] fedavg-adapter seed 0")


@pytest.mark.integration
def test_a_reused_run_of_another_config_is_refused(compared, base):
    with pytest.raises(FedDATError, match="another config: rounds"):
        run_comparison(replace(base, rounds=3), ["head-only"], [0], compared[0], progress=False,
                       log=lambda line: None)


@pytest.mark.integration
def test_interrupted_run_is_resumed_from_its_checkpoint(compared, base, tmp_path):
    """The centralised reference run to the end, then the same run cut after round 1: the comparison goes on
    from the checkpoint and reaches the same scores."""
    done = compared[0] / "centralised-adapter" / "seed0"
    cut = tmp_path / "centralised-adapter" / "seed0"
    shutil.copytree(done / "checkpoint" / "round-0001", cut / "checkpoint" / "round-0001")
    calls = []

    def runner(cfg, run_dir, progress, resume=None):
        from feddat.federation.inprocess import run

        calls.append(resume.round if resume is not None else None)
        return run(cfg, run_dir, progress=progress, resume=resume)

    lines = []
    table = run_comparison(base, ["centralised-adapter"], [0], tmp_path, progress=False, log=lines.append,
                           runner=runner)
    assert calls == [1] and "resumed" in lines[-1]
    resumed, full = _results(tmp_path, "centralised-adapter", 0), _results(compared[0], "centralised-adapter", 0)
    assert resumed["final"]["clients"] == full["final"]["clients"]
    assert table["methods"]["centralised-adapter"]["avg_score"]["mean"] == full["final"]["avg_score"]


def _fake_results(cfg: RunConfig) -> dict:
    clients = cfg.client_names()
    score = 0.1 + 0.01 * cfg.seed
    return {"config": cfg.to_dict(), "clients": clients, "label_spaces": {c: ["a", "b", "c"] for c in clients},
            "rounds": [{"round": 0, "bytes_sent": {c: 8 for c in clients}, "avg_score": score}],
            "final": {"clients": {c: score for c in clients}, "avg_score": score, "val_avg_score": score,
                      "views": {}}, "wall_seconds": 1.0}


def test_methods_all_covers_every_registered_method_and_says_which_cannot_run(base, tmp_path):
    everything = [m for m in METHODS if METHODS[m].in_all]  # not the probes: one-way distillation, authors' code
    assert "feddat-kd-student" not in everything and "feddat-authors" not in everything
    assert resolve_methods("all") == everything and "centralised-adapter" in everything
    ran = []

    def runner(cfg, run_dir, progress, resume=None):
        ran.append(cfg.method)
        if cfg.method == "fedavg-prompt":
            raise FedDATError("prompts do not fit this backbone")  # a refusal at run time
        return _fake_results(cfg)

    # fault injection has no meaning without client rounds: the centralised reference refuses it
    table = run_comparison(replace(base, fault_injection="crash:clipart@2"), resolve_methods("all"), [0], tmp_path,
                           progress=False, log=lambda line: None, runner=runner)
    assert list(table["methods"]) == everything
    assert ran == [m for m in everything if m != "centralised-adapter"]
    row = table["methods"]["centralised-adapter"]
    assert row["status"] == "unavailable" and "fault-injection" in row["reason"]
    md = (tmp_path / "table.md").read_text()
    assert "| centralised-adapter | — |" in md and "centralised-adapter was not run: " in md
    assert table["methods"]["fedavg-prompt"] == {"status": "unavailable", "reason": "prompts do not fit this backbone"}
    assert all(f"| {m} |" in md for m in everything)
    assert table["methods"]["fedavg-full"]["communicated_params"] > table["methods"]["feddat"]["communicated_params"]
    with pytest.raises(FedDATError, match="unknown methods nope"):
        resolve_methods("feddat,nope")


def _crash_while_marked(cfg, run_dir, progress, resume=None):
    """A runner (module level: --jobs pickles it) that writes fake results, except that fedavg-adapter seed 1
    raises while the comparison directory holds a file named `broken`."""
    if (cfg.method, cfg.seed) == ("fedavg-adapter", 1) and (run_dir.parent.parent / "broken").exists():
        raise ValueError("only one element tensors can be converted to Python scalars")
    results = _fake_results(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_crashing_run_leaves_the_others_and_is_redone_by_the_same_command(base, tmp_path, jobs):
    """An unexpected error in one run: the method's other seeds and the other methods still finish, the row
    says which seed failed and why, error.txt keeps the traceback, the command ends in an error; run again,
    only the failed run is redone."""
    (tmp_path / "broken").touch()
    lines = []
    with pytest.raises(FedDATError, match=r"1 run\(s\) failed \(fedavg-adapter seed 1\)"):
        run_comparison(base, ["fedavg-adapter", "head-only"], [0, 1, 2], tmp_path, progress=False,
                       log=lines.append, runner=_crash_while_marked, jobs=jobs)
    done = sorted(tmp_path.glob("*/seed*/results.json"))
    assert len(done) == 5 and not (tmp_path / "fedavg-adapter" / "seed1" / "results.json").exists()
    error = tmp_path / "fedavg-adapter" / "seed1" / "error.txt"
    assert "ValueError: only one element tensors" in error.read_text() and "Traceback" in error.read_text()
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["methods"]["fedavg-adapter"]["status"] == "unavailable"
    assert "seed 1 failed: ValueError" in table["methods"]["fedavg-adapter"]["reason"]
    assert table["methods"]["head-only"]["status"] == "ok"
    assert "fedavg-adapter did not finish: seed 1 failed" in (tmp_path / "table.md").read_text()
    assert any("fedavg-adapter seed 1: failed: ValueError" in line for line in lines)

    (tmp_path / "broken").unlink()
    before = {p: p.stat().st_mtime_ns for p in done}
    lines = []
    table = run_comparison(base, ["fedavg-adapter", "head-only"], [0, 1, 2], tmp_path, progress=False,
                           log=lines.append, runner=_crash_while_marked, jobs=jobs)
    assert {p: p.stat().st_mtime_ns for p in done} == before  # reused, not redone
    assert sum("(ran," in line for line in lines) == 1 and any("fedavg-adapter seed 1: 0.1100 (ran" in line
                                                              for line in lines)
    assert table["methods"]["fedavg-adapter"]["status"] == "ok" and not error.exists()


def test_centralised_step_pools_clients_and_trains_each_clients_head(base):
    """One pooled mini-batch holds samples of several clients: the adapter and the heads of exactly those
    clients move, another client's head does not."""
    from feddat.federation.inprocess import build, open_client_states
    from feddat.federation.pooled import _heads, pooled_batch

    setup = build(replace(base, method="centralised-adapter").validate())
    worker, clients = setup.worker, setup.clients
    states = open_client_states(setup)
    worker.method.load_shared_state(worker.model, worker.initial_global(0))
    heads = _heads(worker, clients, states)
    owners, rows = np.array([0, 0, 0, 1, 1, 3, 3, 3]), np.array([0, 1, 2, 0, 1, 5, 6, 7])
    parts = pooled_batch(worker, clients, owners, rows)
    assert sorted(parts) == [0, 1, 3] and [len(p["input_ids"]) for p in parts.values()] == [3, 2, 3]
    assert torch.equal(parts[1]["labels"], clients[1].train.labels[[0, 1]])
    before_heads = [[p.detach().clone() for p in h.parameters()] for h in heads]
    before_adapter = [p.detach().clone() for p in worker.model.adapter_parameters("global")]
    opt = torch.optim.AdamW(worker.method.pooled_param_groups(worker.model, heads, setup.cfg.local))
    worker.method.pooled_step(worker.model, heads, parts, opt)
    moved = [any(not torch.equal(a, p) for a, p in zip(b, h.parameters())) for b, h in zip(before_heads, heads)]
    assert moved == [True, True, False, True, False]
    assert any(not torch.equal(a, p) for a, p in zip(before_adapter, worker.model.adapter_parameters("global")))


def test_centralised_is_refused_by_flower_and_listed(base, capsys):
    with pytest.raises(FedDATError, match="not federated.*engine flower"):
        replace(base, method="centralised-adapter", engine="flower").validate()
    with pytest.raises(FedDATError, match="clients-per-round"):
        replace(base, method="centralised-adapter", clients_per_round=2).validate()
    assert main(["methods"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("centralised-adapter"))
    assert "pools raw data, not federated" in line


@pytest.mark.integration
def test_final_report_holds_validation_scores_beside_unchanged_test_scores(compared):
    res = _results(compared[0], "fedavg-adapter", 0)
    final = res["final"]
    assert set(final["val_clients"]) == set(res["clients"])
    assert final["val_avg_score"] == pytest.approx(sum(final["val_clients"].values()) / len(res["clients"]))
    assert final["avg_score"] == pytest.approx(res["rounds"][-1]["avg_score"])  # the round's own test scoring


@pytest.mark.integration
def test_tune_picks_the_setting_best_on_validation(base, tmp_path):
    """lr_head 1e-9 leaves the head where it started; 0.05 learns: the search must pick 0.05 (its runs made
    by worker processes, --jobs 2)."""
    grid = parse_grid(["lr_head=1e-9,0.05"])
    search = run_tune(replace(base, rounds=3, val_per_client=32), ["head-only"], grid, [0], tmp_path,
                      progress=False, log=lambda line: None, jobs=2)
    info = search["methods"]["head-only"]
    assert search["grid_size"] == 2 and info["best"] == {"lr_head": 0.05}
    vals = [s["val_avg_score"]["mean"] for s in info["settings"]]
    assert vals[1] > vals[0]
    assert (tmp_path / "lr_head=0.05" / "head-only" / "seed0" / "results.json").exists()
    assert "best: lr_head=0.05" in (tmp_path / "tune.md").read_text()
    assert json.loads((tmp_path / "tune.json").read_text())["methods"]["head-only"]["best"] == {"lr_head": 0.05}


def test_tune_reports_an_invalid_setting_and_never_selects_it(base, tmp_path):
    def runner(cfg, run_dir, progress, resume=None):
        return _fake_results(cfg)

    search = run_tune(base, ["head-only"], parse_grid(["lr_head=0,0.01"]), [0, 1], tmp_path, progress=False,
                      log=lambda line: None, runner=runner)
    first, second = search["methods"]["head-only"]["settings"]
    assert first["status"] == "unavailable" and "lr-head must be a positive number" in first["reason"]
    assert search["methods"]["head-only"]["best"] == {"lr_head": 0.01}
    assert "not run: lr-head" in (tmp_path / "tune.md").read_text()


@pytest.mark.parametrize("specs, message", [
    ([], "at least one --grid"),
    (["lr_head"], "KEY=V1,V2"),
    (["seed=0,1"], "cannot vary seed"),
    (["lr_head=a,b"], "lr-head='a': expected float"),
    (["nope=1,2"], "unknown config key 'nope'"),
    (["lr_head=1,1"], "repeats a value"),
])
def test_bad_grid_is_a_one_line_error(specs, message):
    with pytest.raises(FedDATError, match=message):
        parse_grid(specs)


def test_compare_cli_refuses_a_per_run_flag_and_unknown_methods(tmp_path, capsys):
    assert main(["compare", "--methods", "feddat", "--seed", "1", "--out", str(tmp_path)]) == 2
    assert "give --seeds instead" in capsys.readouterr().err
    assert main(["compare", "--methods", "feddat,nope", "--out", str(tmp_path)]) == 2
    assert "unknown methods nope" in capsys.readouterr().err
    assert main(["tune", "--grid", "lr_head=0.1,0.2", "--out", str(tmp_path)]) == 2
    assert "needs --method M or --methods" in capsys.readouterr().err


@pytest.mark.integration
def test_compare_cli_writes_the_table(base, tmp_path, capsys):
    args = ["compare", "--methods", "head-only", "--seeds", "0", "--out", str(tmp_path / "c"), "--quiet",
            "--model-path", base.model_path, "--cache-dir", base.cache_dir] + \
        [x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/1] head-only seed 0: running" in out and "| head-only |" in out
    assert all((tmp_path / "c" / f).exists() for f in ("table.md", "table.json", "compare.png"))


@pytest.mark.integration
def test_parallel_jobs_give_the_sequential_table(base, compared, tmp_path):
    """--jobs 2 runs in two processes; the runs are the same as one at a time (deterministic per seed), and a
    refused method still gets its row."""
    out, table = compared
    lines = []
    again = run_comparison(base, ["fedavg-adapter", "head-only", "centralised-adapter"], [0, 1], tmp_path,
                           progress=False, log=lines.append, jobs=2)
    for m in ("fedavg-adapter", "head-only", "centralised-adapter"):
        assert again["methods"][m]["avg_score_per_seed"] == table["methods"][m]["avg_score_per_seed"]
    assert lines[0] == "6 runs to do, 2 at a time" and sum(": " in x and "(ran," in x for x in lines) == 6
    with pytest.raises(FedDATError, match="jobs must be a positive integer"):
        run_comparison(base, ["head-only"], [0], tmp_path, jobs=0)


def test_table_of_many_clients_summarises_them():
    """Past CLIENT_COLUMNS_UP_TO clients, table.md gives the median and 10th-percentile client, not 100 columns."""
    from feddat.experiments.tables import CLIENT_COLUMNS_UP_TO, markdown_table

    def table(n):
        clients = [f"part-{i:02d}" for i in range(n)]
        row = {"status": "ok", "clients": {c: {"mean": i / (n - 1), "std": 0.0} for i, c in enumerate(clients)},
               "avg_score": {"mean": 0.5, "std": 0.01}, "bytes_per_client_per_round": 100,
               "trainable_params": 10, "communicated_params": 5}
        return {"clients": clients, "seeds": [0, 1], "methods": {"m": row}}

    wide = markdown_table(table(101)).splitlines()
    assert wide[2].startswith("| method | median client | 10th-percentile client | average |")
    assert wide[4].startswith("| m | 0.5000 | 0.1000 | 0.5000 ± 0.0100 |") and "part-00" not in wide[2]
    narrow = markdown_table(table(CLIENT_COLUMNS_UP_TO)).splitlines()
    assert "part-00" in narrow[2] and "median client" not in narrow[2]
