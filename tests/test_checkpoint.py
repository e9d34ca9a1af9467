"""Checkpoints after every round and `feddat run --resume`: exact continuation, damage detection, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feddat.cli import main
from feddat.errors import FedDATError
from feddat.federation.checkpoint import (check_fits, complete_checkpoints, load_checkpoint, read_checkpoint,
                                          resume_config)
from feddat.federation.inprocess import build, run
from tiny import run_numbers


def cli_flags(cfg) -> list[str]:
    return ["--model-path", cfg.model_path, "--cache-dir", cfg.cache_dir, "--rounds", str(cfg.rounds),
            "--seed", str(cfg.seed), "--train-per-client", str(cfg.train_per_client), "--val-per-client",
            str(cfg.val_per_client), "--test-per-client", str(cfg.test_per_client), "--batch-size",
            str(cfg.batch_size), "--reduction", str(cfg.reduction), "--threads", "1"]


def newest_round(out: Path) -> int:
    found = complete_checkpoints(out)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.integration
def test_run_killed_mid_round_resumes_to_the_same_run_numbers(tiny_config, tmp_path, capsys):
    cfg = tiny_config(rounds=8, seed=5)
    reference = run(cfg, progress=False)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "feddat.cli", "run", "--out", str(out), "--quiet"] + cli_flags(cfg),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while newest_round(out) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)   # during round 3 (or later): no chance to clean up
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = newest_round(out)
    assert 2 <= done < cfg.rounds and not (out / "results.json").exists()

    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(out, damaged)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert run_numbers(resumed) == run_numbers(reference)          # bit for bit
    assert newest_round(out) == cfg.rounds and len(complete_checkpoints(out)) == 2

    # a truncated file of the newest checkpoint: reported by name, the previous checkpoint is used
    newest = complete_checkpoints(damaged)[-1]
    victim = newest / "clients" / "night.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FedDATError, match=f"{victim}.*truncated or corrupt"):
        read_checkpoint(newest)
    capsys.readouterr()
    assert main(["run", "--resume", str(damaged), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert str(victim) in err and "using the previous checkpoint" in err and f"round-{done - 1:04d}" in err
    assert run_numbers(json.loads((damaged / "results.json").read_text())) == run_numbers(reference)


def test_checkpoints_are_kept_two_deep_and_damage_is_named(tiny_config, tmp_path):
    cfg = tiny_config(rounds=3)
    out = tmp_path / "run"
    run(cfg, out_dir=out, progress=False)
    assert [p.name for p in complete_checkpoints(out)] == ["round-0002", "round-0003"]
    ck = load_checkpoint(out)
    assert ck.round == 3 and ck.config == cfg.to_dict() and not ck.skipped
    assert [r["round"] for r in ck.history["rounds"]] == [0, 1, 2]
    # an interrupted write leaves a .partial directory: never read
    (out / "checkpoint" / "round-0004.partial").mkdir()
    assert load_checkpoint(out).round == 3
    # both damaged: an error naming each file
    (complete_checkpoints(out)[-1] / "server.json").write_text("{}")
    (complete_checkpoints(out)[0] / "MANIFEST.json").unlink()
    with pytest.raises(FedDATError, match=r"no usable checkpoint.*round-0003/server.json does not match its sha256"
                                          r".*round-0002/MANIFEST.json is missing: the checkpoint is incomplete"):
        load_checkpoint(out)
    with pytest.raises(FedDATError, match="holds no complete checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_resume_uses_the_saved_config_and_refuses_a_conflicting_one(tiny_config, tmp_path, capsys):
    cfg = tiny_config(rounds=2)
    out = tmp_path / "run"
    run(cfg, out_dir=out, progress=False)
    saved = load_checkpoint(out).config
    assert resume_config(saved, {"threads": 2, "tracker": None}).threads == 2
    assert main(["run", "--resume", str(out), "--quiet", "--rounds", "3", "--lr-head", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "conflict" in err and "rounds (checkpoint: 2, given: 3)" in err and "lr-head" in err
    # a finished run: its results are not overwritten without --force
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "already holds results.json" in capsys.readouterr().err
    assert main(["run", "--quiet"]) == 2
    assert "needs --out" in capsys.readouterr().err


def test_checkpoint_of_another_architecture_is_refused(tiny_config, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(rounds=1), out_dir=out, progress=False)
    ck = load_checkpoint(out)
    setup = build(tiny_config(rounds=1, reduction=8))         # bottleneck 4 instead of 8
    worker = setup.worker
    templates = {c.name: worker.initial_state(i, len(c.answers), 0) for i, c in enumerate(setup.clients)}
    with pytest.raises(FedDATError, match=r"clients/\w+\.safetensors does not fit the model its config builds"):
        check_fits(ck, worker.initial_global(0), templates)
