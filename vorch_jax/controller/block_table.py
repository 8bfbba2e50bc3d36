"""The device block table: one row per weight block, a structure of arrays that `jax.jit` takes as is.

The model says what blocks exist (kind, layer, bytes per representation); the engine measures what moving and
dequantising them costs (`delta`, `tau`) and reports where they are (`state`, `dwell`); the runtime keeps the access
terms fresh (`rho`, `lam`, `kappa`, `psi`). The controller (`score`, `state_update`) reads only this table.

Host side, `BlockTable.from_rows` validates everything once, so that the jitted code never meets NaN, negative bytes
or an unknown state; errors name the offending block (its index, and its name when given).

Shapes: B blocks, 7 states (`state_ids.NUM_STATES`).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vorch_jax.controller import state_ids as sid

KINDS = ("embed", "attn", "mlp", "norm", "expert")
KIND_EMBED, KIND_ATTN, KIND_MLP, KIND_NORM, KIND_EXPERT = range(len(KINDS))

# A dwell this large means "settled since before we started": no hysteresis lock on the first tick.
SETTLED_DWELL = 1 << 20

# Default device-byte fractions of the full-precision size, for tables built without measured sizes (tests, sims).
DEFAULT_BYTE_FRACTIONS = {sid.S0: 1.0, sid.S1: 0.5, sid.S2: 0.25, sid.S6: 0.125}


@flax.struct.dataclass
class BlockTable:
    """Structure of arrays over B blocks. Build it with `from_rows`; update it with `.replace(...)` or `commit`."""

    state: jax.Array  # int32[B]   current state S0..S6 as the engine reports it
    bytes_per_state: jax.Array  # float32[B,7] device (HBM) bytes in each state; 0 for S3, S4, S5
    host_bytes: jax.Array  # float32[B] DRAM bytes the block occupies in S3 (for the DRAM budget)
    kind: jax.Array  # int32[B]   index into KINDS
    layer: jax.Array  # int32[B]   execution position as models/ numbers it: -1 embedding, 0.. layers, L final norm
    protected: jax.Array  # bool[B]    guardrail: must stay on device, at or above floor_state
    floor_state: jax.Array  # int32[B]   lowest-quality on-device state the guardrail allows
    allowed: jax.Array  # bool[B,7]  the block's ladder (S5 is never allowed: it is not a target)
    rho: jax.Array  # float32[B] decayed access frequency (access_stats.update_rho)
    lam: jax.Array  # float32[B] lookahead need, decay^distance (access_stats.lookahead_lambda)
    kappa: jax.Array  # float32[B] structural importance prior (runtime/model supplied)
    psi: jax.Array  # float32[B] quantisation sensitivity (calibration supplied): lossy states cost more value
    delta: jax.Array  # float32[B,7] measured dequant/decompress seconds per use in each state
    tau: jax.Array  # float32[B,7] measured seconds to bring the block to device from each state's tier
    dwell: jax.Array  # int32[B]   ticks spent in the current state (hysteresis); see state_update.commit

    @property
    def num_blocks(self) -> int:
        return int(self.state.shape[0])

    @classmethod
    def from_rows(
        cls,
        *,
        state: Sequence,
        bytes_per_state: Sequence,
        kind: Sequence,
        layer: Sequence[int],
        protected: Sequence[bool] | None = None,
        floor_state: Sequence | None = None,
        allowed: Sequence | None = None,
        lossy: bool = True,
        rho: Sequence[float] | None = None,
        lam: Sequence[float] | None = None,
        kappa: Sequence[float] | None = None,
        psi: Sequence[float] | None = None,
        delta: Sequence | None = None,
        tau: Sequence | None = None,
        host_bytes: Sequence[float] | None = None,
        h2d_bytes_per_s: float | None = None,
        nvme_bytes_per_s: float | None = None,
        dwell: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
    ) -> "BlockTable":
        """Validate plain lists/arrays and build the table.

        state, floor_state: ints 0..6 or names 'S0'..'S6'. kind: names from KINDS or their indices.
        bytes_per_state: [B,7] device bytes (0 for S3/S4/S5), or [B] full-precision sizes expanded with
        DEFAULT_BYTE_FRACTIONS. allowed: [B,7] ladder; default every state but S5, lossy states dropped when
        lossy=False. floor_state default: S0 for protected blocks, S6 (no floor) otherwise.
        tau default: S3 = host_bytes / h2d_bytes_per_s, S4 = that + host_bytes / nvme_bytes_per_s when the
        bandwidths are given, else 0. dwell default: settled (no hysteresis lock on the first tick).
        """
        b = len(state)
        label = _labeler(names, b)

        def col(x, default, dtype, what):
            arr = np.asarray(default if x is None else x, dtype=dtype)
            if arr.shape[:1] != (b,):
                raise ValueError(f"{what}: expected {b} rows (one per block), got shape {arr.shape}")
            return arr

        state_i = np.array([_state_or_raise(s, f"state of {label(i)}") for i, s in enumerate(state)], np.int32)
        kind_i = np.array([_kind_or_raise(k, label(i)) for i, k in enumerate(col(kind, None, object, "kind"))],
                          np.int32)
        layer_i = col(layer, None, np.int64, "layer").astype(np.int32)
        for i in np.nonzero(layer_i < -1)[0]:
            raise ValueError(f"layer of {label(i)} is {layer_i[i]}; layers run from -1 (embedding) upwards")

        bps = np.asarray(bytes_per_state, np.float64)
        if bps.ndim == 1:
            full = col(bps, None, np.float64, "bytes_per_state")
            bps = np.zeros((b, sid.NUM_STATES))
            for s, frac in DEFAULT_BYTE_FRACTIONS.items():
                bps[:, s] = full * frac
        if bps.shape != (b, sid.NUM_STATES):
            raise ValueError(f"bytes_per_state: expected shape ({b}, 7) or ({b},), got {bps.shape}")
        _finite_or_raise(bps, "bytes_per_state", label)
        _nonneg_or_raise(bps, "bytes_per_state", label)
        for s in (sid.S3, sid.S4, sid.S5):
            bad = np.nonzero(bps[:, s] != 0)[0]
            if bad.size:
                raise ValueError(f"bytes_per_state: {label(bad[0])} has {bps[bad[0], s]} device bytes in off-device "
                                 f"state {sid.STATE_NAMES[s]}; off-device states occupy 0 device bytes")

        hb = col(host_bytes, bps[:, sid.S0], np.float64, "host_bytes")
        _finite_or_raise(hb, "host_bytes", label)
        _nonneg_or_raise(hb, "host_bytes", label)

        prot = col(protected, np.zeros(b, bool), bool, "protected")
        if floor_state is None:
            floor = np.where(prot, sid.S0, sid.S6).astype(np.int32)
        else:
            floor = np.array([_state_or_raise(s, f"floor_state of {label(i)}") for i, s in enumerate(floor_state)],
                             np.int32)
        for i in np.nonzero(~np.isin(floor, sid.ON_DEVICE))[0]:
            raise ValueError(f"floor_state of {label(i)} is {sid.STATE_NAMES[floor[i]]}; a floor must be an "
                             f"on-device state {[sid.STATE_NAMES[s] for s in sid.ON_DEVICE]}")

        if allowed is None:
            allow = np.ones((b, sid.NUM_STATES), bool)
            if not lossy:
                allow[:, list(sid.LOSSY)] = False
        else:
            allow = np.asarray(allowed, bool)
            if allow.shape != (b, sid.NUM_STATES):
                raise ValueError(f"allowed: expected shape ({b}, 7), got {allow.shape}")
            allow = allow.copy()
        allow[:, sid.S5] = False  # in flight is a fact the engine reports, never a target
        if not lossy:
            bad = np.nonzero(allow[:, list(sid.LOSSY)].any(axis=1))[0]
            if bad.size:
                raise ValueError(f"allowed: {label(bad[0])} allows a lossy state but lossy=False")
        on_dev = np.array(sid.IS_ON_DEVICE)
        zero_dev = allow & on_dev[None, :] & (bps <= 0)
        for i in np.nonzero(zero_dev.any(axis=1))[0]:
            s = int(np.nonzero(zero_dev[i])[0][0])
            raise ValueError(f"bytes_per_state: {label(i)} allows on-device state {sid.STATE_NAMES[s]} with "
                             f"{bps[i, s]} bytes; an on-device state must occupy > 0 bytes")
        for i in range(b):
            if not allow[i].any():
                raise ValueError(f"allowed: {label(i)} has an empty ladder (no allowed state)")
            if state_i[i] != sid.S5 and not allow[i, state_i[i]]:
                raise ValueError(f"state of {label(i)} is {sid.STATE_NAMES[state_i[i]]}, which is not on its ladder "
                                 f"{[sid.STATE_NAMES[s] for s in np.nonzero(allow[i])[0]]}")
        rank = np.array(sid.QUALITY_RANK)
        ok_on = allow & on_dev[None, :] & (rank[None, :] >= rank[floor][:, None])
        for i in np.nonzero(prot & ~ok_on.any(axis=1))[0]:
            raise ValueError(f"protected {label(i)} has no allowed on-device state at or above its floor "
                             f"{sid.STATE_NAMES[floor[i]]}")
        for i in np.nonzero(~allow[:, list(sid.OFF_DEVICE)].any(axis=1) & ~ok_on.any(axis=1))[0]:
            raise ValueError(f"{label(i)} has no allowed off-device state and no allowed on-device state at or above "
                             f"its floor {sid.STATE_NAMES[floor[i]]}: nowhere to put it")

        terms = {}
        for name, x in (("rho", rho), ("lam", lam), ("kappa", kappa), ("psi", psi)):
            arr = col(x, np.zeros(b), np.float64, name)
            _finite_or_raise(arr, name, label)
            _nonneg_or_raise(arr, name, label)
            terms[name] = arr

        dl = np.zeros((b, sid.NUM_STATES)) if delta is None else np.asarray(delta, np.float64)
        if tau is None:
            tu = np.zeros((b, sid.NUM_STATES))
            if h2d_bytes_per_s is not None:
                _positive_scalar_or_raise(h2d_bytes_per_s, "h2d_bytes_per_s")
                tu[:, sid.S3] = hb / h2d_bytes_per_s
                tu[:, sid.S4] = tu[:, sid.S3]
            if nvme_bytes_per_s is not None:
                _positive_scalar_or_raise(nvme_bytes_per_s, "nvme_bytes_per_s")
                tu[:, sid.S4] += hb / nvme_bytes_per_s
        else:
            tu = np.asarray(tau, np.float64)
        for name, arr in (("delta", dl), ("tau", tu)):
            if arr.shape != (b, sid.NUM_STATES):
                raise ValueError(f"{name}: expected shape ({b}, 7), got {arr.shape}")
            _finite_or_raise(arr, name, label)
            _nonneg_or_raise(arr, name, label)

        dw = col(dwell, np.full(b, SETTLED_DWELL), np.int64, "dwell")
        _nonneg_or_raise(dw, "dwell", label)

        f32 = lambda a: _on_device(np.asarray(a, np.float32))  # noqa: E731
        return cls(
            state=_on_device(state_i), bytes_per_state=f32(bps), host_bytes=f32(hb), kind=_on_device(kind_i),
            layer=_on_device(layer_i), protected=_on_device(prot), floor_state=_on_device(floor),
            allowed=_on_device(allow), rho=f32(terms["rho"]), lam=f32(terms["lam"]), kappa=f32(terms["kappa"]),
            psi=f32(terms["psi"]), delta=f32(dl), tau=f32(tu),
            dwell=_on_device(np.minimum(dw, SETTLED_DWELL).astype(np.int32)),
        )


def _on_device(x_host: np.ndarray) -> jax.Array:
    """A host array on the default device as it is (its dtype cast already, on the host). Not `jnp.asarray`: in jax
    0.10 that compiles a copy program for every new shape and dtype (10 ms each; a table of B blocks is 15 of them)."""
    return jax.device_put(x_host)


def _labeler(names, b):
    if names is not None and len(names) != b:
        raise ValueError(f"names: expected {b} names, got {len(names)}")
    return lambda i: f"block {int(i)}" + (f" ({names[int(i)]!r})" if names is not None else "")


def _state_or_raise(s, what):
    try:
        return sid.state_from_name(s)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _kind_or_raise(k, where):
    if isinstance(k, str) and k in KINDS:
        return KINDS.index(k)
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= int(k) < len(KINDS):
        return int(k)
    raise ValueError(f"kind of {where}: unknown kind {k!r}, expected one of {KINDS}")


def _finite_or_raise(arr, name, label):
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        idx = tuple(bad[0])
        col = f" state {sid.STATE_NAMES[idx[1]]}" if len(idx) > 1 else ""
        raise ValueError(f"{name}: {label(idx[0])}{col} is {arr[idx]} (NaN/inf); every input must be finite")


def _nonneg_or_raise(arr, name, label):
    bad = np.argwhere(arr < 0)
    if bad.size:
        idx = tuple(bad[0])
        col = f" state {sid.STATE_NAMES[idx[1]]}" if len(idx) > 1 else ""
        raise ValueError(f"{name}: {label(idx[0])}{col} is negative ({arr[idx]}); must be >= 0")


def _positive_scalar_or_raise(x, name):
    if not (np.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def pad_to(table: BlockTable, n: int) -> BlockTable:
    """Append inert rows up to n blocks, so that tables of varying size share one compiled tick.

    An inert row sits in S4 with only S4 on its ladder, 0 bytes anywhere and all score inputs 0: it never takes
    budget, never moves (reason KEEP) and does not change any normalisation max. Drop its decisions: target[:B].
    """
    b = table.num_blocks
    if n < b:
        raise ValueError(f"pad_to: table has {b} blocks, cannot pad to {n}")
    k = n - b
    if k == 0:
        return table

    def cat(x, fill):  # on the host: a device concatenate compiles once per table size
        x = np.asarray(x)
        return _on_device(np.concatenate([x, np.full((k,) + x.shape[1:], fill, x.dtype)], axis=0))

    inert_allowed = np.zeros((k, sid.NUM_STATES), bool)
    inert_allowed[:, sid.S4] = True
    allowed = np.concatenate([np.asarray(table.allowed), inert_allowed], axis=0)
    return table.replace(
        state=cat(table.state, sid.S4), bytes_per_state=cat(table.bytes_per_state, 0),
        host_bytes=cat(table.host_bytes, 0),
        kind=cat(table.kind, KIND_NORM), layer=cat(table.layer, 0), protected=cat(table.protected, False),
        floor_state=cat(table.floor_state, sid.S6), allowed=_on_device(allowed),
        rho=cat(table.rho, 0), lam=cat(table.lam, 0), kappa=cat(table.kappa, 0), psi=cat(table.psi, 0),
        delta=cat(table.delta, 0), tau=cat(table.tau, 0), dwell=cat(table.dwell, SETTLED_DWELL))
