"""XLA compiler options for the programs that only run the model forward (issue 14: CPU speed).

On a CPU, XLA hands convolutions to YNNPACK by default. In the programs that run the model
forward only, the eval step and Grad-CAM (whose backward reaches only the target layer),
XLA's own (Eigen) convolutions ran faster on a 2-core Xeon: ResNet50's eval step 323 -> 290
ms and its Grad-CAM 321 -> 296 ms, interleaved in one process (benchmarks/NOTES.md, "Phase
7"); DenseNet121's, whose 3x3 convolutions are matrix products (`kernel_grad`), unchanged.
The train step keeps the default: there YNNPACK's backward convolutions are the faster ones
(25% slower without them, "Phase 4"). Every other backend compiles with its defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from xmedjax import first_call, trace_state

# Set to False to compile forward programs with XLA's defaults on a CPU too (an A/B switch).
EIGEN_FORWARD_CONVS = True
CPU_FORWARD = {
    # YNNPACK for the products and reductions, as by default, but not for convolutions.
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    ),
}


def forward_options(platform: str) -> dict[str, str] | None:
    """Compiler options for a forward-only program on `platform` ("cpu", "gpu", "tpu")."""
    if platform == "cpu" and EIGEN_FORWARD_CONVS:
        return dict(CPU_FORWARD)
    return None


def forward_jit(fun: Callable | None = None, **jit_kwargs: Any):
    """`jax.jit(fun, **jit_kwargs)` compiled with `forward_options` of the default backend.

    The backend is looked up at the first call (or `lower`), not when this runs: starting
    it at import would come before `jax.distributed.initialize` on a multi-host TPU. Usable
    as a decorator, bare or with `jax.jit`'s keywords."""
    if fun is None:
        return functools.partial(forward_jit, **jit_kwargs)
    return _ForwardJit(fun, jit_kwargs)


class _ForwardJit:
    """A jitted function whose compiler options wait for the backend (`forward_jit`);
    called inside another trace it is a plain nested `jax.jit`."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
        self._nested = jax.jit(fun, **jit_kwargs)

    def _get(self):
        if self._jitted is None:
            options = forward_options(jax.default_backend())
            jitted = jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
            self._jitted = first_call.wrap(jitted)  # traced with the garbage collector paused
        return self._jitted

    def __call__(self, *args, **kwargs):
        if not trace_state.top_level():
            return self._nested(*args, **kwargs)
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str):  # lower, trace, eval_shape, clear_cache, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)
