"""Clients' private state between their rounds, in memory or one safetensors file per client.

The in-process engine keeps every client's private state (its local adapters, FedDAT's frozen copy, its head and
the method's further private tensors) in a dict while the federation is small. With many clients, or whenever
`client_state_dir` is set, it keeps them on disk instead (`DiskStates`): a client's file is read when the client
trains or is scored and written when it has trained, so memory holds the states of the clients at work only. A
client that has not trained yet has no file: its state is the worker's initial one, computed from the seed when
asked for (the same tensors the in-memory dict starts with). Safetensors round-trips tensors bit for bit, so both
stores give the same numbers.

A Flower node follows the same rule (`node_states`): with client_state_dir set, or more than
STATES_IN_MEMORY_UP_TO clients, its clients' states live only in their files between their rounds (`RoundStates`,
one file per round the client trained, the newest KEEP_ROUNDS kept so that a run can be resumed after a round the
server did not checkpoint); else in the node's memory (Flower's context.state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

import torch

from feddat.errors import FedDATError

State = dict[str, torch.Tensor]

STATES_IN_MEMORY_UP_TO = 32     # more clients than this: their private states go to disk
NODE_LOCAL = ("model_path", "cache_dir", "device", "threads", "client_state_dir", "data_dir", "columns",
              "skip_bad_records")
KEEP_ROUNDS = 3   # Flower: rounds of a client's state kept on disk (enough to resume after a damaged checkpoint)


def run_key(config: dict) -> str:
    """Names a run's state directory: its config without the settings of where and how fast it runs."""
    values = {k: v for k, v in config.items() if k not in NODE_LOCAL}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def read_state(path: Path, client: str, remedy: str) -> State:
    """A client's private state from its file; a FedDATError naming the client, the file and `remedy` if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedDATError(f"the private state of client {client} in {path} is unreadable ({first}); the client's "
                          f"adapters and head are lost: {remedy}") from e


def write_state(path: Path, state: State) -> None:
    """Write a state to a temporary file, then rename it: a reader sees the old file or the new one, whole."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


class DiskStates(MutableMapping):
    """{client name: private state}, one `<directory>/<client>.safetensors` per client that has trained.

    `initial(name)` gives the state of a client without a file. A file that cannot be read is a FedDATError
    naming the client and the file. `close()` removes the directory when the store made it (a temporary one).
    """

    def __init__(self, directory: Path, names: list[str], initial: Callable[[str], State], owned: bool = False):
        self.directory = Path(directory)
        self.names = list(names)
        self._known = set(self.names)
        self.initial = initial
        self.owned = owned
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def _check(self, name: str) -> None:
        if name not in self._known:
            raise KeyError(name)

    def __getitem__(self, name: str) -> State:
        self._check(name)
        path = self.path(name)
        if not path.exists():
            return self.initial(name)
        return read_state(path, name, "resume the run from its checkpoint (feddat run --resume DIR)")

    def __setitem__(self, name: str, state: State) -> None:
        self._check(name)
        write_state(self.path(name), state)

    def __delitem__(self, name: str) -> None:
        self._check(name)
        self.path(name).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def clear_files(self) -> None:
        """Forget every client's saved state (a new run starts from the initial ones)."""
        for name in self.names:
            self.path(name).unlink(missing_ok=True)

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)


def keeps_states_on_disk(client_state_dir: str | None, n_clients: int) -> bool:
    return bool(client_state_dir) or n_clients > STATES_IN_MEMORY_UP_TO


def open_states(config: dict, client_state_dir: str | None, names: list[str],
                initial: Callable[[str], State]) -> MutableMapping:
    """The run's store of private states: a dict holding every client's initial state (a small federation
    without client_state_dir), else a fresh DiskStates under `<client_state_dir>/inprocess/<run key>/` (or a
    temporary directory, removed by close())."""
    if not keeps_states_on_disk(client_state_dir, len(names)):
        return {name: initial(name) for name in names}
    if client_state_dir:
        store = DiskStates(Path(client_state_dir) / "inprocess" / run_key(config), names, initial)
        store.clear_files()  # a new or resumed run: a resumed one rewrites them from its checkpoint
        return store
    return DiskStates(Path(tempfile.mkdtemp(prefix="feddat-states-")), names, initial, owned=True)


