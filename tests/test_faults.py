"""Fault tolerance of the in-process engine: crashed, late and hostile clients, driven by fault injection."""

from __future__ import annotations

import pytest
import torch

from feddat.errors import FedDATError
from feddat.fault_spec import Fault, parse_faults
from feddat.federation.faults import InjectedFault, check_crash, corrupt, delay
from feddat.federation.inprocess import run
from tiny import run_numbers


def test_fault_grammar():
    faults = parse_faults("crash:textured@2, nan:night@1-3,scale:blurry=-10,signflip:sketch,slow:clipart=4.5")
    assert faults == [Fault("crash", "textured", 2, 2), Fault("nan", "night", 1, 3), Fault("scale", "blurry", value=-10),
                      Fault("signflip", "sketch"), Fault("slow", "clipart", value=4.5)]
    with pytest.raises(InjectedFault, match="textured in round 2"):
        check_crash(faults, "textured", 2, attempt=1)
    check_crash(faults, "textured", 1, attempt=0)
    flaky = parse_faults("flaky:night@1")
    with pytest.raises(InjectedFault):
        check_crash(flaky, "night", 1, attempt=0)
    check_crash(flaky, "night", 1, attempt=1)       # a retry succeeds
    assert delay(faults, "clipart", 7) == 4.5 and delay(faults, "night", 7) == 0
    ref = {"a": torch.tensor([1.0, 1.0]), "b": torch.zeros(2, 2)}
    upd = {"a": torch.tensor([2.0, 3.0]), "b": torch.ones(2, 2)}
    assert corrupt(upd, ref, faults, "blurry", 1)["a"].tolist() == [-9.0, -19.0]      # 1 - 10 * (1, 2)
    assert corrupt(upd, ref, faults, "sketch", 1)["a"].tolist() == [0.0, -1.0]
    assert corrupt(upd, ref, faults, "night", 2)["a"].isnan().any()
    assert torch.equal(corrupt(upd, ref, faults, "night", 4)["a"], upd["a"])
    assert corrupt(upd, ref, parse_faults("shape:x"), "x", 1)["a"].shape == (1,)
    assert "injected.extra" in corrupt(upd, ref, parse_faults("extra:x"), "x", 1)
    assert corrupt(upd, ref, parse_faults("empty:x"), "x", 1) == {}
    assert torch.equal(upd["a"], torch.tensor([2.0, 3.0]))  # the client's own tensors are untouched


def test_crashed_client_is_left_out_and_recorded(tiny_config):
    res = run(tiny_config(rounds=2, fault_injection="crash:textured@2"), progress=False)
    r1, r2 = res["rounds"]
    assert "missing_clients" not in r1
    assert set(r2["missing_clients"]) == {"textured"}
    assert "InjectedFault" in r2["missing_clients"]["textured"] and "round 2" in r2["missing_clients"]["textured"]
    assert set(r2["train"]) == {"clipart", "night", "sketch", "blurry"}
    assert set(r2["update_norms"]) == set(r2["train"])
    assert set(res["final"]["clients"]) == set(res["clients"])   # every client is still scored


def test_broken_updates_are_rejected_naming_the_client_and_the_round_goes_on(tiny_config):
    res = run(tiny_config(rounds=2, fault_injection="nan:night@1,shape:sketch@1,extra:clipart@2,empty:blurry@2"),
              progress=False)
    r1, r2 = res["rounds"]
    assert set(r1["rejected_clients"]) == {"night", "sketch"}
    assert "night" in r1["rejected_clients"]["night"] and "NaN" in r1["rejected_clients"]["night"]
    assert "shape" in r1["rejected_clients"]["sketch"]
    assert set(r2["rejected_clients"]) == {"clipart", "blurry"}
    assert "unexpected keys ['injected.extra']" in r2["rejected_clients"]["clipart"]
    assert "lacks keys" in r2["rejected_clients"]["blurry"]
    # a rejected client answered: it trained and is scored, only its update is left out of the aggregate
    assert set(r1["train"]) == set(res["clients"]) and set(r1["update_norms"]) == {"clipart", "textured", "blurry"}
    assert all(torch.isfinite(torch.tensor(list(r["test"].values()))).all() for r in res["rounds"])


