"""Hand the heap memory of freed blocks back to the operating system.

glibc keeps freed heap memory for reuse instead of returning it, and a run frees hundreds of megabytes in pieces of
a few (every dequantized source block, every host copy, every array a transition deleted). A process that runs many
runs (a compare, a notebook, the test suite) then grows by about a run's peak each time: measured on this project's
2-core CPU, 250-700 MB per SmolLM2 run, anonymous memory that `malloc_trim` gives back. The test suite reached 24 GB
and was killed before this was called between runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        return None


def return_freed_memory(collect: bool = False) -> bool:
    """Return the heap's free pages to the OS (glibc; a few ms); False where there is no such call. `collect` first
    runs the garbage collector (0.2-0.5 s in a process that has run many runs: not after every test)."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
