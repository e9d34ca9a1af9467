"""The server's side of one round, whichever engine carries the messages.

`RoundCollector` takes the clients' answers as they come (or the reason there was none), screens every
update (`validate_update`: keys, shapes, dtypes, finite, `max_update_norm`) and rejects a bad one with a
logged reason naming the client, says whether the round has enough usable results (`min_clients`, and what
the aggregation rule needs) or which clients to ask again, and aggregates the accepted updates:
`aggregate()` = robust rule or FedAvg, then central DP (clip, mean, seeded Gaussian noise) when configured.
Both engines record the same round entry (`missing_clients`, `rejected_clients`, `update_norms`, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from feddat.config import FederationConfig, PrivacyConfig, RunConfig
from feddat.errors import FedDATError
from feddat.federation.aggregate import (DP_DELTA, add_gaussian_noise, clip_update, combine, dp_epsilon,
                                         dp_noise_std, robust_minimum, update_bytes, update_norm,
                                         validate_update, weighted_mean)
from feddat.seeding import mix_seed

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerRules:
    """What the server's round reads of a run's config: its federation and privacy sections, the seed (of the
    DP noise) and the most training examples one client can hold (the cap on a claimed FedAvg weight)."""

    federation: FederationConfig
    privacy: PrivacyConfig
    seed: int
    max_examples: int

    @classmethod
    def of(cls, cfg: RunConfig) -> "ServerRules":
        return cls(cfg.section("federation"), cfg.section("privacy"), cfg.seed, cfg.max_train_examples)


def aggregate(rules: ServerRules, updates: dict[str, State], num_examples: dict[str, int], reference: State,
              round_idx: int) -> tuple[State, dict]:
    """The new global adapter from accepted updates, and what to record about it (`aggregated_clients` when
    the rule drops some, `dp` when DP is on). Updates are taken in client-name order, so every engine
    computes the same numbers."""
    fed, priv = rules.federation, rules.privacy
    names = sorted(updates)
    ups = [updates[n] for n in names]
    weights = [float(num_examples[n]) if fed.aggregation == "samples" else 1.0 for n in names]
    info: dict = {}
    if priv.dp_clip > 0:
        clipped, norms = zip(*(clip_update(u, reference, priv.dp_clip) for u in ups))
        new = weighted_mean(list(clipped), weights)
        std = dp_noise_std(priv.dp_noise_multiplier, priv.dp_clip, weights) if priv.dp_noise_multiplier > 0 else 0.0
        if std > 0:
            new = add_gaussian_noise(new, std, mix_seed(rules.seed, round_idx, 0xD1F))
        info["dp"] = {"noise_std": std, "clipped_clients": [n for n, x in zip(names, norms) if x > priv.dp_clip]}
        return new, info
    new, used = combine(fed.aggregation, ups, weights, priv.byzantine, priv.trim_fraction)
    if len(used) < len(names):
        info["aggregated_clients"] = [names[i] for i in used]
    return new, info


def privacy_report(cfg: RunConfig) -> dict | None:
    """results.json's `privacy` entry: the DP parameters and epsilon for the planned rounds (None if DP is off)."""
    if not cfg.dp:
        return None
    eps = dp_epsilon(cfg.dp_noise_multiplier, cfg.rounds, DP_DELTA)
    return {
        "mechanism": "central DP, fixed clipping: each client's change of the global adapter clipped to "
                     "dp_clip (L2), averaged, Gaussian noise of std noise_multiplier * clip * max(w) / sum(w) "
                     "(clip / n for equal weights) added to the aggregate",
        "dp_clip": cfg.dp_clip, "dp_noise_multiplier": cfg.dp_noise_multiplier, "rounds": cfg.rounds,
        "delta": DP_DELTA, "epsilon": eps if eps != float("inf") else None,
        "accounting": "client-level, every client in every round (no subsampling), the number of clients "
                      "public; Renyi DP of the Gaussian mechanism composed over the rounds",
    }


