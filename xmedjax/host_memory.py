"""Freed host memory stays in the process, so XLA:CPU's step buffers are not faulted in anew.

XLA:CPU allocates each execution's temporary buffer with `malloc` and frees it when the step
ends: 1.17 GB for a ResNet50 train step at batch 8 and 224 px. glibc serves a block that
large with a fresh `mmap` and returns it with `munmap`, so every step first-touches about
300,000 pages again: 0.6 s of kernel time in a 1.2 s step on a 2-core EPYC
(`benchmarks/NOTES.md`, "Phase 3"). `keep_freed_memory` sets two glibc `mallopt` options:

    M_MMAP_MAX = 0          large blocks are carved from the main heap, not mapped one by one
    M_TRIM_THRESHOLD = -1   freed memory stays mapped (documented: -1 disables trimming)

and the next step reuses pages that are already resident. The cost: the process keeps its
peak heap until it exits, as tcmalloc and jemalloc do by default.

Only the main heap obeys the first option: a thread that allocates from another glibc arena
still gets (and unmaps) a fresh mapping for a block that large. So `keep_freed_memory` also
has XLA:CPU run single-device programs on the calling thread (JAX's
`jax_cpu_enable_async_dispatch` off; the Python main thread allocates from the main heap)
instead of on a worker thread of its own. Earlier this module put every thread on the main
heap (`M_ARENA_MAX = 1`) instead; that serialised the compiler's threads on one lock
(DenseNet121's train step compiled in 26 s instead of 17) and was slower per step too
(benchmarks/NOTES.md, "Phase 8"). Multi-device programs keep their worker threads (whose
buffers may be mapped afresh each step; not measured: on a CPU they are the tests' fake
devices).

Both work only before the JAX backend starts: `import xmedjax` calls it, first thing.
Import xmedjax before running any JAX computation. `XMEDJAX_HOST_MALLOC=system` leaves
glibc's and JAX's defaults alone.

Transparent huge pages for that heap, on request only (`XMEDJAX_HOST_MALLOC=huge-pages`,
`advise_huge_pages`, also at import). Where the kernel gives them only to memory that asks
(`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`, the common default), the heap is
first grown by half the machine's memory (address space only: nothing is touched, so
nothing is resident) and the whole heap then advised `MADV_HUGEPAGE`, so XLA:CPU's buffers
are faulted in as 2 MiB pages. Off by default since a 2-core Xeon VM measured the trade
(benchmarks/NOTES.md, "Phase 9" and "Phase 10"): the VM faults a fresh 2 MiB page in ten
times slower per byte than a 4 KiB one (1.35 GB in 3.9 s against 0.4 s), so each process's
first train call took 1.5-2.6 s longer, even with the step's buffer faulted in while it
compiles (`heap_warming`, which then gains 1.2-2.9 s); the steady steps were no faster
(three process pairs per model in phase 9, DenseNet121 1.398 against 1.372 s, ResNet50
1.599 against 1.580 s; `benchmarks/cpu.py`, ResNet50 train 0.958x / 0.937x against 0.945x /
0.944x in phase 10, though phase 9 saw 1.00x / 1.01x against 0.96x / 0.94x; phase 7 saw
1-16% with one malloc arena for every thread). `XMEDJAX_HOST_MALLOC=system` keeps glibc's
and JAX's defaults for everything above; `no-huge-pages` is the default's other name.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

ENV = "XMEDJAX_HOST_MALLOC"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_OPTIONS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
_ASYNC_OPTION = "jax_cpu_enable_async_dispatch"  # JAX's; read when the CPU backend is made
_MADV_HUGEPAGE = 14
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_HUGE_PAGE_CAP = 64 << 30  # the most address space the heap is grown by up front

# What keep_freed_memory did in this process (cpu.py records it next to its timings):
# "kept", "off (XMEDJAX_HOST_MALLOC=system)", "not glibc", "late: ...", "failed: ...".
STATUS = "not applied"
# Where XLA:CPU runs single-device programs: "calling thread", "worker threads (...)".
DISPATCH = "not applied"
# What advise_huge_pages did: "advised N GiB of heap", "kernel: always", "off (...)", ...
HUGE_PAGES = "not applied"


_WARNED: set[str] = set()  # XMEDJAX_HOST_MALLOC values already warned about


def _setting() -> str:
    """`XMEDJAX_HOST_MALLOC`, lower-cased: "" (the default), "huge-pages" or "system"
    ("no-huge-pages", the default's other name, reads as ""); anything else warns, once per
    process, and reads as ""."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "huge-pages", "system"):
        return value
    if value != "no-huge-pages" and value not in _WARNED:
        _WARNED.add(value)
        warnings.warn(
            f"{ENV}={value!r} is not one of huge-pages, system (unset: the default); "
            "using the default",
            stacklevel=3,
        )
    return ""


def _glibc() -> ctypes.CDLL | None:
    """The running process's own symbols when its C library is glibc (no file is read and no
    `ldconfig` is spawned: this runs at every `import xmedjax`)."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return None
    if not sys.platform.startswith("linux") or not libc_version.startswith("glibc"):
        return None
    return ctypes.CDLL(None, use_errno=True)  # ctypes.get_errno() reads errno after a call


def _backend_started() -> bool:
    """Whether a JAX backend (and its thread pools) already exists; False if unknown."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def keep_freed_memory() -> str:
    """Applies the two `mallopt` options above and synchronous CPU dispatch once per
    process; returns `STATUS` (the dispatch's outcome is `DISPATCH`)."""
    global STATUS
    if STATUS != "not applied":
        return STATUS
    if _setting() == "system":
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
        return STATUS
    STATUS = "late: the JAX backend had started" if late else "kept"
    _dispatch_on_calling_thread(late)
    return STATUS


def _dispatch_on_calling_thread(late: bool) -> str:
    """Turns JAX's asynchronous CPU dispatch off, so a single-device program's buffers come
    from the calling thread's heap (`jax.config.update` can turn it back on before the first
    JAX computation)."""
    global DISPATCH
    if late:
        DISPATCH = "worker threads (the JAX backend had started)"
        return DISPATCH
    import jax  # the option is read when the CPU backend is made, so it still applies

    jax.config.update(_ASYNC_OPTION, False)
    DISPATCH = "calling thread"
    return DISPATCH


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word), or "unknown"."""
    try:
        with open(_THP_MODE) as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def _heap_bounds() -> tuple[int, int] | None:
    """[start, end) of the process's brk heap, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                start, end = line.split()[0].split("-")
                return int(start, 16), int(end, 16)
    return None


