"""Every method by name: adding one is one module and one line here."""

from __future__ import annotations

from feddat.algorithms.base import Method
from feddat.algorithms.baselines import FedAvgAdapter, FedAvgAdapter2x, HeadOnly, LocalAdapter
from feddat.algorithms.feddat import FedDAT
from feddat.errors import FedDATError

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedDAT, FedAvgAdapter, FedAvgAdapter2x, LocalAdapter, HeadOnly)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FedDATError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (`feddat methods` lists them)")
    return METHODS[name]()
