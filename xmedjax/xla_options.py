"""XLA compiler options for forward programs on a CPU (issue 14: CPU speed).

XLA:CPU hands convolutions, matrix products and reductions to YNNPACK by default. For the
forward convolutions of ResNet50 and DenseNet121 XLA's own (Eigen) convolutions are faster
on the CPUs measured here: an eval step, Grad-CAM or a CAM batch runs 10-19% faster with
YNNPACK kept for products and reductions only (`benchmarks/NOTES.md`, "Phase 4"). Training
is not: its backward convolutions are faster in YNNPACK, so the train step keeps XLA's
defaults. The option is set per program (`jax.jit(..., compiler_options=...)`), never in
`XLA_FLAGS`, so nothing else in the process changes.

`forward_jit` is `jax.jit` for such a program. The options are decided once, at the first
call (when the backend is known), by `forward_options`: `FORWARD_ON_CPU` on the CPU backend
if the installed jaxlib compiles a probe with them, None (XLA's defaults) on a GPU or TPU,
when `XLA_FLAGS` already sets the same flag (the user's choice wins), or when
`XMEDJAX_FORWARD_XLA=default`. `STATUS` says which, for benchmark records.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import core as _jax_core  # trace_state_clean (private; a public fallback below)

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default YNNPACK fusions less the convolutions.
FORWARD_ON_CPU = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
ENV = "XMEDJAX_FORWARD_XLA"  # "default": XLA's defaults for forward programs too

STATUS = "undecided"  # "cpu forward options", or why not (set by forward_options)


@functools.cache
def forward_options() -> dict[str, str] | None:
    """The compiler options of forward programs on this process's default backend."""
    global STATUS
    if os.environ.get(ENV, "").strip().lower() == "default":
        STATUS = f"off ({ENV}=default)"
        return None
    backend = jax.default_backend()
    if backend != "cpu":
        STATUS = f"off (backend {backend})"
        return None
    if YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        STATUS = f"off (XLA_FLAGS sets {YNN_FUSION_TYPE})"
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=FORWARD_ON_CPU).lower(jnp.zeros(2)).compile()
    except Exception as err:  # noqa: BLE001 (any refusal: an older or newer jaxlib's values)
        STATUS = f"off (this jaxlib refused them: {str(err).splitlines()[0][:200]})"
        warnings.warn(
            f"xmedjax.xla_options: {STATUS}; forward programs use XLA's defaults", stacklevel=2
        )
        return None
    STATUS = "cpu forward options"
    return dict(FORWARD_ON_CPU)


def forward_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `forward_options()`; usable as a decorator
    (`@forward_jit` or `@forward_jit(static_argnums=0)`). The jitted function is built at
    the first call or `.lower`, once."""
    if fun is None:
        return functools.partial(forward_jit, **jit_kwargs)
    return _ForwardJit(fun, jit_kwargs)


def _at_top_level(args: tuple, kwargs: dict) -> bool:
    """Whether a jitted call here is a top-level one (JAX refuses `compiler_options` on a jit
    nested in another trace): JAX's own trace state where this JAX has it, else no Tracer
    among the arguments."""
    clean = getattr(_jax_core, "trace_state_clean", None)
    if clean is not None:
        return bool(clean())
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))


class _ForwardJit:
    """A lazily built `jax.jit` wrapper (see `forward_jit`); inside another trace (a forward
    program called from a jitted function) it is a plain nested `jax.jit`, and the outer
    program's options apply."""

    def __init__(self, fun: Callable, jit_kwargs: dict):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs = fun, jit_kwargs
        self._top: Callable | None = None
        self._nested = jax.jit(fun, **jit_kwargs)

    def _get(self) -> Callable:
        if self._top is None:
            self._top = jax.jit(self._fun, compiler_options=forward_options(), **self._jit_kwargs)
        return self._top

    def __call__(self, *args, **kwargs):
        if _at_top_level(args, kwargs):
            return self._get()(*args, **kwargs)
        return self._nested(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return (self._get() if _at_top_level(args, kwargs) else self._nested).lower(*args, **kwargs)
