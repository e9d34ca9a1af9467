"""bench/across_benchmarks.py: the cross-benchmark table and the comparison's checks, on hand-made tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "across_benchmarks.py"


def _row(per_seed, sent):
    mean = sum(per_seed) / len(per_seed)
    return {"status": "ok", "seeds": list(range(len(per_seed))), "avg_score_per_seed": per_seed,
            "avg_score": {"mean": mean, "std": 0.0}, "bytes_per_client_per_round": sent}


def _write(tmp_path, bench, rows):
    d = tmp_path / bench
    d.mkdir()
    (d / "table.json").write_text(json.dumps({"benchmark": bench, "methods": rows}))
    return d


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_ranks_paired_margins_ablations_and_bytes(tmp_path):
    a = _write(tmp_path, "a", {
        "feddat": _row([0.80, 0.82, 0.81], 100), "fedavg-adapter": _row([0.70, 0.71, 0.69], 100),
        "fedavg-full": _row([0.60, 0.60, 0.60], 10_000), "local-adapter": _row([0.90, 0.90, 0.90], 0),
        "feddat-nomkd": _row([0.85, 0.85, 0.85], 100)})
    b = _write(tmp_path, "b", {
        "feddat": _row([0.50, 0.50, 0.50], 100), "fedavg-adapter": _row([0.49, 0.52, 0.51], 100),
        "fedavg-full": _row([0.40, 0.40, 0.40], 10_000), "local-adapter": _row([0.10, 0.10, 0.10], 0),
        "feddat-nomkd": _row([0.30, 0.30, 0.30], 100), "only-here": _row([0.9, 0.9, 0.9], 100)})
    done = _run(a, b, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    s = json.loads((tmp_path / "out" / "across.json").read_text())
    pa, pb = s["per_benchmark"]["a"], s["per_benchmark"]["b"]
    # local sends nothing and the ablation is apart: on a, feddat is first of the 3 federated methods
    assert (pa["rank"], pa["of"], pa["best_other"], pa["wins"]) == (1, 3, "fedavg-adapter", True)
    assert pa["difference_per_seed"] == pytest.approx([0.10, 0.11, 0.12]) and pa["ablations_above"] == ["feddat-nomkd"]
    # on b two methods above it (fedavg-adapter by 0.0067 on the mean), the best of them by 0.4 on every seed
    assert (pb["rank"], pb["best_other"]) == (3, "only-here") and pb["above"] == ["only-here", "fedavg-adapter"]
    assert pb["difference_per_seed"] == pytest.approx([-0.4] * 3) and not pb["wins"]
    assert s["methods"]["only-here"]["mean"] is None and s["methods"]["feddat"]["mean"] == pytest.approx(0.655)
    assert s["ablations"]["feddat-nomkd"]["mean_minus_reference"] == pytest.approx(0.575 - 0.655)
    assert s["ablations"]["feddat-nomkd"]["below"]
    assert s["bytes"]["a"]["fraction_of_full"] == pytest.approx(0.01)
    md = (tmp_path / "out" / "across.md").read_text()
    assert "| **feddat** | 0.8100 | 0.5000 | 0.6550 |" in md and "| only-here | - | 0.9000 | - |" in md


def test_bad_inputs_are_named(tmp_path):
    missing = _run(tmp_path / "nothing", "--out", tmp_path / "out")
    assert missing.returncode != 0 and "table.json does not exist" in missing.stderr
    a = _write(tmp_path, "a", {"fedavg-adapter": _row([0.5], 10)})
    no_ref = _run(a, "--out", tmp_path / "out")
    assert "feddat is not measured on every benchmark" in no_ref.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "table.json").write_text("{not json")
    assert "unreadable" in _run(tmp_path / "bad", "--out", tmp_path / "out").stderr