class RoundCollector:
    """One round's answers as the server sees them; see the module docstring."""

    def __init__(self, rules: ServerRules, names: list[str], shares: bool, reference: State | None, round_idx: int):
        self.rules, self.names, self.shares, self.reference, self.round_idx = rules, names, shares, reference, round_idx
        self.fed, self.priv = rules.federation, rules.privacy
        self.train: dict[str, dict] = {}
        self.sizes: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.accepted: dict[str, State] = {}
        self.rejected: dict[str, str] = {}
        self.missing: dict[str, str] = {name: "no answer" for name in names}
        self.norms: dict[str, float] = {}
        self.attempts = 1
        self.info: dict = {}

    @property
    def need(self) -> int:
        dp = self.priv.dp_clip > 0
        rule = robust_minimum(self.fed.aggregation, self.priv.byzantine) if self.shares and not dp else 1
        return max(self.fed.min_clients, rule)

    @property
    def usable(self) -> int:
        return len(self.accepted) if self.shares else len(self.train)

    def enough(self) -> bool:
        return self.usable >= self.need

    def failed(self, name: str, reason: str) -> None:
        self.missing[name] = reason
        log.warning("round %d: no result from client %s: %s", self.round_idx + 1, name, reason)

    def answered(self, name: str, metrics: dict[str, float], num_examples: int, update: State | None) -> None:
        """A client's answer: its train metrics always count; its update is screened (shared methods)."""
        self.missing.pop(name, None)
        self.train[name] = dict(metrics)
        # a FedAvg weight is the server's to know: a client claiming more examples than it holds is capped
        self.sizes[name] = max(1, min(int(num_examples), self.rules.max_examples))
        if self.sizes[name] != num_examples:
            log.warning("round %d: client %s claims %s training examples; weighting it by %d",
                        self.round_idx + 1, name, num_examples, self.sizes[name])
        if not self.shares:
            return
        update = update or {}
        self.sent[name] = update_bytes(update)
        try:
            validate_update(update, self.reference, name, self.priv.max_update_norm or None)
        except FedDATError as e:
            self.rejected[name] = str(e)
            log.warning("round %d: rejected the update of client %s: %s", self.round_idx + 1, name, e)
            return
        self.accepted[name] = update
        self.norms[name] = update_norm(update, self.reference)

    def to_retry(self) -> list[str]:
        """Clients to ask again (those without an answer; a rejected answer is not asked again)."""
        return [n for n in self.names if n in self.missing]

    def retry(self) -> bool:
        """Whether to ask the missing clients again (and count the attempt)."""
        if self.enough() or self.attempts > self.fed.round_retries or not self.to_retry():
            return False
        self.attempts += 1
        log.warning("round %d: %d usable result(s), %d needed; asking %s again (attempt %d of %d)",
                    self.round_idx + 1, self.usable, self.need, ", ".join(self.to_retry()), self.attempts,
                    self.fed.round_retries + 1)
        return True

    def failure(self) -> FedDATError:
        why = [f"{n}: {r}" for n, r in self.missing.items()] + [f"{n}: rejected ({r})" for n, r in self.rejected.items()]
        if self.need > self.fed.min_clients:
            rule = f"aggregation={self.fed.aggregation} with byzantine={self.priv.byzantine} needs {self.need} updates"
        else:
            rule = f"min-clients={self.fed.min_clients}"
        return FedDATError(
            f"round {self.round_idx + 1} failed: {self.usable} of {len(self.names)} clients gave a usable result "
            f"after {self.attempts} attempt(s), {rule}. " + "; ".join(why) + ". The rounds before are kept in the "
            "run's checkpoint/ (resume with `feddat run --resume DIR`); round-retries re-asks clients that did not "
            "answer (not rejected ones)")

    def aggregate(self) -> State | None:
        """The new global adapter (the reference when the method shares nothing); raises failure() if short."""
        if not self.enough():
            raise self.failure()
        if not self.shares:
            return self.reference
        new, self.info = aggregate(self.rules, self.accepted, self.sizes, self.reference, self.round_idx)
        return new

    def bytes_sent(self) -> dict[str, int]:
        return dict(self.sent) or {n: 0 for n in self.names}

    def extra(self) -> dict:
        """The round entry's fault and screening record (only what happened)."""
        out: dict = {}
        if self.missing:
            out["missing_clients"] = dict(self.missing)
        if self.rejected:
            out["rejected_clients"] = dict(self.rejected)
        if self.norms:
            out["update_norms"] = {n: self.norms[n] for n in sorted(self.norms)}
        if self.attempts > 1:
            out["attempts"] = self.attempts
        out.update(self.info)
        return out
