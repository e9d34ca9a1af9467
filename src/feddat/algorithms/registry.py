"""Every method by name: adding one is one module and one line here."""

from __future__ import annotations

from feddat.algorithms.ablations import (FedDATKDStudent, FedDATKDTeacher, FedDATNoFrozen, FedDATNoMKD,
                                         FedDATSingleTeacher)
from feddat.algorithms.base import Method
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
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FedDATError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (`feddat methods` lists them)")
    return METHODS[name]()
