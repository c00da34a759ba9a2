"""A train step's first call with huge pages: its buffer is faulted in while XLA compiles it.

With transparent huge pages for XLA:CPU's heap (`XMEDJAX_HOST_MALLOC=huge-pages`, or the
kernel's THP mode `always`), the first execution of a train step faults its temporary
buffer in as fresh 2 MiB pages: 1.46 GB for DenseNet121 at batch 8 and 224 px, and on a
2-core Xeon VM ten times slower per byte than 4 KiB pages (1.35 GB in 3.9 s against 0.4 s),
so the first execution took 4.4-4.8 s against a 1.1 s steady step (2.2-2.3 s with 4 KiB
pages). The 14-16 s compile before it keeps 1.7 of the 2 cores busy on average (its HLO
passes and LLVM IR emission run on one thread: benchmarks/NOTES.md, "Phase 9").

A train step's first call (`first_call.wrap(..., warm_heap=applies(...))`) traces the
program, estimates its temporary buffer from the traced program (`live_bytes`) and, while
XLA compiles, has a thread fault that much memory in where glibc's `malloc` will carve a
block that large from (`next_block`; `madvise(MADV_POPULATE_WRITE)`: the contents of that
free memory, which `malloc` owns, are left as they are): with
`host_memory.keep_freed_memory`'s heap, the step's buffer lands there. The compile is the one the jitted function itself would have made (JAX caches it;
the call that follows neither traces nor compiles again). Public first calls in
alternating processes (benchmarks/cpu_first_call.py; NOTES.md, "Phase 10"), huge pages on:
DenseNet121 19.6-21.3 s against 21.1-24.0 s without warming (six pairs); ResNet50, whose
compile is shorter and busier, 8.8-9.8 s against 9.0-10.0 s (its compile ~1.2 s slower
beside the warming, its first execution ~1.5 s faster). With 4 KiB pages (the default)
it gained nothing (DenseNet121 19.7 / 18.9 s against 19.4 / 18.9 s), so it stays off.

It applies only where it can help: a single-device CPU program called from the main thread
with the heap kept (`host_memory.STATUS` "kept", `DISPATCH` "calling thread": glibc), huge
pages for it, and a kernel with `MADV_POPULATE_WRITE` (Linux 5.14). Anywhere else, and on
every call after the first, the call goes straight to the jitted function. `LAST` says
what the latest first call did.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from jax.extend import core as jax_core

from xmedjax import host_memory, trace_state

_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, contents unchanged
_CHUNK = 2 << 20  # bytes faulted per madvise call (the stop flag is checked between them)
# The traced program's peak of live intermediates undercounts XLA:CPU's temporary buffer
# (0.59-0.95 of it for ResNet50 and DenseNet121 train steps at 64 and 224 px, "Phase 10");
# faulting 1.25 times it in stays within 1.2 times the buffer.
ESTIMATE_SCALE = 1.25
# Set to False for plain jitted functions (an A/B switch: benchmarks/cpu_first_call.py).
ENABLED = True

# What the latest first call did: "not called", "off (...)", "warmed N MiB ...".
LAST = "not called"


def _nbytes(var: Any) -> int:
    shape = getattr(var.aval, "shape", None)
    dtype = getattr(var.aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _inner_jaxprs(eqn: Any) -> Iterator[Any]:
    for param in eqn.params.values():
        for value in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(value, jax_core.ClosedJaxpr):
                yield value.jaxpr
            elif isinstance(value, jax_core.Jaxpr):
                yield value


def live_bytes(jaxpr: Any) -> int:
    """Peak bytes of intermediate values live at once when `jaxpr` (a Jaxpr or ClosedJaxpr)
    runs its equations in order: each value from the equation that makes it to its last use
    (the outputs to the end); an equation with inner programs (jit, custom rules, loops)
    adds their own peak while it runs. The inputs are not counted."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    end = len(jaxpr.eqns)
    last_use = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, jax_core.Var):
                last_use[var] = i
    for var in jaxpr.outvars:
        if isinstance(var, jax_core.Var):
            last_use[var] = end
    live, peak, sizes = 0, 0, {}
    for i, eqn in enumerate(jaxpr.eqns):
        inner = max((live_bytes(sub) for sub in _inner_jaxprs(eqn)), default=0)
        peak = max(peak, live + inner + sum(_nbytes(v) for v in eqn.outvars))
        for var in eqn.outvars:
            if last_use.get(var, -1) > i:
                sizes[var] = _nbytes(var)
                live += sizes[var]
        for var in {v for v in eqn.invars if isinstance(v, jax_core.Var)}:
            if last_use.get(var) == i and var in sizes:
                live -= sizes.pop(var)
    return peak


