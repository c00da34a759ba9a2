"""batch_norm.BatchNorm (issue 14): nnx.BatchNorm's variables and forward bit for bit, the
running averages updated the same, and the hand-written backward equal to autodiff's up to
float rounding; the cases it does not take are nnx.BatchNorm's own code."""

from __future__ import annotations

import re

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


def test_given_statistics_are_the_computed_ones_bit_for_bit():
    """`stats=batch_stats(x)` (what DenseNet121's blocks pass) gives the very output, running
    averages and gradients of letting BatchNorm compute them, and no gradient flows into
    the given statistics (the backward already differentiates through them)."""

    def run(given):
        m = _pair(batch_norm.BatchNorm)
        m.train()

        def loss(m, x):
            stats = batch_norm.batch_stats(x) if given else None
            return jnp.sum(jnp.sin(m(x, stats=stats)) * jnp.arange(1, 7))

        g_model, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(m, X)
        y = nnx.jit(lambda m, x: m(x, stats=batch_norm.batch_stats(x) if given else None))(m, X)
        return y, m.mean[...], m.var[...], g_x, g_model.scale[...], g_model.bias[...]

    for a, b in zip(run(True), run(False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mean, var = batch_norm.batch_stats(X)
    d_mean, d_var = jax.grad(
        lambda mu, v: jnp.sum(batch_norm.batch_norm_given(X, mu, v, mu * 0 + 1, mu * 0, 1e-5) ** 3),
        argnums=(0, 1),
    )(mean, var)
    assert not np.any(np.asarray(d_mean)) and not np.any(np.asarray(d_var))


def _train_outputs(scale_after_sum: bool, monkeypatch):
    """batch_norm_train's outputs, its gradients by x, scale and bias, and how many buffers
    of x's size the compiled gradient writes."""
    monkeypatch.setattr(batch_norm, "SCALE_AFTER_SUM", scale_after_sum)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 16, 16, 64)) * 3 + 1, jnp.float32)
    scale, bias = jnp.linspace(0.5, 2.0, 64), jnp.linspace(-1.0, 1.0, 64)

    def loss(x, s, b):
        y = batch_norm.batch_norm_train(x, s, b, 1e-5)[0]
        return jnp.sum(jnp.maximum(y, 0.0) * jnp.cos(x))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grad.lower(x, scale, bias).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :].splitlines()
    sized = sum(1 for line in entry if re.search(r"= f32\[(8,16,16,64|2048,64)\]", line))
    outputs = jax.jit(lambda x: batch_norm.batch_norm_train(x, scale, bias, 1e-5))(x)
    return (*outputs, *grad(x, scale, bias)), sized


def test_scale_gradient_from_the_centred_input_writes_no_x_hat(monkeypatch):
    """d_scale as rstd * sum(g * (x - mean)) (`SCALE_AFTER_SUM`) gives sum(g * x_hat)'s
    outputs and gradients (to rounding), with one buffer of x's size fewer: the reduction
    reads the x - mean the forward's variance computed, instead of a new x_hat."""
    ours, ours_sized = _train_outputs(True, monkeypatch)
    ref, ref_sized = _train_outputs(False, monkeypatch)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ours[3]).max()) > 0.1
    assert ours_sized < ref_sized, (ours_sized, ref_sized)


