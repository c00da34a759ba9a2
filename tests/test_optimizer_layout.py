"""The flattened optimiser (one vector per moment) and the per-parameter checkpoint layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmedjax import checkpointing, optimizer_layout
from xmedjax import train_state as ts
from xmedjax.models import create_model


def _state(name: str = "adam", tx=None):
    model = create_model("resnet50", 2, width=0.125)
    return ts.create_train_state(model, tx or ts.make_optimizer(name, 1e-3))


def _grads(params, seed: int):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)


def _per_parameter_tx(name: str):
    """The optimiser as it was before optax.flatten: what older checkpoints were written by."""
    inner = {
        "adam": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
        "adamw": lambda: optax.inject_hyperparams(optax.adamw)(
            learning_rate=1e-3, weight_decay=0.0
        ),
        "sgd": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=1e-3, momentum=0.9),
    }
    return inner[name]()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_disk_layout_is_the_per_parameter_optimiser_state(name):
    _, state = _state(name)
    old = _per_parameter_tx(name).init(state.params)
    disk = optimizer_layout.to_disk(state)
    assert jax.tree.structure(disk.opt_state) == jax.tree.structure(old)
    shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]  # noqa: E731
    assert shapes(disk.opt_state) == shapes(old)
    like = optimizer_layout.disk_like(state)
    assert jax.tree.structure(like.opt_state) == jax.tree.structure(old)


def test_flat_updates_equal_per_parameter_updates_and_round_trip_exactly():
    mdef, state = _state("adam")
    old_tx = _per_parameter_tx("adam")
    old_opt = old_tx.init(state.params)
    new_opt, params, old_params = state.opt_state, state.params, state.params
    for seed in range(3):
        grads = _grads(params, seed)
        updates, new_opt = mdef.tx.update(grads, new_opt, params)
        params = optax.apply_updates(params, updates)
        old_updates, old_opt = old_tx.update(grads, old_opt, old_params)
        old_params = optax.apply_updates(old_params, old_updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(old_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    state = state.replace(params=params, opt_state=new_opt)
    disk = optimizer_layout.to_disk(state)
    for a, b in zip(jax.tree.leaves(disk.opt_state), jax.tree.leaves(old_opt)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    back = optimizer_layout.from_disk(disk, state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_checkpoint_written_by_the_per_parameter_optimiser_restores(tmp_path):
    """A work directory saved before optax.flatten resumes: its moments become the vectors."""
    _, state = _state("adam")
    old_tx = _per_parameter_tx("adam")
    grads = _grads(state.params, 7)
    _, old_opt = old_tx.update(grads, old_tx.init(state.params), state.params)
    old_state = state.replace(opt_state=old_opt)
    with checkpointing.RunCheckpoints(str(tmp_path)) as ckpt:
        # the old code saved its state as is (to_disk finds no moment vector in it)
        ckpt.save_latest(3, old_state, None, {"epoch": 1})
        ckpt.wait()
    with checkpointing.RunCheckpoints(str(tmp_path)) as ckpt:
        restored, loop = ckpt.restore_latest(state, None)
    assert loop == {"epoch": 1}
    mu = restored.opt_state.inner_state[0].mu
    want, _ = jax.flatten_util.ravel_pytree(old_opt.inner_state[0].mu)
    assert mu.shape == want.shape
    np.testing.assert_array_equal(mu, want)
    np.testing.assert_array_equal(
        restored.opt_state.inner_state[0].nu,
        jax.flatten_util.ravel_pytree(old_opt.inner_state[0].nu)[0],
    )
    assert jnp.all(restored.opt_state.inner_state[0].count == 1)
