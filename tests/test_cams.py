"""The CAM family against its definitions on a tiny model whose gradients are known by hand.

TinyCam: A = relu(x * k) (a 1x1 convolution of a greyscale image, C channels, sown as the
CAM target), logits = mean_hw(A^2) @ W + b. So dS_t/dA[h, w, c] = 2 A[h, w, c] W[c, t] / (H W),
and every method's raw map follows from its formula with numpy alone.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmedjax import names
from xmedjax.explain import METHODS, compute_methods
from xmedjax.explain.cams import (
    CAM_METHODS,
    GRADIENT_RULES,
    align_corners_matrix,
    auto_cam_layer,
    scorecam_fn,
)
from xmedjax.explain.capture import capture_target_gradients, forward_with_activation
from xmedjax.explain.gradcam import grad_cam_fn
from xmedjax.models import DenseNet, ResNet, create_model, model_spec
from xmedjax.models.layers import mark_cam_target


class TinyCam(nnx.Module):
    def __init__(self, k: np.ndarray, w: np.ndarray, b: np.ndarray):
        self.k = nnx.Param(jnp.asarray(k, jnp.float32))
        self.w = nnx.Param(jnp.asarray(w, jnp.float32))
        self.b = nnx.Param(jnp.asarray(b, jnp.float32))

    def __call__(self, x):
        a = jax.nn.relu(x * self.k[...])
        a = mark_cam_target(self, a)
        return jnp.mean(a * a, axis=(1, 2)) @ self.w[...] + self.b[...]


def numpy_logits(x, k, w, b):
    a = np.maximum(x * k, 0)
    return np.mean(a * a, axis=(1, 2)) @ w + b


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    k = np.array([1.0, -0.5, 2.0], np.float32)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    b = np.array([0.1, -0.2], np.float32)
    x = rng.normal(size=(4, 5, 6, 1)).astype(np.float32)
    targets = np.array([0, 1, 1, 0], np.int32)
    graphdef, state = nnx.split(TinyCam(k, w, b))
    a = np.maximum(x * k, 0)
    g = 2 * a * w[:, targets].T[:, None, None, :] / (x.shape[1] * x.shape[2])
    return dict(k=k, w=w, b=b, x=x, targets=targets, graphdef=graphdef, state=state, a=a, g=g)


def expected_raw(name: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The methods' definitions, written out in numpy (pytorch-grad-cam 1.5.7's formulas)."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    if name == "gradcam":
        return relu(np.sum(g.mean(axis=(1, 2), keepdims=True) * a, axis=-1))
    if name == "hirescam":
        return relu(np.sum(g * a, axis=-1))
    if name == "layercam":
        return relu(np.sum(relu(g) * a, axis=-1))
    if name == "xgradcam":
        weights = np.sum(g * a, axis=(1, 2), keepdims=True) / (
            np.sum(a, axis=(1, 2), keepdims=True) + 1e-7
        )
        return relu(np.sum(weights * a, axis=-1))
    if name == "gradcampp":
        alpha = g**2 / (2 * g**2 + np.sum(a, axis=(1, 2), keepdims=True) * g**3 + 1e-6)
        alpha = np.where(g != 0, alpha, 0)
        weights = np.sum(relu(g) * alpha, axis=(1, 2), keepdims=True)
        return relu(np.sum(weights * a, axis=-1))
    raise KeyError(name)


def test_literal_two_by_two_example():
    # x = [[1, 2], [3, 0]], one channel, k = 1, W = 1: A = x and dS/dA = 2 A / 4 = A / 2.
    x = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)[None, :, :, None]
    graphdef, state = nnx.split(TinyCam(np.ones(1), np.ones((1, 1)), np.zeros(1)))
    targets = jnp.zeros(1, jnp.int32)
    gradcam = METHODS["gradcam"](graphdef, state, jnp.asarray(x), targets)
    # Grad-CAM weight = mean(A / 2) = 0.75, map = 0.75 * A
    np.testing.assert_allclose(gradcam.raw[0], [[0.75, 1.5], [2.25, 0.0]], rtol=1e-6)
    hires = METHODS["hirescam"](graphdef, state, jnp.asarray(x), targets)
    np.testing.assert_allclose(hires.raw[0], [[0.5, 2.0], [4.5, 0.0]], rtol=1e-6)  # A^2 / 2
    np.testing.assert_allclose(gradcam.logits[0, 0], (1 + 4 + 9) / 4, rtol=1e-6)


def test_capture_gradient_is_the_hand_gradient(tiny):
    capture, chosen = capture_target_gradients(
        tiny["graphdef"], tiny["state"], jnp.asarray(tiny["x"]), jnp.asarray(tiny["targets"])
    )
    np.testing.assert_allclose(capture.activation, tiny["a"], rtol=1e-6)
    np.testing.assert_allclose(capture.gradient, tiny["g"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        capture.logits, numpy_logits(tiny["x"], tiny["k"], tiny["w"], tiny["b"]), rtol=1e-5
    )
    np.testing.assert_array_equal(chosen, tiny["targets"])


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam"])
def test_gradient_cams_match_their_definitions(tiny, name):
    result = METHODS[name](
        tiny["graphdef"], tiny["state"], jnp.asarray(tiny["x"]), jnp.asarray(tiny["targets"])
    )
    want = expected_raw(name, tiny["a"], tiny["g"])
    np.testing.assert_allclose(result.raw, want, rtol=1e-4, atol=1e-6)
    assert result.maps.shape == tiny["x"].shape[:3]
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1 + 1e-6
    np.testing.assert_array_equal(result.targets, tiny["targets"])


def test_scorecam_matches_its_definition(tiny):
    x, k, w, b, a = tiny["x"], tiny["k"], tiny["w"], tiny["b"], tiny["a"]
    # A has the input's size, so the align-corners upsampling is the identity.
    masks = (a - a.min(axis=(1, 2), keepdims=True)) / (
        a.max(axis=(1, 2), keepdims=True) - a.min(axis=(1, 2), keepdims=True) + 1e-8
    )
    scores = np.stack(
        [
            numpy_logits(x * masks[..., c : c + 1], k, w, b)[np.arange(len(x)), tiny["targets"]]
            for c in range(a.shape[-1])
        ],
        axis=1,
    )
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    want = np.maximum(np.einsum("bhwc,bc->bhw", a, weights), 0)
    for chunk in (1, 2, 3):  # chunks that do and do not divide the 3 channels
        result = scorecam_fn(
            tiny["graphdef"],
            tiny["state"],
            jnp.asarray(x),
            jnp.asarray(tiny["targets"]),
            chunk=chunk,
        )
        np.testing.assert_allclose(result.raw, want, rtol=1e-4, atol=1e-6)


def test_align_corners_matrix_is_torch_bilinear_align_corners():
    m = np.asarray(align_corners_matrix(5, 3))
    # output positions 0, 0.5, 1, 1.5, 2 on the input grid
    np.testing.assert_allclose(m @ np.array([0.0, 1.0, 4.0]), [0.0, 0.5, 1.0, 2.5, 4.0])


def test_predicted_class_when_no_targets(tiny):
    result = METHODS["layercam"](tiny["graphdef"], tiny["state"], jnp.asarray(tiny["x"]), None)
    np.testing.assert_array_equal(
        result.targets, np.argmax(numpy_logits(tiny["x"], tiny["k"], tiny["w"], tiny["b"]), axis=1)
    )


@pytest.fixture(scope="module")
def small_resnet():
    model = create_model("resnet50", 2, in_channels=1, width=0.0625)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 1)), jnp.float32)
    return graphdef, state, x


def test_compute_methods_equals_each_registry_method_and_never_recompiles(small_resnet, caplog):
    graphdef, state, x = small_resnet
    targets = jnp.array([0, 1], jnp.int32)
    opts = {
        "scorecam": {"chunk": 16},
        "integrated_gradients": {"steps": 4},
        "smoothgrad": {"samples": 4},
    }
    together = compute_methods(graphdef, state, x, targets, tuple(METHODS), opts)
    for name, fn in METHODS.items():
        alone = fn(graphdef, state, x, targets, **opts.get(name, {}))
        np.testing.assert_allclose(
            together[name].maps, alone.maps, rtol=1e-4, atol=1e-5, err_msg=name
        )
        assert together[name].maps.shape == (2, 32, 32)
    # a second state with the same structure (new values) must reuse every compiled function
    other_state = jax.tree.map(lambda v: v * 1.01, state)
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        for name, fn in METHODS.items():
            jax.block_until_ready(fn(graphdef, other_state, x, targets, **opts.get(name, {})).maps)
        compute_methods(graphdef, other_state, x, targets, tuple(METHODS), opts)
    compiles = [
        r.getMessage()
        for r in caplog.records
        if "Compiling" in r.getMessage() or "compil" in r.getMessage().lower()
    ]
    assert not compiles, compiles


def test_layer_option_targets_an_earlier_feature_map(small_resnet):
    graphdef, state, x = small_resnet
    targets = jnp.array([0, 1], jnp.int32)
    # tapping layer4's last block is the model's own target
    own = grad_cam_fn(graphdef, state, x, targets)
    tapped = grad_cam_fn(graphdef, state, x, targets, layer="layer4")
    np.testing.assert_allclose(tapped.raw, own.raw, rtol=1e-5, atol=1e-6)
    finer = compute_methods(
        graphdef, state, x, targets, CAM_METHODS, {"scorecam": {"chunk": 32}}, layer="layer2"
    )
    for name in CAM_METHODS:
        assert finer[name].raw.shape == (2, 4, 4), name  # 32 px / 8
    with pytest.raises(ValueError):
        grad_cam_fn(graphdef, state, x, targets, layer="layer9")


def test_registry_keys_are_the_names_registry():
    assert tuple(METHODS) == names.SALIENCY_METHODS
    assert tuple(GRADIENT_RULES) == names.GRADIENT_CAMS
    assert CAM_METHODS == names.CAM_METHODS
    assert set(CAM_METHODS) | set(names.ATTRIBUTIONS) | {names.RANDOM} == set(METHODS)


# The same classes at one block per stage and a few channels: real forwards cost nothing.
TINY_MODELS = {
    "resnet50": lambda: ResNet(
        (1, 1, 1, 1), num_classes=2, in_channels=1, base_width=2, rngs=nnx.Rngs(0)
    ),
    "densenet121": lambda: DenseNet(
        (1, 1, 1, 1), growth_rate=2, init_features=4, num_classes=2, in_channels=1, rngs=nnx.Rngs(0)
    ),
}


@pytest.mark.parametrize(
    "arch, at_64px", [("resnet50", "layer2"), ("densenet121", "features.denseblock2")]
)
def test_model_spec_names_the_models_own_layers(arch, at_64px):
    model = nnx.eval_shape(lambda: create_model(arch, 2, in_channels=1, width=0.0625))
    graphdef, state = nnx.split(model)  # shapes only
    spec = model_spec(graphdef, state)
    assert spec == model_spec(model)
    # earlier CAM layers, deepest first: at 64 px the own grid and the first are too coarse
    assert spec.cam_layers[1] == at_64px
    assert auto_cam_layer(graphdef, state, (64, 64, 1)) == at_64px
    flat = dict(nnx.to_flat_state(state))
    assert {(spec.head, "kernel"), (spec.head, "bias")} <= set(flat)
    assert spec.randomization_order[0] == spec.head
    # the declared CAM target is what the model sows (after DenseNet's final ReLU)
    tiny = TINY_MODELS[arch]()
    tiny.eval()
    assert model_spec(tiny) == spec
    tgraphdef, tstate = nnx.split(tiny)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 32, 32, 1)), jnp.float32)
    _, own = forward_with_activation(tgraphdef, tstate, x)
    _, tapped = forward_with_activation(tgraphdef, tstate, x, spec.cam_target)
    np.testing.assert_allclose(jax.nn.relu(tapped), own, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(own)) > 0


def test_a_model_without_a_spec_keeps_its_own_target(tiny):
    assert model_spec(tiny["graphdef"], tiny["state"], default=None) is None
    with pytest.raises(ValueError, match="declares no ModelSpec"):
        model_spec(tiny["graphdef"], tiny["state"])
    assert auto_cam_layer(tiny["graphdef"], tiny["state"], (5, 6, 1)) is None
