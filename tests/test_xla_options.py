"""Forward programs' XLA options (xmedjax.xla_options) and the max-pool gradient's boundary."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmedjax import xla_options
from xmedjax.models import layers


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _entry(hlo: str) -> str:
    return hlo[hlo.index("\nENTRY") :]


@pytest.fixture
def fresh_options(monkeypatch):
    """forward_options decided again under this test's environment, and again after it."""
    xla_options.forward_options.cache_clear()
    yield monkeypatch
    xla_options.forward_options.cache_clear()


def test_cpu_forward_options_take_convolutions_out_of_ynnpack(fresh_options):
    fresh_options.delenv(xla_options.ENV, raising=False)
    fresh_options.delenv("XLA_FLAGS", raising=False)
    assert xla_options.forward_options() == xla_options.FORWARD_ON_CPU
    assert xla_options.STATUS == "cpu forward options"
    x, w = jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # big enough for YNNPACK
    default = _entry(jax.jit(_conv).lower(x, w).compile().as_text())
    forward = _entry(xla_options.forward_jit(_conv).lower(x, w).compile().as_text())
    # XLA's default hands the convolution to YNNPACK; the forward options leave it to XLA.
    assert not re.search(r"= \S+ convolution\(", default)
    assert re.search(r"= \S+ convolution\(", forward)


def test_forward_options_opt_out_and_user_flags(fresh_options):
    fresh_options.setenv(xla_options.ENV, "default")
    assert xla_options.forward_options() is None
    assert xla_options.STATUS.startswith("off (")
    xla_options.forward_options.cache_clear()
    fresh_options.delenv(xla_options.ENV)
    fresh_options.setenv("XLA_FLAGS", f"--{xla_options.YNN_FUSION_TYPE}=")
    assert xla_options.forward_options() is None
    assert xla_options.YNN_FUSION_TYPE in xla_options.STATUS


def test_refused_options_warn_and_fall_back(fresh_options):
    fresh_options.delenv(xla_options.ENV, raising=False)
    fresh_options.delenv("XLA_FLAGS", raising=False)
    fresh_options.setattr(
        xla_options, "FORWARD_ON_CPU", {xla_options.YNN_FUSION_TYPE: "NOT_A_FUSION_TYPE"}
    )
    with pytest.warns(UserWarning, match="refused"):
        assert xla_options.forward_options() is None


def test_forward_jit_matches_jit_at_top_level_and_nested():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)
    fwd = xla_options.forward_jit(_conv)
    want = jax.jit(_conv)(x, w)
    np.testing.assert_allclose(fwd(x, w), want, rtol=1e-5, atol=1e-5)
    # Inside another jit the options cannot apply (JAX refuses them on nested jits): the
    # call is a plain nested jit and still gives the same numbers.
    nested = jax.jit(lambda a, b: fwd(a, b) * 2)(x, w)
    np.testing.assert_allclose(nested, 2 * want, rtol=1e-5, atol=1e-5)
    assert fwd.__name__ == "_conv"


def test_max_pool_gradient_keeps_its_input_gradient_in_one_buffer():
    """XLA keeps the loop that materialises the pool's incoming gradient (without it XLA fuses
    the gradient's whole producer into each of the nine taps: 134 ms of DenseNet121's step)."""

    def loss(x, scales):
        pooled = layers.max_pool_3x3_s2(x)
        return sum(jnp.sum(jnp.tanh(pooled * s)) for s in scales)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 4)), jnp.float32)
    scales = jnp.arange(1.0, 8.0)
    grad = jax.jit(jax.grad(loss))
    hlo = _entry(grad.lower(x, scales).compile().as_text())
    assert " while(" in hlo
    g = grad(x, scales)
    want = jax.grad(lambda x_: loss_plain(x_, scales))(x)
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)


def loss_plain(x, scales):
    pooled = layers.max_pool_3x3_s2_plain(x)
    return sum(jnp.sum(jnp.tanh(pooled * s)) for s in scales)


def test_materialise_is_the_identity_with_nan_first():
    a = jnp.asarray([[np.nan, 1.0], [2.0, -0.0]], jnp.float32)
    out = jax.jit(layers._materialise)(a)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(a))
    b = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(jax.jit(layers._materialise)(b), b)
