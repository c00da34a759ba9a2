"""The optimiser step with the non-finite guard folded in (`xmedjax/guarded_update.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmedjax import guarded_update, optimizer_layout
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


def _run(tx, grads_per_step, losses=None, runtime_offsets=False):
    """`runtime_offsets`: each parameter's start in the flat update passed in as an int32
    scalar at run time (as `jit_train_step` does), not known when XLA compiles."""
    step = jax.jit(
        lambda p, o, g, loss, offsets: guarded_update.guarded_step(tx, p, o, g, loss, offsets)
    )
    params = _params()
    opt_state = tx.init(params)
    offsets = None
    if runtime_offsets:
        starts = optimizer_layout.parameter_offsets(params)
        offsets = tuple(jnp.asarray(start, jnp.int32) for start in starts)
    out = []
    for i, grads in enumerate(grads_per_step):
        loss = jnp.float32(0.5 if losses is None else losses[i])
        params, opt_state, finite, norm = step(params, opt_state, grads, loss, offsets)
        out.append((params, opt_state, bool(finite), float(norm)))
    return out


@pytest.mark.parametrize("runtime_offsets", [False, True])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_written_out_adam_is_optax_adam_bit_for_bit(name, runtime_offsets):
    tx = ts.make_optimizer(name, 1e-2, weight_decay=0.05)
    assert isinstance(tx, guarded_update.FlatAdam)
    grads = [_grads(i) for i in range(4)]
    ours = _run(tx, grads, runtime_offsets=runtime_offsets)
    theirs = _run(_unmarked(tx), grads)
    for (p, o, f, n), (p_ref, o_ref, f_ref, n_ref) in zip(ours, theirs):
        assert f and f_ref and n == n_ref
        for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((p_ref, o_ref))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the parameters did move: four steps of lr 1e-2.
    assert not np.allclose(np.asarray(ours[-1][0]["conv"]), np.asarray(_params()["conv"]))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adam_runtime_offsets"])
@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "huge_grad", "nan_loss"])
def test_a_non_finite_step_changes_nothing(name, bad):
    runtime_offsets = name.endswith("_runtime_offsets")
    name = name.removesuffix("_runtime_offsets")
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
    out = _run(tx, grads, losses, runtime_offsets=runtime_offsets)
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


def _train_steps(runtime_offsets: bool, monkeypatch) -> tuple[list, object, str]:
    """Four train steps of a small ResNet50 through `jit_train_step`: two plain calls, one
    through `lower(...).compile()`, one through `trace(...).lower().compile()`."""
    from xmedjax import mesh as mesh_lib
    from xmedjax.models import create_model

    monkeypatch.setattr(guarded_update, "RUNTIME_OFFSETS", runtime_offsets)
    model = create_model("resnet50", 2, in_channels=1, width=0.0625, seed=1)
    mdef, state = ts.create_train_state(model, ts.make_optimizer("adam", 1e-3))
    mesh = mesh_lib.make_mesh()
    state = ts.place_state(state, mesh)
    step = ts.jit_train_step(mdef, state, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(4, 32, 32, 1)).astype(np.float32),
        "label": np.arange(4, dtype=np.int32) % 2,
    }
    hlo = step.lower(state, batch).compile().as_text()
    out = []
    for call in (
        step,
        step,
        lambda s, b: step.lower(s, b).compile()(s, b),
        lambda s, b: step.trace(s, b).lower().compile()(s, b),
    ):
        state, metrics = call(state, batch)
        out.append(jax.device_get((state, metrics)))
    return out, step, hlo


def test_train_step_with_run_time_offsets_steps_as_without_them(monkeypatch):
    with_offsets, step, hlo = _train_steps(True, monkeypatch)
    without, plain_step, plain_hlo = _train_steps(False, monkeypatch)
    for a, b in zip(jax.tree.leaves(with_offsets), jax.tree.leaves(without)):
        np.testing.assert_array_equal(a, b)
    assert int(with_offsets[-1][0].step) == 4
    # One int32 scalar per parameter, each its start in the flat update, on the device.
    params = with_offsets[0][0].params
    expected = optimizer_layout.parameter_offsets(params)
    assert [int(o) for o in step.offsets] == list(expected) and expected[0] == 0
    assert len(step.offsets) == len(jax.tree.leaves(params)) > 100
    assert plain_step.offsets is None
    # Each parameter's update reads its slice at a run-time offset (XLA then compiles one
    # update kernel per parameter shape), where the plain step's offsets are constants.
    added = hlo.count(" dynamic-slice(") - plain_hlo.count(" dynamic-slice(")
    assert added >= len(step.offsets)
