"""Which clients train in a round (client sampling), the same whichever engine runs the round.

The draw depends on the run's seed and the round only (not on the engine, the order in which clients answer or
what happened in earlier rounds), so both engines pick the same clients and a resumed run needs nothing saved
to go on drawing as the interrupted one would have.
"""

from __future__ import annotations

import numpy as np

from feddat.seeding import mix_seed

SAMPLING_STREAM = 0x5A3B1E


def sample_clients(seed: int, round_idx: int, n_clients: int, k: int) -> list[int]:
    """The indices (ascending) of the `k` of `n_clients` clients that train in round `round_idx` (from 0);
    every client when k >= n_clients."""
    if k >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng(mix_seed(seed, round_idx, SAMPLING_STREAM))
    return sorted(int(i) for i in rng.choice(n_clients, size=k, replace=False))
