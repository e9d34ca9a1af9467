"""Server-side arithmetic on updates, as pure functions both engines call.

- `validate_update`: keys, shapes, dtypes, finite values and an optional bound on the distance from the
  current global adapter;
- `weighted_mean` (FedAvg), `coordinate_median`, `trimmed_mean`, `multikrum_select` (Krum when it keeps one),
  `bulyan`: combine the accepted updates of the shared adapter. The robust rules reuse Flower's arithmetic
  (`flwr.serverapp.strategy`: `trim_mean`, `select_multikrum`, `aggregate_n_closest_weights`; the median is
  FedMedian's `np.median` over the stacked updates), wrapped to take and return our dicts of tensors;
- `clip_update`, `dp_noise_std`, `add_gaussian_noise`, `dp_epsilon`: central differential privacy with fixed
  clipping (Flower's `compute_clip_model_update` and `compute_stdv`; the noise is drawn from a generator
  seeded by the caller instead of Flower's global `np.random`, so runs are reproducible).

An update is the full shared adapter a client sends back (not a difference); the reference is the global
adapter the server sent in that round. Every function keeps the reference's keys, shapes and dtypes.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from feddat.config import AGGREGATIONS, MEAN_RULES, bulyan_minimum, krum_minimum
from feddat.errors import FedDATError

Update = Mapping[str, torch.Tensor]
State = dict[str, torch.Tensor]

DP_DELTA = 1e-5   # the delta at which results.json reports epsilon


# ----- validation -----
def update_norm(update: Update, reference: Update) -> float:
    """L2 norm of update - reference over every tensor (float64, keys in sorted order: the same bits whatever
    order a client or a checkpoint file lists them in)."""
    return math.sqrt(sum(float((update[k].double() - reference[k].double()).pow(2).sum()) for k in sorted(reference)))


def validate_update(update: Update, reference: Update, client: str, max_norm: float | None = None) -> None:
    """Raise FedDATError naming the client unless `update` has exactly the reference's keys, shapes and
    dtypes, finite values, and (if given) lies within L2 distance `max_norm` of the reference."""
    extra = sorted(set(update) - set(reference))
    missing = sorted(set(reference) - set(update))
    if extra or missing:
        raise FedDATError(f"update from client {client} has unexpected keys {extra} / lacks keys {missing}")
    for key, ref in reference.items():
        t = update[key]
        if not isinstance(t, torch.Tensor):
            raise FedDATError(f"update from client {client}: {key} is a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise FedDATError(f"update from client {client}: {key} has shape {tuple(t.shape)} {t.dtype}, "
                              f"expected {tuple(ref.shape)} {ref.dtype}")
        if not torch.isfinite(t).all():
            raise FedDATError(f"update from client {client}: {key} holds NaN or infinite values")
    if max_norm is not None:
        norm = update_norm(update, reference)
        if norm > max_norm:
            raise FedDATError(f"update from client {client} moves the global adapter by {norm:.4g} (L2), "
                              f"above the bound max-update-norm={max_norm}")


# ----- mean -----
def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_k w_k * u_k / sum_k w_k, key by key (FedAvg)."""
    if not updates:
        raise FedDATError("no client updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise FedDATError(f"aggregation weights must be non-negative with a positive sum, got {list(weights)}")
    out = {}
    for key in updates[0]:
        acc = torch.zeros_like(updates[0][key], dtype=torch.float64)
        for u, w in zip(updates, weights):
            acc += u[key].double() * (w / total)
        out[key] = acc.to(updates[0][key].dtype)
    return out


# ----- robust rules -----
def _stacked(updates: Sequence[Update], key: str) -> np.ndarray:
    return np.stack([u[key].detach().cpu().numpy() for u in updates])


def _as_tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(like.dtype).reshape(like.shape)


def _need(updates: Sequence[Update], n: int, rule: str, why: str) -> None:
    if len(updates) < n:
        raise FedDATError(f"{rule} needs at least {n} updates ({why}), got {len(updates)}")


def coordinate_median(updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of the updates (Flower's FedMedian: np.median over the stacked updates)."""
    _need(updates, 1, "median", "one at least")
    return {k: _as_tensor(np.median(_stacked(updates, k), axis=0), v) for k, v in updates[0].items()}


def trimmed_mean(updates: Sequence[Update], fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the int(fraction * n) smallest and largest values (Flower's
    FedTrimmedAvg `trim_mean`, as scipy's). fraction in [0, 0.5)."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    _need(updates, 1, "trimmed-mean", "one at least")
    if not 0 <= fraction < 0.5:
        raise FedDATError(f"trim-fraction must be in [0, 0.5), got {fraction}")
    return {k: _as_tensor(trim_mean(_stacked(updates, k), fraction), v) for k, v in updates[0].items()}


def _records(updates: Sequence[Update]):
    from flwr.app import Array, ArrayRecord, RecordDict

    keys = sorted(updates[0])  # one order for all: Krum flattens each record in its own key order
    return [RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(u[k].detach().cpu().numpy()))
                                               for k in keys})}) for u in updates]


