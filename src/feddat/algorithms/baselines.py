"""The controls FedDAT is compared with, all on the same bottleneck adapters and personal heads."""

from __future__ import annotations

from feddat.algorithms.base import Method


class FedAvgAdapter(Method):
    name = "fedavg-adapter"
    summary = "one shared adapter trained locally and averaged by the server (FedAvg + Adapter)"
    adapters = ("global",)
    trained = ("global",)
    shared = "global"
    predict_view = "student"


class FedAvgAdapter2x(FedAvgAdapter):
    name = "fedavg-adapter-2x"
    summary = "FedAvg + Adapter with twice the local epochs: as many optimiser steps per round as FedDAT"
    epochs_factor = 2


class LocalAdapter(Method):
    name = "local-adapter"
    summary = "a private adapter per client, no communication"
    adapters = ("local",)
    trained = ("local",)
    predict_view = "local"


class HeadOnly(Method):
    name = "head-only"
    summary = "a personal head on the frozen backbone, no adapter, no communication"
    predict_view = "none"
