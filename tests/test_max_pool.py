"""The stem's max pool (layers.max_pool_3x3_s2): torch's forward and torch's gradient rule
(each window's gradient to its first maximum in row-major order), ties included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmedjax.models import barrier, layers


def _torch_rule(x, g):
    """MaxPool2d(3, 2, 1)'s forward and backward, the slow way, in numpy."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    y, dx = np.full((n, ho, wo, c), -np.inf), np.zeros_like(x)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for k in range(c):
                    best = None
                    for di in range(3):
                        for dj in range(3):
                            r, s = 2 * i - 1 + di, 2 * j - 1 + dj
                            inside = 0 <= r < h and 0 <= s < w
                            if inside and (best is None or x[b, r, s, k] > y[b, i, j, k]):
                                y[b, i, j, k], best = x[b, r, s, k], (r, s)
                    dx[b, best[0], best[1], k] += g[b, i, j, k]
    return y, dx


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (1, 8, 10, 2), (1, 5, 5, 1)])
def test_forward_and_gradient_follow_torch_with_ties(shape):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(shape), 0).round(1).astype(np.float32)  # many ties
    y = layers.max_pool_3x3_s2(jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    y_ref, dx_ref = _torch_rule(x, g)
    _, vjp = jax.vjp(layers.max_pool_3x3_s2, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, atol=1e-6)
    assert (x == 0).mean() > 0.3  # the ties were there


def test_gradient_matches_jax_own_max_pool_under_jit():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 4)), jnp.float32)

    own = layers.max_pool_3x3_s2_plain
    a = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(own(x)))))(x)
    b = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layers.max_pool_3x3_s2(x)))))(x)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def _stacked_loss(pool, x, scales):
    pooled = pool(x)
    return sum(jnp.sum(jnp.tanh(pooled * s)) for s in scales)


def test_pool_backward_computes_its_incoming_gradient_once():
    """XLA keeps the loop that materialises the pool's incoming gradient: without it XLA fuses
    the gradient's whole producer into each of the nine taps (in DenseNet121 the BatchNorm
    backward of every dense layer reading the stem's channels: a 134 ms fusion per step)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 4)), jnp.float32)
    scales = jnp.arange(1.0, 8.0)
    grad = jax.jit(jax.grad(lambda x_: _stacked_loss(layers.max_pool_3x3_s2, x_, scales)))
    hlo = grad.lower(x).compile().as_text()
    assert " while(" in hlo[hlo.index("\nENTRY") :]
    want = jax.grad(lambda x_: _stacked_loss(layers.max_pool_3x3_s2_plain, x_, scales))(x)
    np.testing.assert_allclose(grad(x), want, rtol=1e-6, atol=1e-6)


def test_materialise_is_the_identity_even_with_a_leading_nan():
    for a in (
        jnp.asarray([[np.nan, 1.0], [2.0, -0.0]], jnp.float32),  # no loop trip: a itself
        jnp.arange(6.0).reshape(2, 3),
    ):
        out = jax.jit(barrier.materialise)(a)
        np.testing.assert_array_equal(out, a)


def test_materialised_is_the_identity_to_autodiff_in_both_modes():
    """`layers.materialised` (ResNet50's bottleneck outputs) keeps its loop through compilation
    and is the identity to reverse and forward mode (a JVP rule: the loop has no reverse)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 3)), jnp.float32)
    f = lambda a: jnp.sum(jnp.sin(layers.materialised(a * 2.0)) ** 2)  # noqa: E731
    plain = lambda a: jnp.sum(jnp.sin(a * 2.0) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
    assert " while(" in hlo[hlo.index("\nENTRY") :]
    np.testing.assert_array_equal(jax.jit(f)(x), jax.jit(plain)(x))
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)
    t = jnp.ones_like(x)
    np.testing.assert_allclose(jax.jvp(f, (x,), (t,))[1], jax.jvp(plain, (x,), (t,))[1], rtol=1e-5)


def test_resnet_bottleneck_outputs_are_computed_once():
    """Each ResNet50 bottleneck's output is a loop of its own in the compiled eval forward
    (`resnet.MATERIALISE_BLOCK_OUTPUT`), and the logits are those without the loops (to
    rounding: fusing differently may contract a multiply-add on some CPUs)."""
    from flax import nnx

    from xmedjax.models import create_model, resnet

    model = create_model("resnet50", 2, width=0.125)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    forward = jax.jit(lambda s: nnx.merge(graphdef, s)(x))
    hlo = forward.lower(state).compile().as_text()
    assert hlo[hlo.index("\nENTRY") :].count(" while(") == sum(model.stage_sizes) == 16
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resnet, "MATERIALISE_BLOCK_OUTPUT", False)
        want = jax.jit(lambda s: nnx.merge(graphdef, s)(x))(state)
    np.testing.assert_allclose(forward(state), want, rtol=1e-6, atol=1e-7)