def test_norm_bound_rejects_a_scaled_update(tiny_config):
    res = run(tiny_config(rounds=2, fault_injection="scale:blurry=-10", max_update_norm=1.0), progress=False)
    for r in res["rounds"]:
        assert set(r["rejected_clients"]) == {"blurry"} and "max-update-norm=1.0" in r["rejected_clients"]["blurry"]
        assert max(r["update_norms"].values()) <= 1.0


def test_too_few_clients_stops_the_run_with_a_clear_error(tiny_config):
    with pytest.raises(FedDATError, match=r"round 2 failed: 4 of 5 clients .* min-clients=5\. textured: failed"):
        run(tiny_config(rounds=2, fault_injection="crash:textured@2", min_clients=5, round_retries=1), progress=False)
    with pytest.raises(FedDATError, match=r"round 1 failed: 4 of 5 .* aggregation=krum with byzantine=1 needs 5 updates"):
        run(tiny_config(rounds=1, fault_injection="nan:night", aggregation="krum"), progress=False)


def test_a_retry_of_a_flaky_client_gives_the_fault_free_run_numbers(tiny_config):
    clean = run(tiny_config(rounds=2, min_clients=5), progress=False)
    flaky = run(tiny_config(rounds=2, min_clients=5, round_retries=1, fault_injection="flaky:textured@2"),
                progress=False)
    assert flaky["rounds"][1]["attempts"] == 2 and "missing_clients" not in flaky["rounds"][1]
    assert run_numbers(flaky) == run_numbers(clean)
    # without min-clients the round goes on without it (default min-clients=1), and the numbers differ
    partial = run(tiny_config(rounds=2, fault_injection="flaky:textured@2"), progress=False)
    assert "textured" in partial["rounds"][1]["missing_clients"] and "attempts" not in partial["rounds"][1]
    assert run_numbers(partial) != run_numbers(clean)


def test_a_late_answer_is_missing_with_a_timeout(tiny_config):
    res = run(tiny_config(rounds=1, round_timeout=60.0, fault_injection="slow:night=1000"), progress=False)
    assert res["rounds"][0]["missing_clients"] == {"night": "timed out: no answer within round-timeout=60 s"}


def test_robust_rules_and_dp_run_end_to_end_and_are_recorded(tiny_config):
    attack = "signflip:blurry"
    for rule in ("median", "trimmed-mean", "krum", "multi-krum"):
        res = run(tiny_config(rounds=1, aggregation=rule, fault_injection=attack), progress=False)
        entry = res["rounds"][0]
        assert set(entry["update_norms"]) == set(res["clients"]), rule
        if rule == "krum":
            assert len(entry["aggregated_clients"]) == 1
        if rule == "multi-krum":
            assert len(entry["aggregated_clients"]) == 4
    dp = tiny_config(rounds=2, aggregation="equal", dp_clip=0.05, dp_noise_multiplier=1.0)
    a, b = run(dp, progress=False), run(dp, progress=False)
    assert run_numbers(a) == run_numbers(b)                                   # the noise is seeded
    assert a["privacy"]["dp_clip"] == 0.05 and a["privacy"]["dp_noise_multiplier"] == 1.0
    assert a["privacy"]["epsilon"] == pytest.approx(2 / 2 + (2 * 2 * 11.512925464970229) ** 0.5)
    for r in a["rounds"]:
        assert r["dp"]["noise_std"] == pytest.approx(1.0 * 0.05 / 5)
        assert set(r["dp"]["clipped_clients"]) == {n for n, x in r["update_norms"].items() if x > 0.05}