def _libc() -> ctypes.CDLL | None:
    libc = host_memory._glibc()
    if libc is None:
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def next_block(nbytes: int) -> tuple[int, int] | None:
    """(start, size) of the page-aligned memory where `malloc` carves its next block of
    `nbytes` from: one allocated and freed at once (it merges back into the heap's free
    top, so the memory stays glibc's); None without glibc or where `malloc` fails."""
    libc = _libc()
    block = libc.malloc(nbytes) if libc is not None and nbytes > 0 else None
    if not block:
        return None
    libc.free(block)
    start = -(-block // mmap.PAGESIZE) * mmap.PAGESIZE
    return start, (block + nbytes - start) // mmap.PAGESIZE * mmap.PAGESIZE


def fault_in(start: int, nbytes: int, stop: threading.Event | None = None) -> tuple[int, str]:
    """Faults `nbytes` from address `start` in, `_CHUNK` at a time, until done or `stop` is
    set; returns (bytes faulted, "" or why it stopped early). Contents stay as they are."""
    libc = _libc()
    if libc is None:
        return 0, "not glibc"
    done = 0
    while done < nbytes and not (stop is not None and stop.is_set()):
        size = min(_CHUNK, nbytes - done)
        if libc.madvise(start + done, size, _MADV_POPULATE_WRITE) != 0:
            return done, f"madvise errno {ctypes.get_errno()}"
        done += size
    return done, ""


def _why_not() -> str:
    """ "" where warming can help this call, else why not."""
    if host_memory.STATUS != "kept" or host_memory.DISPATCH != "calling thread":
        return f"off (host_memory: {host_memory.STATUS}, {host_memory.DISPATCH})"
    if threading.current_thread() is not threading.main_thread():
        return "off (not the main thread: its buffers come from another arena)"
    if not trace_state.top_level():
        return "off (called inside a trace)"
    return ""


def compile_warming_heap(jitted: Any, *args: Any, **kwargs: Any) -> str:
    """Traces and compiles `jitted` for these arguments (into JAX's caches, as its own first
    call would) while a thread faults in the block `malloc` will give the program's buffer;
    returns what it did (also `LAST`)."""
    global LAST
    traced = jitted.trace(*args, **kwargs)
    want = int(ESTIMATE_SCALE * live_bytes(traced.jaxpr))
    block = next_block(want)
    if block is None:
        LAST = f"off (no block of {want >> 20} MiB from glibc's malloc)"
        return LAST
    lowered = traced.lower()
    stop, result = threading.Event(), []

    def warm() -> None:
        t0 = time.perf_counter()
        result.append((*fault_in(*block, stop), time.perf_counter() - t0))

    worker = threading.Thread(target=warm, name="xmedjax-heap-warming", daemon=True)
    worker.start()
    try:
        lowered.compile()
    finally:
        stop.set()
        worker.join()
    done, why, seconds = result[0] if result else (0, "the thread failed", 0.0)
    LAST = f"warmed {done >> 20} of {want >> 20} MiB of heap in {seconds:.1f} s" + (
        f" ({why})" if why else ""
    )
    return LAST


def _huge_pages() -> bool:
    """Whether XLA:CPU's heap is faulted in as huge pages (`host_memory.HUGE_PAGES`)."""
    return host_memory.HUGE_PAGES.startswith("advised") or host_memory._thp_mode() == "always"


def applies(platform: str, devices: int) -> bool:
    """Whether a program on `devices` devices of `platform` gets its heap warmed on its first
    call: one CPU device whose heap has huge pages (module docstring)."""
    return ENABLED and platform == "cpu" and devices == 1 and _huge_pages()


def warm_or_why_not(jitted: Any, *args: Any, **kwargs: Any) -> str:
    """`compile_warming_heap` where this call can use it, else why not (also `LAST`)."""
    global LAST
    LAST = _why_not() or compile_warming_heap(jitted, *args, **kwargs)
    return LAST