def multikrum_select(updates: Sequence[Update], byzantine: int, keep: int) -> list[int]:
    """Indices of the `keep` updates with the lowest Krum scores (the sum of squared distances to their
    n - f - 2 nearest neighbours), best first: Flower's `select_multikrum`. keep=1 is Krum."""
    from flwr.serverapp.strategy.multikrum import select_multikrum

    _need(updates, krum_minimum(byzantine), "krum", f"n > 2f + 2 with f={byzantine} byzantine clients")
    if not 1 <= keep <= len(updates):
        raise FedDATError(f"multi-krum keeps between 1 and {len(updates)} updates, asked for {keep}")
    records = _records(updates)
    chosen = select_multikrum(records, num_malicious_nodes=byzantine, num_nodes_to_select=keep)
    return [next(i for i, r in enumerate(records) if r is c) for c in chosen]


def bulyan(updates: Sequence[Update], byzantine: int) -> dict[str, torch.Tensor]:
    """Bulyan (El Mhamdi et al. 2018) as Flower computes it: Multi-Krum keeps theta = n - 2f updates, then
    per coordinate the mean of the beta = theta - 2f values closest to their median."""
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

    _need(updates, bulyan_minimum(byzantine), "bulyan", f"n >= 4f + 3 with f={byzantine} byzantine clients")
    theta = len(updates) - 2 * byzantine
    beta = theta - 2 * byzantine
    selected = [updates[i] for i in multikrum_select(updates, byzantine, theta)]
    keys = list(updates[0])
    arrays = [[u[k].detach().cpu().numpy() for k in keys] for u in selected]
    medians = [np.median(np.stack(layer), axis=0) for layer in zip(*arrays)]
    out = aggregate_n_closest_weights(medians, arrays, beta)
    return {k: _as_tensor(a, updates[0][k]) for k, a in zip(keys, out)}


def robust_minimum(aggregation: str, byzantine: int) -> int:
    """The least number of accepted updates `aggregation` needs (1 for the mean, median and trimmed mean)."""
    if aggregation in ("krum", "multi-krum"):
        return krum_minimum(byzantine)
    if aggregation == "bulyan":
        return bulyan_minimum(byzantine)
    return 1


def combine(aggregation: str, updates: Sequence[Update], weights: Sequence[float], byzantine: int = 0,
            trim_fraction: float = 0.2) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The aggregate of `updates` under one rule, and the indices of the updates it averaged (Krum's choice;
    every index for the other rules). `weights` weight the mean rules only; the robust rules are unweighted
    (a client's claimed sample count is no input an attacker should control)."""
    every = list(range(len(updates)))
    if aggregation in MEAN_RULES:
        return weighted_mean(updates, weights), every
    if aggregation == "median":
        return coordinate_median(updates), every
    if aggregation == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction), every
    if aggregation in ("krum", "multi-krum"):
        keep = 1 if aggregation == "krum" else len(updates) - byzantine
        chosen = multikrum_select(updates, byzantine, keep)
        return weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen)), sorted(chosen)
    if aggregation == "bulyan":
        return bulyan(updates, byzantine), every
    raise FedDATError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")


# ----- central differential privacy (fixed clipping) -----
def clip_update(update: Update, reference: Update, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """reference + (update - reference) * min(1, clip / ||update - reference||), and the norm before clipping
    (Flower's `compute_clip_model_update`)."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    keys = sorted(reference)  # Flower sums the norm in list order: one order, the same bits on every engine
    norm = update_norm(update, reference)
    if norm == 0.0:  # Flower's clip divides by the norm
        return {k: update[k].clone() for k in reference}, 0.0
    sent = [update[k].detach().cpu().numpy().astype(np.float64) for k in keys]
    ref = [reference[k].detach().cpu().numpy().astype(np.float64) for k in keys]
    compute_clip_model_update(sent, ref, clip)
    out = dict(zip(keys, sent))
    return {k: _as_tensor(out[k], reference[k]) for k in reference}, norm


def dp_noise_std(noise_multiplier: float, clip: float, weights: Sequence[float]) -> float:
    """Standard deviation of the Gaussian noise on the weighted mean of clipped updates: noise_multiplier times
    its sensitivity, clip * max_k w_k / sum_k w_k (clip / n for equal weights: Flower's `compute_stdv`)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(noise_multiplier, clip, float(sum(weights)) / max(weights))


def add_gaussian_noise(state: Update, std: float, seed: int) -> dict[str, torch.Tensor]:
    """state + N(0, std^2) per coordinate, drawn from a generator seeded with `seed` (keys in sorted order)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(state):
        t = state[k]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std
        out[k] = (t.double() + noise).to(t.dtype)
    return {k: out[k] for k in state}


def dp_epsilon(noise_multiplier: float, releases: int, delta: float = DP_DELTA) -> float:
    """Epsilon after `releases` Gaussian releases with noise multiplier z, every client in every release
    (no subsampling amplification): Renyi DP of order a is releases * a / (2 z^2), converted with
    eps = min_a RDP(a) + log(1/delta) / (a - 1) = T / (2 z^2) + sqrt(2 T log(1/delta)) / z. inf for z = 0."""
    if noise_multiplier <= 0:
        return math.inf
    t, z = float(releases), float(noise_multiplier)
    return t / (2 * z * z) + math.sqrt(2 * t * math.log(1 / delta)) / z


def update_bytes(update: Update) -> int:
    return sum(t.numel() * t.element_size() for t in update.values())
