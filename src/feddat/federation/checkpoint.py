"""Checkpoints of a run after every round, for `feddat run --resume DIR` (in-process engine).

DIR/checkpoint/round-<NNNN>/ holds the state after round NNNN (counted from 1):
- `server.json`: format, the round, the run config, the client-order RNG state, History so far;
- `global.safetensors`: the global adapter (absent when the method shares nothing);
- `rng.safetensors`: torch's global RNG state;
- `clients/<client>.safetensors`: every client's private state (local adapters, head, ...);
- `MANIFEST.json`, written last: every file's size and sha256.

A checkpoint is written into `round-<NNNN>.partial/`, each file flushed to disk, the manifest last, and then
renamed to `round-<NNNN>` (a directory rename is atomic), so a directory without `.partial` is complete. The
newest two are kept: if the newest turns out damaged (its checksums do not match), loading reports it with a
FedDATError naming the file and falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from feddat.config import RunConfig
from feddat.errors import FedDATError
from feddat.federation.aggregate import validate_update
from feddat.models.checkpoints import file_sha256

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

FORMAT = "feddat-checkpoint-v1"
CHECKPOINT_DIR = "checkpoint"
MANIFEST = "MANIFEST.json"
SERVER = "server.json"
GLOBAL = "global.safetensors"
RNG = "rng.safetensors"
CLIENTS = "clients"
KEEP = 2
_NAME = re.compile(r"^round-(\d{4,})$")
_CLIENT = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Checkpoint:
    path: Path
    round: int                        # rounds completed
    config: dict[str, Any]
    global_state: State | None
    states: dict[str, State]
    order_rng: dict[str, Any]
    torch_rng: torch.Tensor
    history: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were passed over


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: State) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _sync(path)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, completed: int, config: dict[str, Any], global_state: State | None,
                    states: dict[str, State], order_rng: dict[str, Any], history: dict[str, Any]) -> Path:
    """Write the checkpoint after `completed` rounds atomically; keep the newest KEEP; return its directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{completed:04d}"
    tmp = root / f"round-{completed:04d}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / CLIENTS).mkdir(parents=True)
    files = []
    if global_state is not None:
        _write_tensors(tmp / GLOBAL, global_state)
        files.append(GLOBAL)
    _write_tensors(tmp / RNG, {"torch": torch.get_rng_state()})
    files.append(RNG)
    for name in sorted(states):
        if not _CLIENT.match(name):
            raise FedDATError(f"client name {name!r} cannot name a checkpoint file")
        rel = f"{CLIENTS}/{name}.safetensors"
        _write_tensors(tmp / rel, states[name])
        files.append(rel)
    _write_json(tmp / SERVER, {"format": FORMAT, "round": completed, "config": config, "order_rng": order_rng,
                               "clients": sorted(states), "history": history})
    files.append(SERVER)
    _write_json(tmp / MANIFEST, {"format": FORMAT, "round": completed,
                                 "files": {rel: {"bytes": (tmp / rel).stat().st_size, "sha256": file_sha256(tmp / rel)}
                                           for rel in files}})
    _sync(tmp / CLIENTS)
    _sync(tmp)
    if final.exists():  # a checkpoint of this round from an earlier attempt of the run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _sync(root)
    for old in complete_checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("round-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory whose every file is present with its recorded size and sha256;
    otherwise FedDATError naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FedDATError(f"{manifest_path} is missing: the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"not a {FORMAT} manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedDATError(f"{manifest_path} is unreadable or corrupt ({e})") from e
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise FedDATError(f"{f} is missing from the checkpoint")
        if f.stat().st_size != want.get("bytes") or file_sha256(f) != want.get("sha256"):
            raise FedDATError(f"{f} does not match its sha256 in {manifest_path}: the file is truncated or corrupt")
    return manifest


def _read_tensors(path: Path) -> State:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FedDATError(f"{path} is unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else e})") from e


def read_checkpoint(path: Path) -> Checkpoint:
    """One verified checkpoint directory; FedDATError naming the file at fault."""
    manifest = verify_checkpoint(path)
    server_path = path / SERVER
    try:
        server = json.loads(server_path.read_text())
        completed, config, clients = int(server["round"]), dict(server["config"]), list(server["clients"])
        history, order_rng = dict(server["history"]), dict(server["order_rng"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedDATError(f"{server_path} is unreadable or corrupt ({e})") from e
    if server.get("format") != FORMAT or completed != manifest.get("round"):
        raise FedDATError(f"{server_path} is not a {FORMAT} server state of round {manifest.get('round')}")
    states = {}
    for name in clients:
        f = path / CLIENTS / f"{name}.safetensors"
        if f"{CLIENTS}/{name}.safetensors" not in manifest["files"]:
            raise FedDATError(f"{f} is not listed in {path / MANIFEST}")
        states[name] = _read_tensors(f)
    global_state = _read_tensors(path / GLOBAL) if GLOBAL in manifest["files"] else None
    rng = _read_tensors(path / RNG)
    if "torch" not in rng:
        raise FedDATError(f"{path / RNG} holds no torch RNG state")
    return Checkpoint(path, completed, config, global_state, states, order_rng, rng["torch"], history)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest usable checkpoint of a run. A damaged newer one is reported (logged, and listed in
    `skipped`) and the previous one used; FedDATError naming every damaged file when none is usable."""
    candidates = complete_checkpoints(run_dir)
    if not candidates:
        raise FedDATError(f"{checkpoint_root(run_dir)} holds no complete checkpoint: nothing to resume "
                          "(checkpoints are written after every round of a `feddat run --out DIR`)")
    problems = []
    for path in reversed(candidates):
        try:
            ck = read_checkpoint(path)
        except FedDATError as e:
            problems.append(str(e))
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        ck.skipped = problems
        return ck
    raise FedDATError(f"no usable checkpoint in {checkpoint_root(run_dir)}: " + "; ".join(problems))


def check_fits(ck: Checkpoint, global_template: State | None, templates: dict[str, State]) -> None:
    """FedDATError naming the file unless the checkpoint's tensors fit the model its config builds (the same
    clients; every state with the template's keys, shapes and dtypes)."""
    if sorted(ck.states) != sorted(templates):
        raise FedDATError(f"{ck.path / SERVER} names clients {sorted(ck.states)}, the benchmark has "
                          f"{sorted(templates)}")
    pairs = [(ck.path / CLIENTS / f"{n}.safetensors", ck.states[n], templates[n]) for n in sorted(templates)]
    if (ck.global_state is None) != (global_template is None):
        raise FedDATError(f"{ck.path}: the checkpoint {'lacks' if global_template is not None else 'has'} a "
                          f"global adapter, the method {'has' if global_template is not None else 'has none'}")
    if global_template is not None:
        pairs.append((ck.path / GLOBAL, ck.global_state, global_template))
    for f, got, want in pairs:
        try:
            validate_update(got, want, f.stem)
        except FedDATError as e:
            raise FedDATError(f"{f} does not fit the model its config builds (another backbone or adapter "
                              f"size?): {e}") from None


# where and how fast, not what is computed
RESUME_MAY_CHANGE = ("threads", "device", "cache_dir", "tracker", "client_state_dir", "data_dir",
                     "prefix_cache_mb")


def resume_config(saved: dict[str, Any], given: dict[str, Any]) -> RunConfig:
    """The RunConfig to resume with: the checkpoint's, with the given values that may change
    (RESUME_MAY_CHANGE); FedDATError listing every given value that conflicts with the checkpoint's."""
    conflicts = [f"{k.replace('_', '-')} (checkpoint: {saved.get(k)!r}, given: {v!r})" for k, v in sorted(given.items())
                 if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if conflicts:
        raise FedDATError("the resumed run's config is the one saved in its checkpoint; these values conflict "
                          "with it: " + ", ".join(conflicts) + ". Leave them out, or start a new run with --out")
    return RunConfig.from_dict({**saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}})