def test_centred_input_is_the_given_statistics_path_bit_for_bit():
    """`BatchNorm(x - mean, stats=..., centred=True)` (DenseNet121's blocks) gives the very
    output, running averages and gradient of x of `BatchNorm(x, stats=...)`; without
    statistics, or outside float32 training, a centred input is refused.
    `centred_batch_stats` gives `batch_stats`' very statistics."""
    stats = batch_norm.batch_stats(X)
    mean, var, _ = batch_norm.centred_batch_stats(X)
    np.testing.assert_array_equal(mean, stats[0])
    np.testing.assert_array_equal(var, stats[1])

    def forward(m, x, centred):
        if not centred:
            return m(x, stats=batch_norm.batch_stats(x))
        mean, var, x_centred = batch_norm.centred_batch_stats(x)
        return m(x_centred, stats=(mean, var), centred=True)

    def run(centred):
        m = _pair(batch_norm.BatchNorm)
        m.train()

        def loss(m, x):
            return jnp.sum(jnp.sin(forward(m, x, centred)) * jnp.arange(1, 7))

        g_model, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(m, X)
        y = nnx.jit(lambda m, x: forward(m, x, centred))(m, X)
        return y, m.mean[...], m.var[...], g_x, g_model.scale[...], g_model.bias[...]

    for a, b in zip(run(True), run(False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m = _pair(batch_norm.BatchNorm)
    m.train()
    with pytest.raises(ValueError, match="centred input needs `stats`"):
        m(X, centred=True)
    m.eval()
    with pytest.raises(ValueError, match="centred input needs `stats`"):
        m(X, stats=stats, centred=True)


X_DENSE = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)


def _densenet_train_grads(chunk_stats: bool, monkeypatch):
    """(logits, parameter gradients, running averages) of a short DenseNet in training."""
    from xmedjax.models import DenseNet, densenet

    monkeypatch.setattr(densenet, "CHUNK_STATS", chunk_stats)
    model = DenseNet((2, 3, 2), growth_rate=4, init_features=8, num_classes=2, rngs=nnx.Rngs(0))
    model.train()
    loss = lambda m: jnp.sum(jnp.sin(m(X_DENSE)))  # noqa: E731
    grads = nnx.jit(nnx.grad(loss))(model)
    logits = nnx.jit(lambda m: m(X_DENSE))(model)  # updates the running averages
    _, stats, _ = nnx.split(model, nnx.BatchStat, ...)
    return logits, grads, stats


def _densenet121_elements_summed(chunk_stats: bool, monkeypatch) -> int:
    """Elements DenseNet121's (width 1/8) training forward sums, from its jaxpr."""
    from xmedjax.models import create_model, densenet

    monkeypatch.setattr(densenet, "CHUNK_STATS", chunk_stats)
    model = create_model("densenet121", 2, width=0.125)
    model.train()
    graphdef, state = nnx.split(model)
    forward = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(X_DENSE))(state)
    return _elements_summed(forward.jaxpr)


