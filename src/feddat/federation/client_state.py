"""Clients' private state between their rounds, in memory or one safetensors file per client.

The in-process engine keeps every client's private state (its local adapters, FedDAT's frozen copy, its head and
the method's further private tensors) in a dict while the federation is small. With many clients, or whenever
`client_state_dir` is set, it keeps them on disk instead (`DiskStates`): a client's file is read when the client
trains or is scored and written when it has trained, so memory holds the states of the clients at work only. A
client that has not trained yet has no file: its state is the worker's initial one, computed from the seed when
asked for (the same tensors the in-memory dict starts with). Safetensors round-trips tensors bit for bit, so both
stores give the same numbers.
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
NODE_LOCAL = ("model_path", "cache_dir", "device", "threads", "client_state_dir")


def run_key(config: dict) -> str:
    """Names a run's state directory: its config without the settings of where and how fast it runs."""
    values = {k: v for k, v in config.items() if k not in NODE_LOCAL}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self._check(name)
        path = self.path(name)
        if not path.exists():
            return self.initial(name)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FedDATError(f"the private state of client {name} in {path} is unreadable ({first}); the client's "
                              "adapters and head are lost: resume the run from its checkpoint "
                              "(feddat run --resume DIR)") from e

    def __setitem__(self, name: str, state: State) -> None:
        from safetensors.torch import save_file

        self._check(name)
        path = self.path(name)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

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
