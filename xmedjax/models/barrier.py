"""A value computed once into a buffer of its own, which XLA cannot fuse into its readers.

XLA:CPU expands `optimization_barrier` before it fuses, so the boundary here is a loop it
cannot see through (issue 14: CPU speed; benchmarks/NOTES.md, "Phase 4").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialise(a: jax.Array) -> jax.Array:
    """`a`, computed once into its own buffer: a one-trip loop (a count XLA cannot know, it
    depends on a value of `a`) whose body selects `a` by the counter. Forward only (a loop
    has no reverse mode): wrap it in a custom rule to differentiate through it."""
    flat = a.reshape(-1)
    trips = (flat[0] == flat[0]).astype(jnp.int32)  # 1 (0 only when a[0] is NaN)

    def body(carry):
        i, value = carry
        return i + 1, jnp.where(i >= 0, value, jnp.zeros_like(value))

    return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), a))[1]
