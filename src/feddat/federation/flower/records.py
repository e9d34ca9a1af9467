"""What the Flower apps' messages carry: the record keys, and the codec between records and our objects (state
tensors, the RunConfig). The ClientApp, the Strategy, the ServerApp and SecAgg+'s glue all speak it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from feddat.config import RunConfig, normalise

State = dict[str, torch.Tensor]

ARRAYS, CONFIG, METRICS, CLIENT, RUN_CONFIG = "arrays", "config", "metrics", "client", "run-config"
STATE_KEY = "feddat-client-state"
MODEL_META = "model-meta"


def state_to_record(state: State | None) -> ArrayRecord:
    return ArrayRecord() if not state else ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> State | None:
    """Tensors that own writable memory (Flower's arrays are read-only views of the wire bytes); None if empty."""
    if not len(record):
        return None
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def config_to_record(cfg: RunConfig) -> ConfigRecord:
    """A RunConfig as a ConfigRecord (unset paths are left out: records hold no None)."""
    return ConfigRecord({k: v for k, v in cfg.to_dict().items() if v is not None})


def config_from_values(values: Mapping[str, Any]) -> tuple[RunConfig, Path | None]:
    """A RunConfig and the output directory from Flower's run config (or a record).

    Keys may use dashes or underscores (`lr-adapter` = `lr_adapter`); an empty model-path, cache-dir or tracker
    means unset; `out-dir`, if given, is where the server writes results.json.
    """
    d = normalise(values)
    out = d.pop("out_dir", None) or None
    d.pop("resume_dir", None)  # the ServerApp's business (make_server_app)
    return RunConfig.from_dict(d), Path(out) if out else None


RECEIVED = "received.jsonl"  # in the server's out dir: what every reply the server got carried


def contents(message) -> dict[str, Any]:
    """What a message carries, values of arrays and metrics left out: each record's keys, with an array's shape
    and dtype, and a metric's or config value's type."""
    out: dict[str, Any] = {}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {"arrays": {k: [list(a.shape), str(a.dtype)] for k, a in record.items()}}
        else:
            kind = "metrics" if name == METRICS else "config"
            out[name] = {kind: {k: type(v).__name__ for k, v in record.items()}}
    return out


def log_received(out_dir: Path | None, stage: str, server_round: int, replies) -> None:
    """Append one line per reply to `out_dir/received.jsonl` (nothing without an out dir): the stage, round,
    sending node and `contents`, so an operator can check what left the clients."""
    if out_dir is None:
        return
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / RECEIVED, "a") as f:
        for m in replies:
            line = {"stage": stage, "round": server_round, "node": m.metadata.src_node_id}
            line.update({"error": True} if m.has_error() else {"content": contents(m)})
            f.write(json.dumps(line) + "\n")
