"""Integrated gradients and SmoothGrad against their definitions on a hand-differentiable model.

Model: S(x) = sum_c W[c, t] mean_hw(relu(k_c x)^2) + b_t, so dS/dx = sum_c W[c, t] 2 relu(k_c x) k_c / (H W)
and dS/dx at a x equals a dS/dx at x (a > 0): the integrated-gradient integrand is linear in a,
the midpoint rule is exact, IG = x * dS/dx(x) / 2, and IG sums to S(x) - S(0) (completeness).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_cams import TinyCam, numpy_logits

from xmedjax.explain.attribution import input_gradients, integrated_gradients_fn, smoothgrad_fn


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(3)
    k = np.array([1.5, -1.0], np.float32)
    w = rng.normal(size=(2, 3)).astype(np.float32)
    b = np.array([0.3, -0.1, 0.2], np.float32)
    x = rng.normal(size=(3, 4, 5, 1)).astype(np.float32)
    targets = np.array([2, 0, 1], np.int32)
    graphdef, state = nnx.split(TinyCam(k, w, b))
    a = np.maximum(x * k, 0)
    grad = np.sum(w[:, targets].T[:, None, None, :] * 2 * a * k, axis=-1, keepdims=True) / (
        x.shape[1] * x.shape[2]
    )
    return dict(k=k, w=w, b=b, x=x, targets=targets, graphdef=graphdef, state=state, grad=grad)


def test_input_gradients_by_hand(model):
    got = input_gradients(
        model["graphdef"], model["state"], jnp.asarray(model["x"]), jnp.asarray(model["targets"])
    )
    np.testing.assert_allclose(got, model["grad"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 8])
def test_integrated_gradients_definition_and_completeness(model, steps):
    x, targets = model["x"], model["targets"]
    result = integrated_gradients_fn(
        model["graphdef"], model["state"], jnp.asarray(x), jnp.asarray(targets), steps=steps
    )
    np.testing.assert_allclose(result.raw, (x * model["grad"] / 2)[..., 0], rtol=1e-5, atol=1e-7)
    rows = np.arange(len(x))
    gap = numpy_logits(x, model["k"], model["w"], model["b"])[rows, targets] - model["b"][targets]
    np.testing.assert_allclose(np.asarray(result.raw).sum(axis=(1, 2)), gap, rtol=1e-4)
    np.testing.assert_allclose(result.maps.max(axis=(1, 2)), 1.0, rtol=1e-6)


def test_integrated_gradients_with_a_baseline(model):
    x, targets = model["x"], model["targets"]
    baseline = np.full_like(x, 0.0)
    default = integrated_gradients_fn(
        model["graphdef"], model["state"], jnp.asarray(x), jnp.asarray(targets), steps=4
    )
    given = integrated_gradients_fn(
        model["graphdef"],
        model["state"],
        jnp.asarray(x),
        jnp.asarray(targets),
        steps=4,
        baseline=jnp.asarray(baseline),
    )
    np.testing.assert_allclose(default.raw, given.raw, rtol=1e-6)


def test_smoothgrad_without_noise_is_the_absolute_gradient(model):
    x, targets = model["x"], model["targets"]
    result = smoothgrad_fn(
        model["graphdef"],
        model["state"],
        jnp.asarray(x),
        jnp.asarray(targets),
        samples=3,
        noise=0.0,
    )
    np.testing.assert_allclose(result.raw, np.abs(model["grad"][..., 0]), rtol=1e-5, atol=1e-7)


def test_smoothgrad_is_the_mean_over_seeded_noise(model):
    x, targets = jnp.asarray(model["x"]), jnp.asarray(model["targets"])
    one = smoothgrad_fn(model["graphdef"], model["state"], x, targets, samples=4, noise=0.2, seed=1)
    again = smoothgrad_fn(
        model["graphdef"], model["state"], x, targets, samples=4, noise=0.2, seed=1
    )
    other = smoothgrad_fn(
        model["graphdef"], model["state"], x, targets, samples=4, noise=0.2, seed=2
    )
    np.testing.assert_array_equal(one.raw, again.raw)
    assert not np.allclose(one.raw, other.raw)
    # the mean of noisy gradients, not of their absolute values: bounded by the mean |gradient|
    assert np.all(np.asarray(one.raw) >= 0)
