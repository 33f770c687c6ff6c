"""Keep the memory of large freed allocations in the process for reuse (glibc).

A round at a million parameters allocates and frees hundreds of megabytes of
bytes objects: the records Flower inflates, the joined chunks, the spool's
files read back. glibc serves every allocation above its mmap threshold (128 KiB
at first, adjusted up to 32 MiB) with a fresh anonymous mapping and gives it back
to the kernel on ``free``, so the next round faults the same pages in again,
zero-filled one 4 KiB page at a time. On the 2-vCPU machines of this project
that was most of the cost of pulling four 1M-parameter gradients: 125k minor
faults and 0.19–0.52 s of system time against 0.10–0.15 s of user time; with
the settings below the same pull faulted no page after the first round and
took 0.09–0.12 s (docs/benchmarks.md).

:func:`retain_freed_memory` raises the mmap threshold to 1 GiB (larger single
allocations still get their own mapping) and the trim threshold to 2 GiB, so
freed memory stays in the heap and the next round reuses it. The price: a
process's resident memory stays near its peak (the peak itself is unchanged).
Run-config key ``retain-freed-memory`` (default true); glibc only — elsewhere
it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("flwr.hedrl.memory")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the settings to this process (once); True if glibc took both."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("hedrl: retain-freed-memory needs glibc; not applied here")
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError) as exc:
        log.warning("hedrl: retain-freed-memory: no mallopt in %s (%s)", name, exc)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not ok:
        log.warning("hedrl: retain-freed-memory: glibc refused the mallopt settings")
    else:
        log.debug("hedrl: freed memory kept for reuse (mmap 1 GiB, trim 2 GiB)")
    _applied = ok
    return ok
