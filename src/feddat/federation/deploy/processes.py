"""The processes of a deployment: started in sessions of their own by one long-lived thread (`Spawner`), and
stopped with every process below them and every process left in their session (`stop_processes`), named by
(pid, start time) so that a reused pid is never signalled (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

STOP_GRACE_S = 5.0                 # between SIGTERM and SIGKILL when stopping

# A process is named by (pid, start time): the system gives a pid again once it is free, so a pid alone could
# name a stranger by the time it is signalled.
Identity = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the name (state, ppid, pgrp, session, ..., start time at 19)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every process (Linux /proc; elsewhere empty)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None:
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_family(pid: int, tree: bool = True) -> set[Identity]:
    """What stopping process `pid` must reach: every process left in its session (each process here is started
    as a session leader, so its session id is its pid; this finds what it started even after it died and init
    adopted them) and, with `tree` (only while `pid` is ours, i.e. not yet reaped and so not reused), `pid` and
    every process below it."""
    table = _process_table()
    pids = {p for p, (_, session, _) in table.items() if session == pid}
    if tree and pid in table:
        pids |= {pid, *_descendants(pid, table)}
    return {(p, table[p][2]) for p in pids}


def running(identity: Identity) -> bool:
    """Whether that process still runs (a zombie does not)."""
    fields = _stat(identity[0])
    return fields is not None and int(fields[19]) == identity[1] and fields[0] != "Z"


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started it dies (Linux), so nothing outlives
    a deployment whose driver was killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Spawner:
    """A thread that runs the calls given to it, one at a time, until closed."""

    def __init__(self):
        import queue

        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="deploy-spawner", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, box, done = item
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the caller
                box.append((False, e))
            done.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        box: list = []
        done = threading.Event()
        self._calls.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(timeout=5)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0      # where this process's output starts in `log` (a restarted node appends to its log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """What this process wrote to its log."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def stop_processes(processes: list[Process], grace: float = STOP_GRACE_S) -> set[Identity]:
    """SIGTERM each process, every process below it and every process left in its session; SIGKILL what is
    left after `grace`. Returns the processes it stopped."""
    targets: set[Identity] = set()

    def gather() -> None:
        for p in processes:
            targets.update(process_family(p.pid, tree=p.popen.poll() is None))

    def signal_all(sig: int) -> None:
        for identity in targets:
            if running(identity):
                try:
                    os.kill(identity[0], sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait_gone() -> None:
        end = time.time() + grace
        while time.time() < end and any(running(i) for i in targets):
            for p in processes:
                p.popen.poll()  # reap our own children
            time.sleep(0.1)

    gather()
    signal_all(signal.SIGTERM)
    wait_gone()
    gather()  # and whatever was started meanwhile
    if any(running(i) for i in targets):
        signal_all(signal.SIGKILL)
        wait_gone()
    return targets
