"""Every method by name: adding one is one module and one line here."""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any, Mapping

from feddat.algorithms.ablations import (FedDATKDStudent, FedDATKDTeacher, FedDATNoFrozen, FedDATNoMKD,
                                         FedDATSingleTeacher)
from feddat.algorithms.authors import (FedAvgAdapterAuthors, FedDATAuthors, FedDATAuthorsFreeze, FedDATAuthorsSchedule,
                                       FedDATAuthorsZeroGrad)
from feddat.algorithms.base import Method, MethodConfig
from feddat.algorithms.baselines import FedAvgAdapter, FedAvgAdapter2x, FedProxAdapter, HeadOnly, LocalAdapter
from feddat.algorithms.centralised import CentralisedAdapter
from feddat.algorithms.feddat import FedDAT
from feddat.algorithms.peft_baselines import (FedAvgBitFit, FedAvgFull, FedAvgLayerNorm, FedAvgLoRA,
                                              FedAvgPrompt)
from feddat.algorithms.personalised import APFLAdapter, DittoAdapter, FedRepAdapter
from feddat.errors import FedDATError

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    FedDAT, FedAvgAdapter, FedAvgAdapter2x, LocalAdapter, HeadOnly,
    FedDATNoMKD, FedDATSingleTeacher, FedDATNoFrozen,                   # FedDAT's ablations
    DittoAdapter, FedRepAdapter, APFLAdapter,                           # personalised FL on the same adapters
    FedProxAdapter, FedAvgBitFit, FedAvgLayerNorm, FedAvgFull, FedAvgLoRA, FedAvgPrompt,  # other PEFT / FL
    CentralisedAdapter,                                                 # the pooled-data upper reference
    FedDATKDStudent, FedDATKDTeacher,                                   # one-way distillation probes (not in 'all')
    FedDATAuthors, FedDATAuthorsSchedule, FedDATAuthorsZeroGrad, FedDATAuthorsFreeze,  # the authors' code (not in
    FedAvgAdapterAuthors,                                                              # 'all'; docs/method.md)
)}




def method_settings() -> dict[str, tuple[Field, list[str]]]:
    """Every method setting by key: its field (default, type, help) and the methods that read it. A key shared by
    several methods comes from one config class (FedDAT's ablations share FedDAT's), so it means one thing."""
    out: dict[str, tuple[Field, list[str]]] = {}
    owner: dict[str, type[MethodConfig]] = {}
    for name, cls in METHODS.items():
        for f in fields(cls.Config):
            if f.name in owner and not issubclass(cls.Config, owner[f.name]) and \
                    not issubclass(owner[f.name], cls.Config):
                raise TypeError(f"method setting {f.name!r} is declared by both {owner[f.name].__name__} and "
                                f"{cls.Config.__name__}: give one of them another name")
            owner.setdefault(f.name, cls.Config)
            out.setdefault(f.name, (f, []))[1].append(name)
    return out


def method_config(name: str, values: Mapping[str, Any] | None = None) -> MethodConfig:
    """Method `name`'s settings from `values` (a run config's keys: those of other methods are ignored); the
    config class validates them."""
    cls = METHODS[name].Config
    own = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in own})


def get_method(name: str, values: Mapping[str, Any] | None = None) -> Method:
    """The method `name`, configured from `values` (its own keys among them; see `method_config`)."""
    if name not in METHODS:
        raise FedDATError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (`feddat methods` lists them)")
    return METHODS[name](method_config(name, values))