def advise_huge_pages() -> str:
    """With `XMEDJAX_HOST_MALLOC=huge-pages`, grows the heap kept by `keep_freed_memory` by
    half the machine's memory (at most 64 GiB, address space only) and advises all of it
    `MADV_HUGEPAGE`; returns `HUGE_PAGES`. Does nothing unless `keep_freed_memory` kept its
    options."""
    global HUGE_PAGES
    if HUGE_PAGES != "not applied":
        return HUGE_PAGES
    if STATUS != "kept" and not STATUS.startswith("late"):
        HUGE_PAGES = f"off (the heap options: {STATUS})"
        return HUGE_PAGES
    if _setting() != "huge-pages":
        HUGE_PAGES = f"off (not asked: {ENV}=huge-pages asks)"
        return HUGE_PAGES
    mode = _thp_mode()
    if mode != "madvise":
        HUGE_PAGES = f"kernel: {mode}" if mode == "always" else f"off (kernel: {mode})"
        return HUGE_PAGES
    libc = _glibc()
    reserve = min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2, _HUGE_PAGE_CAP)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    block = libc.malloc(reserve)  # mmap is off: the heap grows; freed, it stays the heap's top
    if not block:
        HUGE_PAGES = f"off (the heap could not grow by {reserve >> 20} MiB)"
        return HUGE_PAGES
    libc.free(block)
    bounds = _heap_bounds()
    if bounds is None or bounds[1] - bounds[0] < reserve:
        HUGE_PAGES = "off (the block did not come from the brk heap)"
        return HUGE_PAGES
    start, end = bounds
    if libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        HUGE_PAGES = f"failed: madvise errno {ctypes.get_errno()}"
        warnings.warn(f"xmedjax.host_memory: huge pages {HUGE_PAGES}", stacklevel=2)
        return HUGE_PAGES
    HUGE_PAGES = f"advised {(end - start) / 2**30:.1f} GiB of heap"
    return HUGE_PAGES
