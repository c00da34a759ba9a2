"""The public jitted Grad-CAM: shapes, batching of targets, caching, degenerate inputs."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmedjax.explain import grad_cam
from xmedjax.explain.cams import GRADIENT_RULES, cam_layer_caveat
from xmedjax.explain.capture import capture_target_gradients
from xmedjax.explain.gradcam import gradcam_raw
from xmedjax.explain.maps import normalize_per_image
from xmedjax.models import create_model, model_spec


@pytest.fixture(scope="module", params=["resnet50", "densenet121"])
def model(request):
    m = create_model(request.param, 3, width=0.125, seed=1)
    m.eval()
    return m


def test_shapes_targets_and_range(model):
    x = np.random.default_rng(0).normal(size=(3, 48, 40, 3)).astype(np.float32)
    res = grad_cam(model, x, [0, 2, 1])
    assert res.raw.shape[0] == 3 and res.raw.ndim == 3
    assert res.maps.shape == (3, 48, 40)
    np.testing.assert_array_equal(np.asarray(res.targets), [0, 2, 1])
    maps = np.asarray(res.maps)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert np.all(np.asarray(res.raw) >= 0)


def test_each_image_explains_its_own_target(model):
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    both = grad_cam(model, x, [1, 2])
    first = grad_cam(model, x[:1], [1])
    second = grad_cam(model, x[1:], [2])
    np.testing.assert_allclose(
        np.asarray(both.raw[0]), np.asarray(first.raw[0]), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(both.raw[1]), np.asarray(second.raw[0]), rtol=1e-4, atol=1e-6
    )


def test_default_target_is_the_prediction(model):
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    res = grad_cam(model, x)
    np.testing.assert_array_equal(np.asarray(res.targets), np.argmax(np.asarray(res.logits), -1))


def _compiles(caplog, call) -> list[str]:
    """The XLA compilations `call()` triggers, as `jax.log_compiles` reports them."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        call()
    return [r.getMessage() for r in caplog.records if "compil" in r.getMessage().lower()]


def test_no_recompile_on_second_call_with_same_shapes(model, caplog):
    x = np.random.default_rng(3).normal(size=(2, 36, 36, 3)).astype(np.float32)
    grad_cam(model, x, [0, 1])
    assert not _compiles(caplog, lambda: grad_cam(model, x + 1, [1, 0]))
    other = np.zeros((2, 44, 44, 3), np.float32)
    assert _compiles(caplog, lambda: grad_cam(model, other, [1, 0]))  # a new shape compiles


def test_constant_image_gives_no_nan(model):
    res = grad_cam(model, np.full((2, 32, 32, 3), 0.5, np.float32), [0, 1])
    assert np.isfinite(np.asarray(res.maps)).all()
    assert np.isfinite(np.asarray(res.raw)).all()


def test_model_mode_is_left_unchanged():
    m = create_model("resnet50", 2, width=0.125)
    before = np.asarray(m.bn1.mean[...]).copy()
    grad_cam(m, np.ones((2, 32, 32, 3), np.float32), [0, 1])
    assert m.bn1.use_running_average is False  # still in train mode
    np.testing.assert_array_equal(np.asarray(m.bn1.mean[...]), before)


def test_gradcam_definition_by_hand():
    activation = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(1, 2, 2, 3) - 5.0
    gradient = jnp.array([1.0, -1.0, 0.5]).reshape(1, 1, 1, 3) * jnp.ones((1, 2, 2, 3))
    want = np.maximum(np.einsum("bhwc,c->bhw", np.asarray(activation), [1.0, -1.0, 0.5]), 0)
    np.testing.assert_allclose(np.asarray(gradcam_raw(activation, gradient)), want)


def test_zero_map_stays_zero():
    out = normalize_per_image(jnp.zeros((2, 5, 5)))
    assert not np.isnan(np.asarray(out)).any() and float(out.max()) == 0.0


def test_gradcam_is_hirescam_at_the_model_target_only():
    """Why Grad-CAM needs the model's own target: after global average pooling and a linear
    head the gradient is the same at every position, so averaging it loses nothing and
    Grad-CAM equals HiResCAM; at an earlier layer the gradient varies (and changes sign)
    across positions, Grad-CAM drops that, and `cam_layer_caveat` says so."""
    model = create_model("resnet50", 3, width=0.125, seed=1)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
    targets = jnp.array([0, 2])
    layer = model_spec(graphdef, state).cam_layers[0]  # layer3, 4x4 at 64 px (own: 2x2)
    for where, same in ((None, True), (layer, False)):
        cap, _ = capture_target_gradients(graphdef, state, x, targets, where)
        g = np.asarray(cap.gradient)
        spread = np.abs(g - g.mean((1, 2), keepdims=True)).max() / np.abs(g).max()
        gradcam = GRADIENT_RULES["gradcam"](cap.activation, cap.gradient)
        hirescam = GRADIENT_RULES["hirescam"](cap.activation, cap.gradient)
        scale = float(jnp.abs(hirescam).max()) + 1e-12
        if same:
            assert spread < 1e-5, spread
            np.testing.assert_allclose(gradcam / scale, hirescam / scale, atol=1e-5)
        else:
            assert spread > 0.1, spread
            assert float(jnp.abs(gradcam - hirescam).max()) / scale > 0.01
    assert cam_layer_caveat(("gradcam", "hirescam"), None) is None
    assert cam_layer_caveat(("hirescam", "layercam", "scorecam"), "layer2") is None
    caveat = cam_layer_caveat(("gradcam", "hirescam", "xgradcam"), "layer2")
    assert caveat.startswith("gradcam, xgradcam at layer2") and "hirescam" in caveat
