"""The optimiser state in memory (one vector per moment) and on disk (one array per parameter).

`train_state.make_optimizer` wraps the optimiser in `optax.flatten`: Adam's `mu` and `nu`
(SGD's momentum) are one vector each over every parameter, in `ravel_pytree` order, so a
step updates them in a few fused loops instead of one per parameter (DenseNet121 has 364
parameter arrays): its first train call compiles 20% faster and each step runs 7% faster
(`benchmarks/NOTES.md`, "Phase 3"). Checkpoints keep the layout they have always had, one
array per parameter under the parameter's own name: `to_disk` splits each vector before a
save and `from_disk` joins them after a restore, so work directories written before and
after this change restore alike, and a resumed run continues bit for bit.

A moment vector is told from the rest of the state by its shape: one axis as long as the
parameters' total size. Both directions run jitted, so they work on arrays that span
several processes.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp


def _sizes(params: Any) -> tuple[jax.tree_util.PyTreeDef, tuple[tuple[int, ...], ...], int]:
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    return treedef, shapes, sum(math.prod(s) for s in shapes)


def _is_moment(leaf: Any, total: int) -> bool:
    shape = getattr(leaf, "shape", None)
    return shape is not None and len(shape) == 1 and shape[0] == total and total > 1


def _starts(shapes: Any) -> tuple[int, ...]:
    """Where each of arrays of these shapes starts in their joined vector."""
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(itertools.accumulate(sizes[:-1], initial=0)) if sizes else ()


def parameter_offsets(params: Any) -> tuple[int, ...]:
    """Where each parameter starts in a moment vector (`ravel_pytree` order)."""
    return _starts(leaf.shape for leaf in jax.tree.leaves(params))


def _has_layout(state: Any) -> bool:
    return hasattr(state, "params") and hasattr(state, "opt_state")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split(vector: jax.Array, treedef: Any, shapes: tuple) -> Any:
    """A moment vector -> one array per parameter (the tree of `params`)."""
    leaves = [
        vector[start : start + math.prod(shape)].reshape(shape)
        for start, shape in zip(_starts(shapes), shapes, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


@jax.jit
def _join(tree: Any) -> jax.Array:
    """One array per parameter -> the moment vector (`ravel_pytree` order)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def to_disk(state: Any) -> Any:
    """`state` with each moment vector split into one array per parameter (for saving)."""
    if not _has_layout(state):
        return state
    treedef, shapes, total = _sizes(state.params)
    opt_state = jax.tree.map(
        lambda leaf: _split(leaf, treedef, shapes) if _is_moment(leaf, total) else leaf,
        state.opt_state,
    )
    return state.replace(opt_state=opt_state)


def disk_like(state_like: Any) -> Any:
    """The structure a checkpoint of `state_like` holds (ShapeDtypeStructs with shardings)."""
    if not _has_layout(state_like):
        return state_like
    _, _, total = _sizes(state_like.params)

    def per_parameter(leaf):
        if not _is_moment(leaf, total):
            return leaf
        sharding = getattr(leaf, "sharding", None)
        return jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, leaf.dtype, sharding=sharding),
            state_like.params,
        )

    return state_like.replace(opt_state=jax.tree.map(per_parameter, state_like.opt_state))


def from_disk(restored: Any, state_like: Any) -> Any:
    """A restored checkpoint (one array per parameter) in `state_like`'s in-memory layout."""
    if not _has_layout(state_like):
        return restored
    _, _, total = _sizes(state_like.params)

    def join(like, saved):
        return _join(saved) if _is_moment(like, total) else saved

    return restored.replace(opt_state=jax.tree.map(join, state_like.opt_state, restored.opt_state))
