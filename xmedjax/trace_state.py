"""Whether a JAX trace is running: one JAX-internal check, shared by `compile_options`
(compiler options only at top level) and `heap_warming` (no warming inside a trace)."""

from __future__ import annotations


def top_level() -> bool:
    """Whether no JAX trace is running (JAX refuses compiler options on a nested jit). The
    check is JAX-internal; without it every call counts as nested (XLA's defaults)."""
    try:
        from jax._src.core import trace_state_clean  # noqa: PLC0415
    except ImportError:
        return False
    return bool(trace_state_clean())
