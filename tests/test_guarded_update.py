"""The optimiser step with the non-finite guard folded in (`xmedjax/guarded_update.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmedjax import guarded_update
from xmedjax import train_state as ts

SHAPES = {"conv": (3, 3, 4, 8), "bias": (8,), "dense": (8, 5), "scale": (1,)}


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(100 + seed)
    return {k: jnp.asarray(rng.standard_normal(s) * 1e-2, jnp.float32) for k, s in SHAPES.items()}


def _unmarked(tx) -> optax.GradientTransformationExtraArgs:
    """The same optimiser without the mark: the generic form (optax's update, then the guard)."""
    return optax.GradientTransformationExtraArgs(*tx)


def _run(tx, grads_per_step, losses=None):
    step = jax.jit(lambda p, o, g, loss: guarded_update.guarded_step(tx, p, o, g, loss))
    params = _params()
    opt_state = tx.init(params)
    out = []
    for i, grads in enumerate(grads_per_step):
        loss = jnp.float32(0.5 if losses is None else losses[i])
        params, opt_state, finite, norm = step(params, opt_state, grads, loss)
        out.append((params, opt_state, bool(finite), float(norm)))
    return out


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_written_out_adam_is_optax_adam_bit_for_bit(name):
    tx = ts.make_optimizer(name, 1e-2, weight_decay=0.05)
    assert isinstance(tx, guarded_update.FlatAdam)
    grads = [_grads(i) for i in range(4)]
    ours, theirs = _run(tx, grads), _run(_unmarked(tx), grads)
    for (p, o, f, n), (p_ref, o_ref, f_ref, n_ref) in zip(ours, theirs):
        assert f and f_ref and n == n_ref
        for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((p_ref, o_ref))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the parameters did move: four steps of lr 1e-2.
    assert not np.allclose(np.asarray(ours[-1][0]["conv"]), np.asarray(_params()["conv"]))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "huge_grad", "nan_loss"])
def test_a_non_finite_step_changes_nothing(name, bad):
    tx = ts.make_optimizer(name, 1e-2)
    grads = [_grads(0), _grads(1), _grads(2)]
    losses = [0.5, 0.5, 0.5]
    if bad == "nan_grad":
        grads[1]["dense"] = grads[1]["dense"].at[2, 3].set(jnp.nan)
    elif bad == "inf_grad":
        grads[1]["scale"] = grads[1]["scale"].at[0].set(-jnp.inf)
    elif bad == "huge_grad":  # finite, but its square (Adam's second moment) is not
        grads[1]["conv"] = grads[1]["conv"].at[1, 1, 2, 3].set(3e19)
    else:
        losses[1] = float("nan")
    out = _run(tx, grads, losses)
    assert [finite for _, _, finite, _ in out] == [True, False, True]
    for a, b in zip(jax.tree.leaves(out[0][:2]), jax.tree.leaves(out[1][:2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The step after it goes on from the last good state: the same as skipping the bad one.
    clean = _run(tx, [grads[0], grads[2]])
    for a, b in zip(jax.tree.leaves(out[2][:2]), jax.tree.leaves(clean[1][:2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_gradient_norm_is_the_norm_of_every_gradient(name):
    grads = _grads(3)
    ((_, _, _, norm),) = _run(ts.make_optimizer(name, 1e-3), [grads])
    flat = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])
    np.testing.assert_allclose(norm, np.linalg.norm(flat), rtol=1e-6)


def test_only_adam_and_adamw_are_marked():
    assert not isinstance(ts.make_optimizer("sgd", 1e-3), guarded_update.FlatAdam)
    assert isinstance(ts.make_optimizer("adam", 1e-3), guarded_update.FlatAdam)
