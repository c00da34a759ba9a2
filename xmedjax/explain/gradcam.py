"""Grad-CAM (Selvaraju et al. 2017) as a pure, jitted, batched function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax import compile_options
from xmedjax.explain.capture import capture_target_gradients
from xmedjax.explain.maps import to_input_size


class CamResult(NamedTuple):
    """A batch of class activation maps."""

    raw: jax.Array  # (B, h, w) on the target activation's grid, before resizing
    maps: jax.Array  # (B, H, W) upsampled to the input size, scaled to [0, 1] per image
    logits: jax.Array  # (B, K) float32
    targets: jax.Array  # (B,) the class explained for each image


class SaliencyMethod(Protocol):
    """The one signature of every saliency method (`cams.METHODS`; the methods leave its
    four shared arguments unannotated): graphdef static under jit, float32 NHWC images,
    targets (B,) int or None (each image's predicted class), keyword-only options."""

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        images: jax.Array,
        targets: jax.Array | None,
        **opts: Any,
    ) -> CamResult: ...


def gradcam_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """relu(sum_c mean_hw(dS/dA)[c] * A[c]) for NHWC activation and gradient."""
    weights = jnp.mean(gradient, axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * activation, axis=-1))


Rule = Callable[[jax.Array, jax.Array], jax.Array]  # (activation, gradient) -> raw (B, h, w)


def gradient_cams(
    rules: dict[str, Rule], graphdef, state, images, targets, layer=None
) -> dict[str, CamResult]:
    """The CamResult of each rule, all from ONE forward/backward pass (`capture`)."""
    capture, chosen = capture_target_gradients(graphdef, state, images, targets, layer)
    out = {}
    for name, rule in rules.items():
        raw = rule(capture.activation, capture.gradient)
        out[name] = CamResult(raw, to_input_size(raw, images.shape[1:3]), capture.logits, chosen)
    return out


def gradient_cam(rule: Rule) -> SaliencyMethod:
    """A rule as a jitted registry method with a `layer` option (`grad_cam_fn` is one)."""

    @compile_options.forward_jit(static_argnums=0, static_argnames=("layer",))
    def cam_fn(graphdef, state, images, targets, *, layer: str | None = None) -> CamResult:
        return gradient_cams({"cam": rule}, graphdef, state, images, targets, layer)["cam"]

    cam_fn.__name__ = rule.__name__.replace("_raw", "_fn")
    cam_fn.__doc__ = (
        f"Jitted batched CAM, compiled once per graphdef and input shape: {rule.__doc__} "
        "`layer` optionally targets an earlier feature map (see `xmedjax.explain.capture`)."
    )
    return cam_fn


# Pure Grad-CAM: grad_cam_fn(graphdef, state, images, targets, *, layer=None) -> CamResult.
grad_cam_fn = gradient_cam(gradcam_raw)


def grad_cam(model: nnx.Module, images, targets=None) -> CamResult:
    """Grad-CAM of `model` on float32 NHWC `images`, one target class per image.

    `targets` is a (B,) int array, or None to explain each image's predicted class. The
    model runs in eval mode whatever its current mode and is left unchanged.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    if targets is not None:
        targets = jnp.asarray(targets, jnp.int32).reshape(images.shape[0])
    return _grad_cam_of_module(model, images, targets)


@compile_options.forward_jit
def _grad_cam_of_module(model: nnx.Module, images, targets) -> CamResult:
    """`grad_cam_fn` with the module passed as a pytree (flax 0.12 modules are): `nnx.split`
    runs once, at trace time. Splitting on every call cost 16 ms (ResNet50) to 23 ms
    (DenseNet121), a tenth of a batch-8 call on 2 cores (benchmarks/NOTES.md, "Phase 3")."""
    graphdef, state = nnx.split(model)
    return grad_cam_fn(graphdef, state, images, targets)
