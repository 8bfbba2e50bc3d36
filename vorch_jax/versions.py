"""What produced a result: the versions of the stack and the backend, recorded in every summary and by `--version`."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("vorch_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy", "optax")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """{package: version} of the stack, the Python version, the JAX backend with its devices, whether the heap
    uses huge pages (`tiers/host_memory.huge_page_heap`: on CPU, how fast a block lands) and the glibc tunables the
    process started with (the Makefile's: on CPU they decide whether a landing reuses freed pages)."""
    import os

    import jax

    from vorch_jax.tiers.host_memory import huge_page_heap

    out = {name: _version(name) for name in PACKAGES}
    out["python"] = platform.python_version()
    out["backend"] = jax.default_backend()
    out["devices"] = sorted({d.device_kind for d in jax.devices()})
    out["huge_page_heap"] = huge_page_heap()
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return out


def version_text() -> str:
    """`vorch --version`: one line per package, then the backend."""
    env = environment()
    lines = [f"vorch_jax {env['vorch_jax']}"]
    lines += [f"  {name} {env[name]}" for name in PACKAGES[1:] + ("python",)]
    lines.append(f"  backend {env['backend']} ({', '.join(env['devices'])})")
    lines.append(f"  huge-page heap {'on' if env['huge_page_heap'] else 'off'}")
    lines.append(f"  GLIBC_TUNABLES {env['glibc_tunables'] or '(none)'}")
    return "\n".join(lines)
