"""xmedjax/first_call.py: a jitted step's first call traces with the garbage collector paused."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmedjax import first_call


def _recording():
    """A jitted function that records, each time it is traced, whether the collector ran."""
    seen = []

    def f(x):
        seen.append(gc.isenabled())
        return jnp.sin(x) * 2

    return jax.jit(f), seen


def test_first_call_traces_with_the_collector_paused_and_restores_it():
    jitted, seen = _recording()
    wrapped = first_call.wrap(jitted)
    assert gc.isenabled()
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(wrapped(x), jnp.sin(x) * 2)
    assert seen == [False] and gc.isenabled()
    wrapped(jnp.arange(6.0))  # a new shape traces again, now an ordinary call
    assert seen == [False, True]
    # the jit's own API is passed through
    assert wrapped.lower(x).as_text() == jitted.lower(x).as_text()


def test_collector_paused_by_the_caller_stays_paused():
    jitted, seen = _recording()
    gc.disable()
    try:
        first_call.wrap(jitted)(jnp.ones(3))
        assert seen == [False] and not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_in_the_first_call_restores_the_collector():
    def bad(x):
        assert not gc.isenabled()
        raise ValueError("bad input")

    wrapped = first_call.wrap(jax.jit(bad))
    with pytest.raises(ValueError, match="bad input"):
        wrapped(jnp.ones(3))
    assert gc.isenabled()


def test_forward_jit_first_call_traces_with_the_collector_paused():
    """Grad-CAM and the other explanations compile through `compile_options.forward_jit`:
    its first call pauses the collector too."""
    from xmedjax import compile_options

    seen = []

    def f(x):
        seen.append(gc.isenabled())
        return jnp.cos(x)

    jitted = compile_options.forward_jit(f)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(jitted(x), jnp.cos(x))
    jitted(jnp.arange(5.0))
    assert seen == [False, True] and gc.isenabled()
