"""What a calibration is, whatever measured it: the record (`Calibration`), the constants that map ΔKL to a state's
value loss, the keys it is stored under, and the link probe. `calibrate.py` measures Llama-family models (ΔKL and a
gradient estimate), `ops_calibration.py` any other dense model through its own ops; both build this record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
from pathlib import Path

import jax
import numpy as np

STATES = ("S1", "S2", "S6")
PSI_STATE = "S2"
KL_TOLERANCE = 0.01  # nats: the ΔKL at which a state keeps half its value
MAX_LOSSY_LOSS = 0.95

@dataclasses.dataclass
class Calibration:
    """One calibration. Keys: block ids (execution order), state names 'S1' | 'S2' | 'S6', kinds."""

    psi: dict           # block -> ΔKL at PSI_STATE (nats)
    kl: dict            # block -> {state: ΔKL nats}
    grad_estimate: dict  # block -> {state: ½ Σ F̂ ΔW² nats}
    spearman: dict      # state | 'all' -> rank correlation of kl and grad_estimate
    bandwidths: dict    # 'host->device' | 'nvme->host' -> bytes/s
    delta: dict         # kind -> {state: extra seconds per decode-shaped use}
    lossy_loss: dict    # state -> value fraction lost, in [0, 1)
    tokens: int
    model_key: str
    machine_key: str
    created: str
    settings: dict = dataclasses.field(default_factory=dict)  # int4_group_size, lowrank_rank, kl_tolerance, ...
    block_shapes: dict = dataclasses.field(default_factory=dict)  # block -> {leaf: [dims]}
    elapsed_s: float = 0.0
    reused: bool = False  # set by load_or_calibrate; never stored

    @property
    def measured_by(self) -> str:
        """What measured it (an ops calibration says so in its settings)."""
        return self.settings.get("measured_by", "ΔKL and the gradient estimate (calibrate.py)")

    @property
    def states(self) -> tuple:
        return tuple(self.settings.get("states", STATES))

    def policy_delta(self) -> dict:
        """δ as `ScoredPolicy(delta=...)` takes it: {kind: {State: seconds}}."""
        from vorch_jax.tiers.state import State

        return {k: {State.parse(s): v for s, v in d.items()} for k, d in self.delta.items()}

    def tick_lossy_loss(self) -> tuple:
        """`TickParams.lossy_loss`: ((state code, loss), ...) sorted."""
        from vorch_jax.tiers.state import State

        return tuple(sorted((int(State.parse(s)), v) for s, v in self.lossy_loss.items()))


def lossy_loss_of(kl: dict, lossy_blocks: list, states, kl_tolerance: float = KL_TOLERANCE) -> dict:
    """state -> the value fraction it loses (module docstring): the median ΔKL over the blocks a lossy state changes,
    mapped by m / (m + kl_tolerance), capped at MAX_LOSSY_LOSS."""
    loss = {}
    for s in states:
        m = float(np.median([kl[b][s] for b in lossy_blocks])) if lossy_blocks else 0.0
        loss[s] = min(MAX_LOSSY_LOSS, m / (m + kl_tolerance)) if m > 0 else 0.0
    return loss


# ---------------------------------------------------------------- keys

def model_key(source) -> str:
    """Model name + sha256 of the file's first MiB and its size: stable across reinstalls, changes with the file."""
    path = Path(source.path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(path.stat().st_size).encode())
    try:
        name = str(source.metadata("general.name"))
    except Exception:  # noqa: BLE001 - a file without a name field keys by its file name
        name = path.stem
    return f"{name}-{h.hexdigest()[:16]}"


def machine_key() -> str:
    dev = jax.devices()[0]
    return f"{platform.node()}-{jax.default_backend()}-{dev.device_kind}"


def probe_links(store_dir):
    from vorch_jax.tiers.link_probe import probe_bandwidths

    if store_dir is not None:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
    return probe_bandwidths(store_dir)
