"""Robust aggregation, update screening and central DP: pure functions on tiny hand-computable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.federation.aggregate import (add_gaussian_noise, bulyan, clip_update, combine, coordinate_median,
                                         dp_epsilon, dp_noise_std, multikrum_select, trimmed_mean, update_norm,
                                         validate_update, weighted_mean)


def u(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_median_and_trimmed_mean_by_hand():
    ups = [u(1, 10), u(2, 20), u(100, -5)]
    assert coordinate_median(ups)["w"].tolist() == [2, 10]
    five = [u(1), u(2), u(3), u(4), u(100)]
    assert trimmed_mean(five, 0.2)["w"].tolist() == [3.0]        # int(0.2 * 5) = 1 cut at each end: (2+3+4)/3
    assert trimmed_mean(five, 0.0)["w"].tolist() == [22.0]       # nothing cut: the mean
    assert trimmed_mean(five, 0.2)["w"].dtype == torch.float32
    with pytest.raises(FedDATError, match="trim-fraction"):
        trimmed_mean(five, 0.5)


def test_krum_and_multikrum_pick_the_central_updates():
    pts = [u(0, 0), u(0.1, 0), u(0, 0.1), u(10, 10), u(0.05, 0.05)]
    # n - f - 2 = 2 nearest neighbours: (0.05, 0.05) scores 0.005 + 0.005, the best; (10, 10) the worst
    assert multikrum_select(pts, byzantine=1, keep=1) == [4]
    assert sorted(multikrum_select(pts, byzantine=1, keep=4)) == [0, 1, 2, 4]
    krum, used = combine("krum", pts, [1] * 5, byzantine=1)
    assert used == [4] and krum["w"].tolist() == pytest.approx([0.05, 0.05])
    multi, used = combine("multi-krum", pts, [1] * 5, byzantine=1)
    assert used == [0, 1, 2, 4] and multi["w"].tolist() == pytest.approx([0.0375, 0.0375])
    with pytest.raises(FedDATError, match=r"n > 2f \+ 2"):
        multikrum_select(pts[:4], byzantine=1, keep=1)


def test_bulyan_by_hand_and_its_requirement():
    seven = [u(1.0), u(1.1), u(0.9), u(1.05), u(0.95), u(50.0), u(-50.0)]
    # f = 1: Multi-Krum keeps theta = 5 (the honest ones), median 1.0, mean of the beta = 3 closest: 1, 1.05, 0.95
    assert bulyan(seven, 1)["w"].tolist() == pytest.approx([1.0])
    with pytest.raises(FedDATError, match=r"n >= 4f \+ 3"):
        bulyan(seven[:6], 1)


def test_flower_notes_scenario_eight_honest_two_hostile():
    """8 honest clients near 1.0, 2 sending -10x: FedAvg moves far off, the robust rules stay near 1."""
    gen = torch.Generator().manual_seed(0)
    honest = [{"w": 1.0 + 0.05 * torch.randn(50, generator=gen)} for _ in range(8)]
    hostile = [{"w": -10.0 * h["w"]} for h in honest[:2]]
    ups = honest + hostile
    fedavg, _ = combine("equal", ups, [1] * 10)
    assert fedavg["w"].mean().item() == pytest.approx(-1.2, abs=0.05)
    for rule in ("median", "trimmed-mean", "krum", "multi-krum"):
        agg, _ = combine(rule, ups, [1] * 10, byzantine=2, trim_fraction=0.2)
        assert abs(agg["w"].mean().item() - 1.0) < 0.1, rule
    agg, used = combine("multi-krum", ups, [1] * 10, byzantine=2)
    assert used == list(range(8))  # exactly the honest ones


def test_validate_update_bounds_the_change_from_the_global_adapter():
    ref = {"w": torch.tensor([10.0, 0.0])}
    validate_update({"w": torch.tensor([13.0, 4.0])}, ref, "night", max_norm=5.0)      # moves by exactly 5
    with pytest.raises(FedDATError, match=r"night moves the global adapter by 5.08.*max-update-norm=5"):
        validate_update({"w": torch.tensor([13.0, 4.1])}, ref, "night", max_norm=5.0)
    assert update_norm({"w": torch.tensor([13.0, 4.0])}, ref) == pytest.approx(5.0)


def test_clip_update_bounds_the_change_and_keeps_small_ones():
    ref = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    big = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}          # change (3, 0, 4): norm 5
    clipped, norm = clip_update(big, ref, 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].tolist() == pytest.approx([1.6, 1.0]) and clipped["b"].tolist() == pytest.approx([0.8])
    assert update_norm(clipped, ref) == pytest.approx(1.0)
    small = {"a": torch.tensor([1.3, 1.0]), "b": torch.tensor([0.4])}         # norm 0.5: unchanged
    same, norm = clip_update(small, ref, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(same["a"], small["a"]) and torch.equal(same["b"], small["b"])
    unchanged, norm = clip_update(ref, ref, 1.0)
    assert norm == 0.0 and torch.equal(unchanged["a"], ref["a"])


def test_dp_noise_scale_is_multiplier_times_clip_over_n_and_seeded():
    assert dp_noise_std(1.5, 2.0, [1, 1, 1, 1]) == pytest.approx(0.75)        # z * clip / n
    assert dp_noise_std(1.0, 1.0, [10, 30]) == pytest.approx(0.75)            # z * clip * max w / sum w
    zeros = {"x": torch.zeros(200_000), "y": torch.zeros(3)}
    noisy = add_gaussian_noise(zeros, 0.3, seed=7)
    x = noisy["x"].double()
    # the sample std of 200k draws is within 1% of 0.3 with overwhelming probability (se ~ 0.3 / sqrt(4e5))
    assert x.std().item() == pytest.approx(0.3, rel=0.01) and abs(x.mean().item()) < 0.005
    again = add_gaussian_noise(zeros, 0.3, seed=7)
    assert torch.equal(again["x"], noisy["x"]) and list(again) == ["x", "y"]
    assert not torch.equal(add_gaussian_noise(zeros, 0.3, seed=8)["x"], noisy["x"])


def test_dp_aggregate_clips_every_client_then_adds_calibrated_noise(tiny_config):
    from feddat.federation.server import ServerRules, aggregate

    cfg = tiny_config(aggregation="equal", dp_clip=0.5, dp_noise_multiplier=2.0, seed=3)
    ref = {"w": torch.zeros(100_000)}
    ups = {f"c{i}": {"w": torch.full((100_000,), float(i + 1))} for i in range(4)}  # changes far above the clip
    new, info = aggregate(ServerRules.of(cfg), ups, {n: 1 for n in ups}, ref, round_idx=2)
    assert info["dp"]["clipped_clients"] == sorted(ups)
    assert info["dp"]["noise_std"] == pytest.approx(2.0 * 0.5 / 4)
    clipped_mean = 0.5 / math.sqrt(100_000)   # every clipped change is the all-equal vector of norm 0.5
    noise = new["w"].double() - clipped_mean
    assert noise.std().item() == pytest.approx(0.25, rel=0.02) and abs(noise.mean().item()) < 0.005
    same, _ = aggregate(ServerRules.of(cfg), ups, {n: 1 for n in ups}, ref, round_idx=2)
    other, _ = aggregate(ServerRules.of(cfg), ups, {n: 1 for n in ups}, ref, round_idx=3)
    assert torch.equal(same["w"], new["w"]) and not torch.equal(other["w"], new["w"])
    quiet = tiny_config(aggregation="equal", dp_clip=0.5)
    clipped_only, info = aggregate(ServerRules.of(quiet), ups, {n: 1 for n in ups}, ref, round_idx=2)
    assert info["dp"]["noise_std"] == 0.0
    assert clipped_only["w"].double().mean().item() == pytest.approx(clipped_mean, rel=1e-5)


def test_dp_epsilon_formula():
    # T / (2 z^2) + sqrt(2 T log(1/delta)) / z for T = 10, z = 1, delta = 1e-5
    assert dp_epsilon(1.0, 10, 1e-5) == pytest.approx(5 + math.sqrt(20 * math.log(1e5)))
    assert dp_epsilon(0.0, 10) == math.inf
    assert dp_epsilon(4.0, 10) < dp_epsilon(1.0, 10)


def test_weighted_mean_unchanged_for_fedavg():
    a, b = u(1.0, 2.0), u(5.0, 6.0)
    assert combine("samples", [a, b], [1, 3])[0]["w"].tolist() == weighted_mean([a, b], [1, 3])["w"].tolist()


@pytest.mark.parametrize("values, message", [
    (dict(aggregation="nope"), "aggregation must be one of"),
    (dict(aggregation="krum", byzantine=2), r"krum needs n > 2f \+ 2 clients: 5 clients tolerate at most 1"),
    (dict(aggregation="multi-krum", byzantine=2), r"n > 2f \+ 2"),
    (dict(aggregation="bulyan", byzantine=1), r"bulyan needs n >= 4f \+ 3 clients: 5 clients tolerate at most 0"),
    (dict(aggregation="trimmed-mean", trim_fraction=0.1), "trims nothing from 5 clients"),
    (dict(trim_fraction=0.5), r"trim-fraction must be in \[0, 0.5\)"),
    (dict(byzantine=-1), "byzantine must be a non-negative integer"),
    (dict(min_clients=0), "min-clients must be an integer from 1 to the benchmark's 5 clients"),
    (dict(min_clients=6), "min-clients must be an integer from 1"),
    (dict(round_retries=1.5), "round-retries must be a non-negative integer"),
    (dict(round_timeout=-1.0), "round-timeout must be a finite number >= 0"),
    (dict(max_update_norm=float("nan")), "max-update-norm must be a finite number"),
    (dict(dp_noise_multiplier=1.0), "dp-noise-multiplier needs dp-clip > 0"),
    (dict(dp_clip=1.0, aggregation="median"), "dp-clip works with the mean aggregations"),
    (dict(dp_clip="1"), "dp-clip must be a finite number"),
    (dict(fault_injection="explode:night"), "unknown kind 'explode'"),
    (dict(fault_injection="crash:moon@1"), "no client 'moon'"),
    (dict(fault_injection="crash:night@11"), r"rounds must lie within 1..10"),
    (dict(fault_injection="scale:night"), "scale needs a number"),
    (dict(fault_injection="nan:night=3"), "nan takes no value"),
    (dict(fault_injection="crash night"), "is not KIND:CLIENT"),
])
def test_server_settings_are_validated(values, message):
    with pytest.raises(FedDATError, match=message):
        RunConfig(**values).validate()


def test_valid_server_settings_pass():
    RunConfig(aggregation="krum", byzantine=1).validate()
    RunConfig(aggregation="bulyan", byzantine=0).validate()
    RunConfig(aggregation="trimmed-mean", trim_fraction=0.2).validate()
    RunConfig(dp_clip=1.0, dp_noise_multiplier=0.5, aggregation="equal").validate()
    RunConfig(fault_injection="crash:textured@2, nan:night@1-3,scale:blurry=-10,signflip:sketch,slow:clipart=5",
              min_clients=3, round_retries=2, round_timeout=60.0).validate()


def test_round_collector_caps_claimed_weights_and_counts_usable_results(tiny_config):
    from feddat.federation.server import RoundCollector, ServerRules

    cfg = tiny_config(min_clients=2, round_retries=1, train_per_client=32)
    ref = {"w": torch.zeros(2)}
    rc = RoundCollector(ServerRules.of(cfg), ["a", "b", "c"], shares=True, reference=ref, round_idx=0)
    rc.answered("a", {"loss": 1.0}, 10**9, {"w": torch.ones(2)})          # claims a billion examples
    rc.answered("b", {"loss": 1.0}, 32, {"w": torch.tensor([1.0, float("nan")])})
    rc.failed("c", "failed: boom")
    assert rc.sizes == {"a": 32, "b": 32} and set(rc.rejected) == {"b"} and rc.usable == 1
    assert rc.retry() and rc.to_retry() == ["c"] and rc.attempts == 2
    assert not rc.retry()                                                   # retries used up
    with pytest.raises(FedDATError, match=r"round 1 failed: 1 of 3 clients .* min-clients=2\. c: failed: boom; "
                                          r"b: rejected"):
        rc.aggregate()
    rc.answered("c", {"loss": 2.0}, 32, {"w": torch.full((2,), 3.0)})
    assert torch.equal(rc.aggregate()["w"], torch.full((2,), 2.0)) and "missing_clients" not in rc.extra()
