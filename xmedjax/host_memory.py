"""Freed host memory stays in the process, so XLA:CPU's step buffers are not faulted in anew.

XLA:CPU allocates each execution's temporary buffer with `malloc` and frees it when the step
ends: 1.17 GB for a ResNet50 train step at batch 8 and 224 px. glibc serves a block that
large with a fresh `mmap` and returns it with `munmap`, so every step first-touches about
300,000 pages again: 0.6 s of kernel time in a 1.2 s step on a 2-core EPYC
(`benchmarks/NOTES.md`, "Phase 3"). `keep_freed_memory` sets three glibc `mallopt` options:

    M_ARENA_MAX = 1         every thread allocates from the main heap
    M_MMAP_MAX = 0          large blocks are carved from that heap, not mapped one by one
    M_TRIM_THRESHOLD = -1   freed memory stays mapped (documented: -1 disables trimming)

and the next step reuses pages that are already resident. The cost: the process keeps its
peak heap until it exits, as tcmalloc and jemalloc do by default.

A thread keeps the arena it first allocated from, so this works only before the JAX
backend starts its threads: `import xmedjax` calls it, first thing. Import xmedjax before
running any JAX computation. `XMEDJAX_HOST_MALLOC=system` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

ENV = "XMEDJAX_HOST_MALLOC"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_OPTIONS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

# What keep_freed_memory did in this process (cpu.py records it next to its timings):
# "kept", "off (XMEDJAX_HOST_MALLOC=system)", "not glibc", "late: ...", "failed: ...".
STATUS = "not applied"


def _glibc() -> ctypes.CDLL | None:
    """The running process's own symbols when its C library is glibc (no file is read and no
    `ldconfig` is spawned: this runs at every `import xmedjax`)."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return None
    if not sys.platform.startswith("linux") or not libc_version.startswith("glibc"):
        return None
    return ctypes.CDLL(None)


def _backend_started() -> bool:
    """Whether a JAX backend (and its thread pools) already exists; False if unknown."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def keep_freed_memory() -> str:
    """Applies the three `mallopt` options above once per process; returns `STATUS`."""
    global STATUS
    if STATUS != "not applied":
        return STATUS
    if os.environ.get(ENV, "").strip().lower() == "system":
        STATUS = f"off ({ENV}=system)"
        return STATUS
    libc = _glibc()
    if libc is None:
        STATUS = "not glibc"
        return STATUS
    late = _backend_started()
    results = [libc.mallopt(option, value) for option, value in _OPTIONS]
    if not all(results):  # mallopt returns 1 on success, 0 on error
        STATUS = f"failed: mallopt returned {results}"
        warnings.warn(f"xmedjax.host_memory: {STATUS}; glibc's defaults stay", stacklevel=2)
    elif late:
        STATUS = "late: the JAX backend had started; threads that allocated keep their arenas"
    else:
        STATUS = "kept"
    return STATUS