def _elements_summed(jaxpr, primitive: str = "reduce_sum") -> int:
    """How many input elements the `primitive` ops of `jaxpr` read (nested jaxprs included)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            total += int(np.prod(eqn.invars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _elements_summed(inner, primitive)
    return total


def test_densenet_blocks_take_each_chunks_statistics_once(monkeypatch):
    """DenseNet121's dense layers normalise their concatenated input with statistics
    computed once per chunk (`densenet.CHUNK_STATS`): its training forward sums 40% fewer
    elements (traced only), and on a short DenseNet (the same blocks, transitions and
    norm5, 2-3 layers per block: compiled in seconds, not DenseNet121's minute) the logits,
    parameter gradients and running averages equal the per-layer statistics' up to float
    rounding (a wrong chunk's statistics would move them by O(1))."""
    assert _densenet121_elements_summed(True, monkeypatch) < 0.6 * _densenet121_elements_summed(
        False, monkeypatch
    )
    ours = _densenet_train_grads(True, monkeypatch)
    ref = _densenet_train_grads(False, monkeypatch)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    grads, grads_ref = jax.tree.leaves(ours[1]), jax.tree.leaves(ref[1])
    scale = max(float(jnp.max(jnp.abs(g))) for g in grads_ref)
    assert len(grads) == len(grads_ref) > 50
    for a, b in zip(grads, grads_ref):  # a narrow float32 net over a batch of 4 amplifies
        assert float(jnp.max(jnp.abs(a - b))) < 1e-3 * scale  # rounding to ~2e-4 here
    stats, stats_ref = jax.tree.leaves(ours[2]), jax.tree.leaves(ref[2])
    assert len(stats) == len(stats_ref) > 20
    for a, b in zip(stats, stats_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_densenet_evaluation_traces_no_batch_statistics():
    """In eval mode (running averages) DenseNet121's blocks compute no per-chunk batch
    statistics: the forward then sums only in its pooling, never over a feature map's
    N*H*W values per channel (the training forward does, once per chunk)."""
    from xmedjax.models import create_model

    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    model = create_model("densenet121", 2, width=0.125)
    graphdef, state = nnx.split(model)
    train_sums = _elements_summed(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state).jaxpr)
    model.eval()
    graphdef, state = nnx.split(model)
    eval_sums = _elements_summed(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state).jaxpr)
    # What is left in evaluation: the global average pool over norm5's map (and no more).
    final = model.num_features * 2 * 1 * 1
    assert eval_sums <= final, (eval_sums, final)
    assert train_sums > 10 * final, train_sums


def test_dense_layers_normalise_the_joined_centred_chunks(monkeypatch):
    """With `densenet.CENTRED_CHUNKS` each dense layer's norm1 reads the concatenation of
    its chunks' x - mean (each chunk's computed once, for its variance) instead of
    subtracting the joined mean from the joined chunks again: DenseNet121's (width 1/8)
    training forward subtracts over a third fewer elements, and the short
    DenseNet's logits, gradients and running averages are unchanged (to rounding)."""
    from xmedjax.models import DenseNet, create_model, densenet

    def subtracted(centred):
        monkeypatch.setattr(densenet, "CENTRED_CHUNKS", centred)
        model = create_model("densenet121", 2, width=0.125)
        graphdef, state = nnx.split(model)
        forward = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(X_DENSE))(state)
        return _elements_summed(forward.jaxpr, "sub")

    # Left: each chunk's x - mean (`centred_batch_stats`: one value for its variance and
    # its layers) and the other BatchNorms'; gone: one per layer over all the chunks before
    # it (0.62 of the elements are left at width 1/8).
    assert subtracted(True) < 0.7 * subtracted(False)
    out = {}
    for centred in (True, False):
        monkeypatch.setattr(densenet, "CENTRED_CHUNKS", centred)
        model = DenseNet((2, 3, 2), growth_rate=4, init_features=8, num_classes=2, rngs=nnx.Rngs(0))
        model.train()
        grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(X_DENSE)))))(model)
        logits = nnx.jit(lambda m: m(X_DENSE))(model)
        out[centred] = [
            logits,
            *jax.tree.leaves(grads),
            *jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
        ]
    assert len(out[True]) == len(out[False]) > 70
    for a, b in zip(out[True], out[False]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _short_densenet_grads(materialise: bool, monkeypatch):
    """(parameter gradients, the compiled gradient program's HLO) of a short DenseNet."""
    from xmedjax.models import DenseNet, densenet

    monkeypatch.setattr(densenet, "MATERIALISE_INPUT_GRAD", materialise)
    model = DenseNet((2, 3, 2), growth_rate=4, init_features=8, num_classes=2, rngs=nnx.Rngs(0))
    model.train()
    graphdef, state = nnx.split(model)

    def loss(s):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, s)(X_DENSE)))

    grad = jax.jit(jax.grad(loss))
    return grad(state), grad.lower(state).compile().as_text()


def test_dense_layers_input_gradient_is_computed_once(monkeypatch):
    """Each dense layer's input gradient (its norm1's backward over the whole concatenation)
    is made once, into its own buffer (`densenet.MATERIALISE_INPUT_GRAD`: one single-trip
    loop per dense layer that XLA cannot fuse through), instead of XLA fusing it into the
    slice of every chunk it feeds; the gradients are the same numbers."""
    ours, hlo = _short_densenet_grads(True, monkeypatch)
    ref, hlo_ref = _short_densenet_grads(False, monkeypatch)
    layers = 2 + 3 + 2
    assert hlo.count(" while(") >= hlo_ref.count(" while(") + layers, (
        hlo.count(" while("),
        hlo_ref.count(" while("),
    )
    grads, grads_ref = jax.tree.leaves(ours), jax.tree.leaves(ref)
    assert len(grads) == len(grads_ref) > 50
    scale = max(float(jnp.max(jnp.abs(g))) for g in grads_ref)
    for a, b in zip(grads, grads_ref):  # the same sums, perhaps added in another order
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale
