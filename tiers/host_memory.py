"""The process heap on the host: hand the memory of freed blocks back to the operating system, and say whether
the heap uses huge pages.

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
import os


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


THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_heap(tunables: str | None = None, thp_mode_file: str = THP_MODE_FILE) -> bool:
    """Whether glibc backs this process's heap with transparent huge pages: `glibc.malloc.hugetlb` set to 1 or 2 in
    GLIBC_TUNABLES (read by glibc 2.35+ when the process starts; the Makefile exports it) and the kernel's THP mode not
    `never`.

    On a CPU backend every block a transition lands is a fresh heap allocation, and a large one (over glibc's mmap
    threshold, at most 32 MB) is a fresh mapping that the copy then faults in 4 KB at a time, several times slower
    than a copy into memory already held; huge pages make that faulting much cheaper, though not steadier
    (`experiments/host_copy_rates.py` measures all three). So on CPU the host->device "link" depends on this
    setting, and the summary's `versions` records it."""
    tunables = os.environ.get("GLIBC_TUNABLES", "") if tunables is None else tunables
    setting = [kv.partition("=")[2] for kv in tunables.split(":") if kv.partition("=")[0] == "glibc.malloc.hugetlb"]
    if not setting or setting[-1].strip() not in ("1", "2"):
        return False
    try:
        with open(thp_mode_file) as f:
            mode = f.read()
    except OSError:  # no THP (not Linux): the tunable does nothing
        return False
    return "[never]" not in mode
