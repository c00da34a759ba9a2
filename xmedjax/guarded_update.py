"""One optimiser step with the non-finite guard folded in: new params, optimiser state, and
whether the step was finite.

A train step takes no step at all when the loss or the gradients' sum of squares is not
finite (the caller stops). Written as optax's `update` and `apply_updates` followed by
`jnp.where(finite, new, old)` over every leaf, XLA on a CPU builds Adam in more passes over
the moments than it needs: g^2 as a buffer, the update, the guarded moments, and a copy of
each old moment (the update and the guard both read it, so the donated buffer cannot be
written in place).

`make_optimizer`'s Adam and AdamW (`FlatAdam`) take the written-out form instead: the
moments are guarded as they are computed, and the update reads the guarded ones (equal to
the new ones on a finite step; on another the parameters keep their old values anyway), so
each old moment has one reader and is written in place. One reduction gives both the guard
and the gradient norm. The arithmetic is optax's, operation for operation, and the results
are the same bit for bit (tests/test_guarded_update.py). ResNet50's update, guard and norm
take ~93 ms of its train step against ~127 ms (`benchmarks/NOTES.md`, "Phase 11"). Every
other optimiser takes the generic form.

Each parameter then takes its slice of the flat update. At offsets known when XLA compiles,
every parameter's slice-and-add is a kernel of its own (364 for DenseNet121, each compiled
by LLVM: 3.7-4.0 s of its train step's compile). Given `offsets`, one int32 scalar per
parameter passed in at run time (`train_state.jit_train_step` does), the slices start there
instead, and parameters of one shape share one kernel: DenseNet121's updates alone compile
in 1.1 s, its whole train step in 15.5 s against 19.6 s, the same values bit for bit
(`benchmarks/NOTES.md`, "Phase 14").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
from jax import lax

from xmedjax import optimizer_layout

# Off: every optimiser takes the generic form (benchmarks/cpu_ab.py's variant letter "a").
WRITE_OUT_ADAM = True
# Off: `train_state.jit_train_step` passes no run-time offsets (cpu_ab.py's letter "u").
RUNTIME_OFFSETS = True


class FlatAdam(optax.GradientTransformationExtraArgs):
    """`optax.flatten(optax.inject_hyperparams(optax.adam or optax.adamw)(...))`, marked so
    that `guarded_step` writes its update out (its state is the unmarked one's)."""

    __slots__ = ()


def _finite_and_norm(loss: jax.Array, flat_grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    # |g| * |g| rather than g * g: the same value, but XLA then fuses the square into the
    # reduction instead of keeping one g^2 buffer shared with Adam's second moment.
    squares = jnp.sum(jnp.abs(flat_grads) * jnp.abs(flat_grads))
    # One reduction for both: the sum of squares is finite exactly when every gradient is
    # and none is so large (|g| > 1.8e19) that its square, and so Adam's second moment,
    # would be infinite, which would freeze that parameter for good.
    return jnp.isfinite(loss) & jnp.isfinite(squares), jnp.sqrt(squares)


def _generic(tx, params, opt_state, grads, loss):
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # The very concatenation optax.flatten builds (XLA computes it once).
    finite, norm = _finite_and_norm(loss, jax.flatten_util.ravel_pytree(grads)[0])
    new_params, new_opt = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (new_params, new_opt), (params, opt_state)
    )
    return new_params, new_opt, finite, norm


def _flat_adam(params, opt_state, grads, loss, offsets):
    adam, *others = opt_state.inner_state
    dtype = adam.nu.dtype
    hyper = {k: jnp.asarray(v).astype(dtype) for k, v in opt_state.hyperparams.items()}
    b1, b2 = hyper["b1"], hyper["b2"]
    g = jnp.concatenate([jnp.reshape(leaf, -1) for leaf in jax.tree.leaves(grads)])
    finite, norm = _finite_and_norm(loss, g)

    def guarded(new, old):
        return jnp.where(finite, new, old)

    count = optax.safe_increment(adam.count)
    mu = guarded((1 - b1) * g + b1 * adam.mu, adam.mu).astype(adam.mu.dtype)
    nu = guarded((1 - b2) * (g * g) + b2 * adam.nu, adam.nu)
    mu_hat = mu / (1 - b1**count).astype(mu.dtype)
    nu_hat = nu / (1 - b2**count).astype(nu.dtype)
    flat_update = mu_hat / (jnp.sqrt(nu_hat + hyper["eps_root"]) + hyper["eps"])
    decay = hyper.get("weight_decay")  # AdamW: optax.add_decayed_weights, mask None
    if decay is None:
        flat_update = flat_update * -hyper["learning_rate"]
    # lax, not jnp, per parameter: DenseNet121 has 364 and each jnp call costs a nested
    # trace.
    leaves, treedef = jax.tree.flatten(params)
    known = offsets is None  # offsets XLA sees (one kernel per parameter) or run-time ones
    starts = optimizer_layout.parameter_offsets(params) if known else offsets
    new_leaves = []
    for leaf, start in zip(leaves, starts, strict=True):
        if known:
            piece = lax.slice(flat_update, (start,), (start + leaf.size,))
        else:
            piece = lax.dynamic_slice(flat_update, (start,), (leaf.size,))
        update = lax.reshape(piece, leaf.shape)
        if decay is not None:
            update = (update + decay * leaf) * -hyper["learning_rate"]
        new = lax.add(leaf, update.astype(leaf.dtype))
        new_leaves.append(lax.select(lax.broadcast(finite, leaf.shape), new, leaf))
    new_adam = adam._replace(count=guarded(count, adam.count), mu=mu, nu=nu)
    new_opt = opt_state._replace(
        count=guarded(optax.safe_increment(opt_state.count), opt_state.count),
        hyperparams=hyper,
        inner_state=(new_adam, *others),
    )
    return jax.tree.unflatten(treedef, new_leaves), new_opt, finite, norm


def guarded_step(
    tx: Any,
    params: Any,
    opt_state: Any,
    grads: Any,
    loss: jax.Array,
    offsets: Sequence[jax.Array] | None = None,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """`(new params, new optimiser state, finite, gradient norm)`; pure.

    On a step whose loss or gradients' sum of squares is not finite (a gradient is not, or
    is so large that its square overflows), params and state come back unchanged and
    `finite` is False. `offsets`: where each parameter starts in the flat update, as int32
    scalars known only at run time (`optimizer_layout.parameter_offsets` placed on the
    device; module docstring); None: the same offsets as constants. Only the written-out
    Adam reads them.
    """
    if WRITE_OUT_ADAM and isinstance(tx, FlatAdam):
        return _flat_adam(params, opt_state, grads, loss, offsets)
    return _generic(tx, params, opt_state, grads, loss)