class RoundStates:
    """A Flower node's clients' private states: `<directory>/<client>/round-<NNNN>.safetensors`, written after
    every round the client trains (the newest KEEP_ROUNDS kept), read when it trains or is scored.

    `resumable`: the directory is the node's client_state_dir and outlives the run, which can then be resumed
    from a server checkpoint. Otherwise it is a temporary one: `finish(client)` removes a client's files after
    its final evaluation, and the directories left empty.
    """

    def __init__(self, directory: Path, resumable: bool):
        self.directory = Path(directory)
        self.resumable = resumable

    def rounds(self, name: str) -> list[int]:
        """The rounds of the client's saved states, oldest first."""
        d = self.directory / name
        return sorted(int(p.stem.split("-")[1]) for p in d.glob("round-*.safetensors")) if d.is_dir() else []

    def path(self, name: str, round_number: int) -> Path:
        return self.directory / name / f"round-{round_number:04d}.safetensors"

    def save(self, name: str, round_number: int, state: State) -> None:
        (self.directory / name).mkdir(parents=True, exist_ok=True)
        write_state(self.path(name, round_number), state)
        for old in self.rounds(name)[:-KEEP_ROUNDS]:
            self.path(name, old).unlink(missing_ok=True)

    def load(self, name: str, upto: int) -> State | None:
        """The client's newest saved state of round `upto` or before; None if it has none."""
        usable = [r for r in self.rounds(name) if r <= upto]
        if not usable:
            return None
        remedy = ("resume the run from its checkpoint with this node's client-state-dir" if self.resumable
                  else "run again (set client-state-dir to make the run resumable)")
        return read_state(self.path(name, usable[-1]), name, remedy)

    def start(self, name: str, resumed_from: int) -> None:
        """At the start of a run: drop the client's states of rounds after `resumed_from` (all but the initial
        one in a new run: they belong to an earlier run of this config, or to rounds an interrupted run did not
        checkpoint), so every state left belongs to this run's history. A resumed client without a state of
        round `resumed_from` or before is an error."""
        rounds = self.rounds(name)
        for r in rounds:
            if r > resumed_from:
                self.path(name, r).unlink(missing_ok=True)
        if resumed_from > 0 and not any(r <= resumed_from for r in rounds):
            raise FedDATError(f"client {name} has no saved state of round {resumed_from} or before in "
                              f"{self.directory / name}: run its SuperNode with the client-state-dir of the "
                              "interrupted run")

    def finish(self, name: str) -> None:
        """A temporary store, after the client's final evaluation: remove its files and the directories left
        empty (the run's own once every client it served has finished)."""
        if self.resumable:
            return
        shutil.rmtree(self.directory / name, ignore_errors=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass  # other clients' states are still there


def temporary_node_dir(config: dict, run_id: int) -> Path:
    """Where the processes of one machine keep a Flower run's states without client_state_dir: named by the
    run's id and key, so every process serving the run's clients (simulation actors, SuperNodes) finds them."""
    return Path(tempfile.gettempdir()) / f"feddat-states-run{run_id}-{run_key(config)}"


def remove_temporary_node_dirs(run_id: int) -> None:
    """Remove what a Flower run (by id) left in this machine's temporary directories, whatever its end."""
    for d in Path(tempfile.gettempdir()).glob(f"feddat-states-run{run_id}-*"):
        shutil.rmtree(d, ignore_errors=True)


def node_states(config: dict, client_state_dir: str | None, n_clients: int, run_id: int) -> RoundStates | None:
    """A Flower node's store of private states: None (they stay in the node's memory, context.state) for a
    federation of up to STATES_IN_MEMORY_UP_TO clients without client_state_dir; else files under
    `<client_state_dir>/<run key>/` (resumable) or under `temporary_node_dir`."""
    if not keeps_states_on_disk(client_state_dir, n_clients):
        return None
    if client_state_dir:
        return RoundStates(Path(client_state_dir) / run_key(config), resumable=True)
    return RoundStates(temporary_node_dir(config, run_id), resumable=False)
