"""A jitted step's first call: Python's cyclic garbage collector waits while it traces.

Tracing DenseNet121's train step makes ~6 million Python calls and as many short-lived
objects; the cyclic collector ran 445 / 41 / 3 collections of generations 0 / 1 / 2 during
it, each of the last scanning the ~440,000 objects the process holds (the model, JAX's
caches). Paused, the trace took 1.69 / 1.84 s against 2.12 / 2.13 s (separate processes;
benchmarks/NOTES.md, "Phase 10"), and the process held 6,500 more objects after it: the
collector finds them at its next run.

`wrap(jitted)` returns the jitted function with one difference: its first call (trace,
lowering, XLA compile, execution) runs with the collector paused (`gc.disable`), and
restored as it was after, on an error too. With `warm_heap=True` (see
`heap_warming.applies`) that call also faults the step's buffer in while XLA compiles it
(`heap_warming`). Every later call goes straight to the jitted function; `trace`, `lower`
and the rest of the jit's own API are passed through. Used by the train and eval steps
(`train_state`) and by `compile_options.forward_jit` (Grad-CAM and the other explanations:
DenseNet121's Grad-CAM first call 3.36 / 3.46 s against 3.60 / 3.81 s, "Phase 11").
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

from xmedjax import heap_warming

# Set to False to leave the collector running on first calls (an A/B switch:
# benchmarks/cpu_first_call.py --gc_pause=off).
PAUSE_GC = True


class _FirstCall:
    """A jitted function whose first call pauses the garbage collector (`wrap`)."""

    def __init__(self, jitted: Any, warm_heap: bool):
        functools.update_wrapper(self, jitted)
        self._jitted, self._warm_heap, self._first = jitted, warm_heap, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._first:
            return self._jitted(*args, **kwargs)
        self._first = False
        collecting = gc.isenabled()
        if PAUSE_GC:
            gc.disable()
        try:
            if self._warm_heap:
                heap_warming.warm_or_why_not(self._jitted, *args, **kwargs)
            return self._jitted(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, clear_cache, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def wrap(jitted: Callable, *, warm_heap: bool = False) -> Callable:
    """`jitted` whose first call runs with the garbage collector paused, and with
    `warm_heap` the heap warmed while it compiles (module docstring)."""
    return _FirstCall(jitted, warm_heap)
