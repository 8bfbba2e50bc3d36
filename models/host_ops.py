"""An op computed where its weights live: in host memory, with the activations moved to it and back.

At batch 1 an op reads each weight once; when the weights sit in host DRAM (S3), running the op on the host can
beat sending them over the link (KTransformers, Fiddler, llama.cpp's `--n-cpu-moe`): only the activations travel.
`on_host(fn, *static)` is `fn(*static, w, *acts)` as one jitted program: the activations go to host memory
(`jax.device_put` to `jax.memory.Space.Host`), the op runs under `compute_on('device_host')` on the weights as
they are (pinned_host arrays, never copied), and its result comes back to device memory. On a CPU backend "host"
and "device" are the same DRAM and cores, and the program still runs this path (what the tests exercise); on a
GPU/TPU the host CPU computes it.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.compute_on import compute_on


@functools.cache
def on_host(fn, *static):
    """The jitted in-place version of `fn(*static, w, *acts)`: (w in host memory, acts on device) -> the result on
    device. Cached per (fn, static args), so each op compiles once per shape."""

    def run(w, *acts):
        acts_host = jax.device_put(acts, jax.memory.Space.Host)
        with compute_on("device_host"):
            out = fn(*static, w, *acts_host)
        return jax.device_put(out, jax.memory.Space.Device)

    return jax.jit(run)


def moved_bytes(to_host, to_device) -> dict[str, int]:
    """Bytes per link of the activations an in-place op moved, from the arrays themselves."""
    def total(tree):
        return sum(int(a.nbytes) for a in jax.tree.leaves(tree))

    return {"device->host": total(to_host), "host->device": total(to_device)}
