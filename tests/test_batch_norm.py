"""batch_norm.BatchNorm (issue 14): nnx.BatchNorm's variables and forward bit for bit, the
running averages updated the same, and the hand-written backward equal to autodiff's up to
float rounding; the cases it does not take are nnx.BatchNorm's own code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmedjax.models import batch_norm


def _pair(cls, dtype=jnp.float32):
    m = cls(6, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=nnx.Rngs(0))
    m.scale[...] = jnp.linspace(0.5, 2.0, 6)
    m.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    return m


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 5, 6)) * 3 + 1, jnp.float32)


def _loss(m, x):
    return jnp.sum(jnp.sin(m(x)) * jnp.arange(1, 7))


def test_training_forward_running_averages_and_gradients():
    out = {}
    for cls in (nnx.BatchNorm, batch_norm.BatchNorm):
        m = _pair(cls)
        m.train()
        y = m(X)
        fresh = _pair(cls)
        fresh.train()
        g_model, g_x = nnx.jit(nnx.grad(_loss, argnums=(0, 1)))(fresh, X)
        out[cls] = (y, m.mean[...], m.var[...], g_x, g_model.scale[...], g_model.bias[...])
    ref, ours = out[nnx.BatchNorm], out[batch_norm.BatchNorm]
    for a, b in zip(ours[:3], ref[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # forward, running stats
    for a, b in zip(ours[3:], ref[3:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ours[3]).max()) > 0.1  # a gradient that could have been wrong


@pytest.mark.parametrize("case", ["eval", "bfloat16"])
def test_other_cases_are_nnx_batch_norm(case, monkeypatch):
    calls = []
    monkeypatch.setattr(batch_norm, "batch_norm_train", lambda *a: calls.append(a))
    m = _pair(batch_norm.BatchNorm, jnp.bfloat16 if case == "bfloat16" else jnp.float32)
    m.eval() if case == "eval" else m.train()
    ref = _pair(nnx.BatchNorm, m.dtype)
    ref.eval() if case == "eval" else ref.train()
    x = X.astype(m.dtype)
    np.testing.assert_array_equal(np.asarray(m(x), np.float32), np.asarray(ref(x), np.float32))
    assert not calls


def test_traced_update_equals_nnx_and_asks_no_tracer_for_its_sharding(monkeypatch):
    """Under jit the running averages still match nnx's, and setting them does not ask the
    traced value for its sharding: on a tracer that builds an error message by walking the
    whole jaxpr traced so far (4.5 of DenseNet121's 6.5 s train-step trace)."""
    from jax._src.interpreters import partial_eval

    tracer = partial_eval.DynamicJaxprTracer
    asked, origin = [], tracer._origin_msg
    monkeypatch.setattr(tracer, "_origin_msg", lambda self: asked.append(1) or origin(self))

    def step(graphdef, state, x):  # as train_state.train_step: merge inside a jax.jit
        m = nnx.merge(graphdef, state)
        m(x)
        return m.mean[...], m.var[...]

    out = {}
    for cls in (nnx.BatchNorm, batch_norm.BatchNorm):
        m = _pair(cls)
        m.train()
        graphdef, state = nnx.split(m)
        asked.clear()
        out[cls] = jax.jit(step, static_argnums=0)(graphdef, state, X)
        out[cls, "asked"] = len(asked)
    for a, b in zip(out[batch_norm.BatchNorm], out[nnx.BatchNorm]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert out[nnx.BatchNorm, "asked"] > 0  # the check can see the slow path ...
    assert out[batch_norm.BatchNorm, "asked"] == 0  # ... and ours does not take it
