"""Hardware profiles: the numbers the simulator's cost model reads, one YAML file per machine in configs/hardware/.

Every field is required (a missing one is an error naming the field and the file); unknown keys fail too. Each
value carries its source in a comment in the YAML file: a vendor datasheet by name, or "measured here" with the
command that measured it. Units are SI: bytes, seconds, bytes/s, FLOP/s.

Schema (dotted names are the error messages' field names)::

    name: str
    device: str                                     # what the profile describes, in words
    hbm.capacity_bytes                              # device memory
    hbm.bandwidth_bytes_per_s                       # device memory read bandwidth (what decode matmuls stream at)
    hbm.fresh_alloc_threshold_bytes                 # a block landing on device above this size gets fresh pages
    hbm.fresh_alloc_bytes_per_s                     # ... and lands no faster than this (page faults + zeroing)
    hbm.fresh_free_bytes_per_s                      # ... and freeing it unmaps its pages on the host at this rate
    links.host_to_device.{bandwidth_bytes_per_s, latency_s}
    links.device_to_host.{bandwidth_bytes_per_s, latency_s}
    links.copies_at_once                            # host<->device copies that proceed at once, each at the
                                                    # bandwidth above (an integer >= 1: CPU, the movement engine's
                                                    # worker threads on separate cores; GPU/TPU 1, a shared link)
    nvme.{read_bytes_per_s, write_bytes_per_s, latency_s}
    compute.flops_per_s.{bf16, fp32, int8}          # dense matmul throughput per precision
    compute.block_overhead_s                        # fixed device time per block (kernel launches, small ops)
    compute.dequant_bytes_per_s.{int8, int4}        # bytes of low-bit weights dequantized per second
    compute.copy_contention                         # device seconds compute loses per second of a copy beside it
                                                    # (0: copy engines apart from the compute units, as on GPUs)
    compute.copy_beside_compute_s                   # extra seconds a copy the host waits for takes when compute
                                                    # is queued as it starts (CPU: the copying thread waits for a
                                                    # core; 0 on GPUs/TPUs)
    compute.prefetch_beside_compute_s               # extra seconds a copy the host does not wait for (prefetch,
                                                    # speculative, planned) takes: the host goes on dispatching
                                                    # compute, which runs beside it throughout (0 on GPUs/TPUs)
    host.dispatch_s_per_block                       # host (Python + dispatch) time per schedule position
    host_compute.cores                              # host CPU cores an op computed in place runs on (all of them)
    host_compute.flops_per_s_per_core.{bf16, fp32}  # one core's matmul throughput per precision
    host_compute.dram_bandwidth_bytes_per_s         # what a host op streams weights from DRAM at (all cores)
    host_compute.op_overhead_s                      # fixed host seconds per op computed in place (its launch)
    host_compute.activation_latency_s               # one activation copy (a few KB) between device and host, each way

An optional `mesh` section makes the profile a multi-device host (the simulator's mesh runs, `mesh.py`):

    mesh.devices                                    # accelerators in the host; the sections above describe one
    mesh.interconnect.{bandwidth_bytes_per_s, latency_s}   # device<->device (NVLink): one device's send rate
    mesh.devices_per_host_link                      # devices behind one host link (1: each its own; 2: a PCIe
                                                    # switch's uplink shared by two, each then gets half)
    mesh.host_dram_bandwidth_bytes_per_s            # what all devices' host->device copies together draw from DRAM

`host_compute` prices an op computed where its weights live (`compute: host`, `in_place: auto`): the activations
cross the link (latency + bytes / bandwidth each way) and the host streams the weights from DRAM
(`HostCompute.op_seconds`).

The time model that reads these lives in `sim_engine.py` (links) and `backend.py` (compute, `position_seconds`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from vorch_jax.errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        """What one copy of `nbytes` takes over the link alone."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True)
class HostCompute:
    """The host CPU as a place to compute a block whose weights sit in its DRAM (issue: compute in place)."""

    cores: int
    flops_per_s_per_core: dict  # "bf16" | "fp32" -> FLOP/s of one core
    dram_bandwidth_bytes_per_s: float
    op_overhead_s: float
    activation_latency_s: float

    def op_seconds(self, flops: float, weight_bytes: float, precision: str) -> float:
        """Host seconds of one op: overhead + max(FLOPs over all cores, weight bytes from DRAM) (a roofline)."""
        rate = self.cores * self.flops_per_s_per_core[precision]
        return self.op_overhead_s + max(flops / rate, weight_bytes / self.dram_bandwidth_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Mesh:
    """A multi-device host: `devices` accelerators, each described by the profile's other sections."""

    devices: int
    interconnect: Link
    devices_per_host_link: int
    host_dram_bandwidth_bytes_per_s: float

    def host_link_share(self, link: Link, loading_devices: int) -> Link:
        """One device's host link when `loading_devices` devices load at once: its uplink shared with the devices
        behind it, and all of them together capped by the host's DRAM."""
        behind = min(self.devices_per_host_link, loading_devices)
        bw = min(link.bandwidth_bytes_per_s / behind, self.host_dram_bandwidth_bytes_per_s / loading_devices)
        return Link(bw, link.latency_s)


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str
    hbm_capacity_bytes: float
    hbm_bandwidth_bytes_per_s: float
    fresh_alloc_threshold_bytes: float  # .inf where device memory comes from a preallocated pool (GPU/TPU)
    fresh_alloc_bytes_per_s: float
    fresh_free_bytes_per_s: float  # host seconds to free such a block = bytes / this (.inf: a pool, free is free)
    host_to_device: Link
    device_to_host: Link
    copies_at_once: int  # host<->device copies in progress together, each at its link's full bandwidth
    nvme_read_bytes_per_s: float
    nvme_write_bytes_per_s: float
    nvme_latency_s: float
    flops_per_s: dict  # precision ("bf16" | "fp32" | "int8") -> FLOP/s
    block_overhead_s: float
    dequant_bytes_per_s: dict  # "int8" | "int4" -> bytes/s
    copy_contention: float  # compute seconds lost per second of an overlapping copy (CPU: copies share the cores)
    copy_beside_compute_s: float  # a waited-for copy's extra seconds when compute is queued (CPU: waits for a core)
    prefetch_beside_compute_s: float  # an unwaited copy's (prefetch) extra seconds: compute beside it throughout
    dispatch_s_per_block: float
    host_compute: HostCompute
    source: str = ""  # the file it was read from
    mesh: Mesh | None = None  # a multi-device host (None: one device)

    def device_view(self, loading_devices: int) -> "HardwareProfile":
        """One device of the mesh as a one-device profile: its host links as shared when `loading_devices` devices
        load at once (`Mesh.host_link_share`)."""
        if self.mesh is None:
            return self
        m = self.mesh
        return self.replace(host_to_device=m.host_link_share(self.host_to_device, loading_devices),
                            device_to_host=m.host_link_share(self.device_to_host, loading_devices))

    def replace(self, **kw) -> "HardwareProfile":
        return dataclasses.replace(self, **kw)

    def flops(self, precision: str) -> float:
        if precision not in self.flops_per_s:
            raise ProfileError(f"{self.source or self.name}: no compute.flops_per_s.{precision}")
        return self.flops_per_s[precision]


_SCHEMA = {
    "name": str,
    "device": str,
    "hbm": {"capacity_bytes": float, "bandwidth_bytes_per_s": float, "fresh_alloc_threshold_bytes": float,
            "fresh_alloc_bytes_per_s": float, "fresh_free_bytes_per_s": float},
    "links": {
        "host_to_device": {"bandwidth_bytes_per_s": float, "latency_s": float},
        "device_to_host": {"bandwidth_bytes_per_s": float, "latency_s": float},
        "copies_at_once": int,
    },
    "nvme": {"read_bytes_per_s": float, "write_bytes_per_s": float, "latency_s": float},
    "compute": {
        "flops_per_s": {"bf16": float, "fp32": float, "int8": float},
        "block_overhead_s": float,
        "dequant_bytes_per_s": {"int8": float, "int4": float},
        "copy_contention": float,
        "copy_beside_compute_s": float,
        "prefetch_beside_compute_s": float,
    },
    "host": {"dispatch_s_per_block": float},
    "host_compute": {"cores": int, "flops_per_s_per_core": {"bf16": float, "fp32": float},
                     "dram_bandwidth_bytes_per_s": float, "op_overhead_s": float, "activation_latency_s": float},
}
_MAY_BE_ZERO = {"links.host_to_device.latency_s", "links.device_to_host.latency_s", "nvme.latency_s",
                "compute.block_overhead_s", "host.dispatch_s_per_block",
                "compute.copy_contention", "compute.copy_beside_compute_s",
                "compute.prefetch_beside_compute_s", "host_compute.op_overhead_s",
                "host_compute.activation_latency_s"}


def _check(data, schema: dict, where: str, src: str) -> dict:
    if not isinstance(data, dict):
        raise ProfileError(f"{src}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in schema:
            raise ProfileError(f"{src}: unknown field '{where + key}' (valid: {', '.join(schema)})")
    out = {}
    for key, tp in schema.items():
        name = where + key
        if key not in data:
            raise ProfileError(f"{src}: missing field '{name}'")
        value = data[key]
        if isinstance(tp, dict):
            out[key] = _check(value, tp, name + ".", src)
        elif tp is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProfileError(f"{src}: field '{name}' must be an integer >= 1, got {value!r}")
            out[key] = value
        elif tp is str:
            if not isinstance(value, str) or not value:
                raise ProfileError(f"{src}: field '{name}' must be a non-empty string, got {value!r}")
            out[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{src}: field '{name}' must be a number, got {value!r} (write 1.0e-6, not 1e-6)")
            value = float(value)
            low_ok = value >= 0 if name in _MAY_BE_ZERO else value > 0
            if not (low_ok and (math.isfinite(value) or value == math.inf)):
                raise ProfileError(f"{src}: field '{name}' must be {'>= 0' if name in _MAY_BE_ZERO else '> 0'}, "
                                   f"got {value}")
            out[key] = value
    return out


_MESH_SCHEMA = {"devices": int, "interconnect": {"bandwidth_bytes_per_s": float, "latency_s": float},
                "devices_per_host_link": int, "host_dram_bandwidth_bytes_per_s": float}


def profile_from_dict(data, source: str = "<dict>") -> HardwareProfile:
    """A checked profile from the nested mapping a YAML file holds; errors name `source` and the dotted field."""
    mesh = None
    if isinstance(data, dict) and "mesh" in data:
        data = dict(data)
        m = _check(data.pop("mesh"), _MESH_SCHEMA, "mesh.", source)
        mesh = Mesh(m["devices"], Link(**m["interconnect"]), m["devices_per_host_link"],
                    m["host_dram_bandwidth_bytes_per_s"])
    d = _check(data, _SCHEMA, "", source)
    links = d["links"]
    return HardwareProfile(
        name=d["name"], device=d["device"],
        hbm_capacity_bytes=d["hbm"]["capacity_bytes"], hbm_bandwidth_bytes_per_s=d["hbm"]["bandwidth_bytes_per_s"],
        fresh_alloc_threshold_bytes=d["hbm"]["fresh_alloc_threshold_bytes"],
        fresh_alloc_bytes_per_s=d["hbm"]["fresh_alloc_bytes_per_s"],
        fresh_free_bytes_per_s=d["hbm"]["fresh_free_bytes_per_s"],
        host_to_device=Link(**links["host_to_device"]), device_to_host=Link(**links["device_to_host"]),
        copies_at_once=links["copies_at_once"],
        nvme_read_bytes_per_s=d["nvme"]["read_bytes_per_s"], nvme_write_bytes_per_s=d["nvme"]["write_bytes_per_s"],
        nvme_latency_s=d["nvme"]["latency_s"], flops_per_s=dict(d["compute"]["flops_per_s"]),
        block_overhead_s=d["compute"]["block_overhead_s"],
        dequant_bytes_per_s=dict(d["compute"]["dequant_bytes_per_s"]),
        copy_contention=d["compute"]["copy_contention"],
        copy_beside_compute_s=d["compute"]["copy_beside_compute_s"],
        prefetch_beside_compute_s=d["compute"]["prefetch_beside_compute_s"],
        dispatch_s_per_block=d["host"]["dispatch_s_per_block"],
        host_compute=HostCompute(**{**d["host_compute"],
                                    "flops_per_s_per_core": dict(d["host_compute"]["flops_per_s_per_core"])}),
        source=source, mesh=mesh)


def load_profile(name_or_path) -> HardwareProfile:
    """A profile by name (`h100-sxm` -> configs/hardware/h100-sxm.yaml) or by path; a HardwareProfile passes."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    if not name_or_path:
        raise ProfileError("no hardware profile given (set `hardware:` in the run config, e.g. 'this-machine')")
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ProfileError(f"hardware profile {path} not found (known: {known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: invalid YAML: {e}") from None
    return profile_from_dict(data, str(path))


def profile_to_dict(p: HardwareProfile) -> dict:
    """The nested mapping `profile_from_dict` reads (what calibrate_hardware writes)."""
    return {
        "name": p.name, "device": p.device,
        "hbm": {"capacity_bytes": p.hbm_capacity_bytes, "bandwidth_bytes_per_s": p.hbm_bandwidth_bytes_per_s,
                "fresh_alloc_threshold_bytes": p.fresh_alloc_threshold_bytes,
                "fresh_alloc_bytes_per_s": p.fresh_alloc_bytes_per_s,
                "fresh_free_bytes_per_s": p.fresh_free_bytes_per_s},
        "links": {"host_to_device": dataclasses.asdict(p.host_to_device),
                  "device_to_host": dataclasses.asdict(p.device_to_host), "copies_at_once": p.copies_at_once},
        "nvme": {"read_bytes_per_s": p.nvme_read_bytes_per_s, "write_bytes_per_s": p.nvme_write_bytes_per_s,
                 "latency_s": p.nvme_latency_s},
        "compute": {"flops_per_s": dict(p.flops_per_s), "block_overhead_s": p.block_overhead_s,
                    "dequant_bytes_per_s": dict(p.dequant_bytes_per_s), "copy_contention": p.copy_contention,
                    "copy_beside_compute_s": p.copy_beside_compute_s,
                    "prefetch_beside_compute_s": p.prefetch_beside_compute_s},
        "host": {"dispatch_s_per_block": p.dispatch_s_per_block},
        "host_compute": {**dataclasses.asdict(p.host_compute),
                         "flops_per_s_per_core": dict(p.host_compute.flops_per_s_per_core)},
    } | ({"mesh": dataclasses.asdict(p.mesh)} if p.mesh is not None else {})
