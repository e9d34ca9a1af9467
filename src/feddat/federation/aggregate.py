"""Server-side arithmetic on updates: validation and weighted averaging, as pure functions."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from feddat.errors import FedDATError

Update = Mapping[str, torch.Tensor]


def validate_update(update: Update, reference: Update, client: str, max_norm: float | None = None) -> None:
    """Raise FedDATError naming the client unless `update` has exactly the reference's keys, shapes and
    dtypes, finite values, and (if given) an L2 norm of at most `max_norm`."""
    extra = sorted(set(update) - set(reference))
    missing = sorted(set(reference) - set(update))
    if extra or missing:
        raise FedDATError(f"update from client {client} has unexpected keys {extra} / lacks keys {missing}")
    norm_sq = 0.0
    for key, ref in reference.items():
        t = update[key]
        if not isinstance(t, torch.Tensor):
            raise FedDATError(f"update from client {client}: {key} is a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise FedDATError(f"update from client {client}: {key} has shape {tuple(t.shape)} {t.dtype}, "
                              f"expected {tuple(ref.shape)} {ref.dtype}")
        if not torch.isfinite(t).all():
            raise FedDATError(f"update from client {client}: {key} holds NaN or infinite values")
        norm_sq += float(t.double().pow(2).sum())
    if max_norm is not None and norm_sq ** 0.5 > max_norm:
        raise FedDATError(f"update from client {client} has norm {norm_sq ** 0.5:.4g} above the bound {max_norm}")


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


def update_bytes(update: Update) -> int:
    return sum(t.numel() * t.element_size() for t in update.values())
