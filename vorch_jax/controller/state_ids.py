"""Integer codes of the seven residency states, shared by value with the engine's `tiers` `State` enum.

The controller is pure arrays, so it speaks these ints; `tiers/` owns the enum with the same values. If either side
renumbers, `tests/controller` (and the engine's own tests) must catch it: keep them in sync by value, not by import.

Quality rank orders the states from worst to best for *use*: an off-device block must be fetched (S4 slower than
S3), a lossy on-device block is cheaper in bytes and worse in quality (S6 < S2 < S1), S0 is the full block on device.
"""

S0, S1, S2, S3, S4, S5, S6 = 0, 1, 2, 3, 4, 5, 6
NUM_STATES = 7

STATE_NAMES = ("S0", "S1", "S2", "S3", "S4", "S5", "S6")
STATE_LONG_NAMES = (
    "full precision on device",
    "int8 on device",
    "int4 on device",
    "host DRAM (pinned_host)",
    "NVMe",
    "in flight",
    "low-rank fallback on device",
)

ON_DEVICE = (S0, S1, S2, S6)  # states that occupy HBM
OFF_DEVICE = (S3, S4)  # states the controller may target off device
LOSSY = (S1, S2, S6)  # states whose representation loses information
IN_FLIGHT = S5  # never a target; reported by the engine while a transition runs

# Device states in upgrade order (worst to best): the knapsack ladder above an off-device base.
DEVICE_LADDER = (S6, S2, S1, S0)

# QUALITY_RANK[s]: higher is better to compute with. S5 ranks like S3 (its bytes are on their way from a tier).
QUALITY_RANK = (5, 4, 3, 1, 0, 1, 2)

IS_ON_DEVICE = tuple(s in ON_DEVICE for s in range(NUM_STATES))
IS_LOSSY = tuple(s in LOSSY for s in range(NUM_STATES))


def state_from_name(name) -> int:
    """'S3' or 3 -> 3; anything else raises ValueError naming the value."""
    if isinstance(name, str) and name.upper() in STATE_NAMES:
        return STATE_NAMES.index(name.upper())
    if isinstance(name, (int,)) and not isinstance(name, bool) and 0 <= name < NUM_STATES:
        return int(name)
    try:  # numpy integers
        import numpy as np

        if isinstance(name, np.integer) and 0 <= int(name) < NUM_STATES:
            return int(name)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"unknown state {name!r}: expected one of {STATE_NAMES} or 0..{NUM_STATES - 1}")
