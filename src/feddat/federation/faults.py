"""Fault injection applied: clients that crash, answer late or send broken or hostile updates, on purpose.

The grammar and its table of kinds are in `feddat.fault_spec` (`RunConfig.fault_injection`). A crashed or late
client keeps the private state it had (crash) or trained (late) as a real one would; the server sees no update
from it. Both engines apply the same faults through `check_crash`, `delay` and `corrupt`.
"""

from __future__ import annotations

import torch

from feddat.fault_spec import Fault

State = dict[str, torch.Tensor]
EXTRA_KEY = "injected.extra"


class InjectedFault(RuntimeError):
    """What a client raises when fault injection makes it crash."""


def active(faults: list[Fault], client: str, round_number: int) -> list[Fault]:
    return [f for f in faults if f.hits(client, round_number)]


def check_crash(faults: list[Fault], client: str, round_number: int, attempt: int) -> None:
    """Raise InjectedFault if the client crashes in this round (and attempt, for `flaky`)."""
    for f in active(faults, client, round_number):
        if f.kind == "crash" or (f.kind == "flaky" and attempt == 0):
            raise InjectedFault(f"injected {f.kind} of client {client} in round {round_number}")


def delay(faults: list[Fault], client: str, round_number: int) -> float:
    """Seconds the client's reply is late in this round."""
    return sum(f.value for f in active(faults, client, round_number) if f.kind == "slow")


def corrupt(update: State | None, reference: State | None, faults: list[Fault], client: str,
            round_number: int) -> State | None:
    """The update as the faults make the client send it (unchanged when none applies)."""
    hits = [f for f in active(faults, client, round_number) if f.kind in ("nan", "scale", "signflip", "shape",
                                                                         "extra", "empty")]
    if update is None or not hits:
        return update
    out = {k: v.clone() for k, v in update.items()}
    for f in hits:
        first = next(iter(out)) if out else None
        if f.kind in ("scale", "signflip"):
            factor = -1.0 if f.kind == "signflip" else f.value
            out = {k: (reference[k].double() + factor * (v.double() - reference[k].double())).to(v.dtype)
                   if k in reference else v for k, v in out.items()}
        elif f.kind == "nan" and first is not None:
            out[first].view(-1)[0] = float("nan")
        elif f.kind == "shape" and first is not None:
            out[first] = out[first][:-1].clone()
        elif f.kind == "extra":
            out[EXTRA_KEY] = torch.zeros(1)
        elif f.kind == "empty":
            out = {}
    return out
