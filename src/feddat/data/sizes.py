"""How many questions each client has per split: what generated and real benchmarks are both sized by."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from feddat.errors import FedDATError


@dataclass(frozen=True)
class Sizes:
    train: int = 400
    val: int = 200
    test: int = 1000

    def validate(self) -> None:
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v <= 0:
                raise FedDATError(f"{k}-per-client must be a positive integer, got {v!r}")
