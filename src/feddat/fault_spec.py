"""The grammar of fault injection (`RunConfig.fault_injection`): which client fails how and when.

The run config checks a spec against the run's clients and rounds; `feddat.federation.faults` applies it.

`RunConfig.fault_injection` is a comma-separated list of `KIND:CLIENT[@ROUNDS][=VALUE]`, rounds counted from 1
(as the progress bar does), ROUNDS one round `2` or a range `2-4`, every round when left out:

| kind       | the client ...                                                        | value            |
|------------|-----------------------------------------------------------------------|------------------|
| `crash`    | raises instead of training, on every attempt of the round              | -                |
| `flaky`    | raises on the round's first attempt only (a retry succeeds)            | -                |
| `slow`     | answers VALUE seconds late (in-process: added to its measured time;    | seconds          |
|            | Flower: the ClientApp sleeps)                                          |                  |
| `nan`      | sends an update holding a NaN                                          | -                |
| `scale`    | sends global + VALUE * (its update - global)                           | factor, e.g. -10 |
| `signflip` | sends global - (its update - global) (`scale` with -1)                 | -                |
| `shape`    | sends an update whose first tensor lost a row                          | -                |
| `extra`    | sends an update with an extra key                                      | -                |
| `empty`    | sends no update at all                                                 | -                |

e.g. `crash:textured@2` (textured crashes in round 2), `nan:night@1`, `scale:blurry=-10`, `signflip:blurry`.
A crashed or late client keeps the private state it had (crash) or trained (late) as a real one would; the
server sees no update from it. Both engines apply the same faults through `check_reply` and `corrupt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from feddat.errors import FedDATError

KINDS = {"crash": False, "flaky": False, "slow": True, "nan": False, "scale": True, "signflip": False,
         "shape": False, "extra": False, "empty": False}   # kind -> takes a value
_ITEM = re.compile(r"^(?P<kind>[a-z]+):(?P<client>[A-Za-z0-9_.-]+?)(?:@(?P<first>\d+)(?:-(?P<last>\d+))?)?"
                   r"(?:=(?P<value>[^,]+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    client: str
    first: int | None = None    # rounds, from 1; None = every round
    last: int | None = None
    value: float | None = None

    def hits(self, client: str, round_number: int) -> bool:
        return client == self.client and (self.first is None or self.first <= round_number <= self.last)


def parse_faults(spec: str, clients: list[str] | None = None, rounds: int | None = None) -> list[Fault]:
    """The faults of a spec; FedDATError naming the bad item (unknown kind or client, round out of range)."""
    faults = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise FedDATError(f"fault-injection item {item!r} is not KIND:CLIENT[@ROUND[-ROUND]][=VALUE] "
                              f"(e.g. crash:textured@2, scale:blurry=-10)")
        kind, client = m["kind"], m["client"]
        if kind not in KINDS:
            raise FedDATError(f"fault-injection item {item!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        if clients is not None and client not in clients:
            raise FedDATError(f"fault-injection item {item!r}: no client {client!r}; clients: {', '.join(clients)}")
        first = int(m["first"]) if m["first"] else None
        last = int(m["last"]) if m["last"] else first
        if first is not None and (first < 1 or last < first or (rounds is not None and last > rounds)):
            raise FedDATError(f"fault-injection item {item!r}: rounds must lie within 1..{rounds or 'rounds'}")
        value = None
        if KINDS[kind]:
            try:
                value = float(m["value"])
            except (TypeError, ValueError):
                raise FedDATError(f"fault-injection item {item!r}: {kind} needs a number, e.g. {kind}:{client}="
                                  f"{'-10' if kind == 'scale' else '60'}") from None
            if value != value or abs(value) == float("inf") or (kind == "slow" and value < 0):
                raise FedDATError(f"fault-injection item {item!r}: {value} is no valid {kind} value")
        elif m["value"] is not None:
            raise FedDATError(f"fault-injection item {item!r}: {kind} takes no value")
        faults.append(Fault(kind, client, first, last, value))
    return faults
