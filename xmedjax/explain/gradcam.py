"""Grad-CAM (Selvaraju et al. 2017) as a pure, jitted, batched function."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.explain.capture import capture_target_gradients
from xmedjax.explain.maps import to_input_size


class CamResult(NamedTuple):
    """A batch of class activation maps."""

    raw: jax.Array  # (B, h, w) on the target activation's grid, before resizing
    maps: jax.Array  # (B, H, W) upsampled to the input size, scaled to [0, 1] per image
    logits: jax.Array  # (B, K) float32
    targets: jax.Array  # (B,) the class explained for each image


def gradcam_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """relu(sum_c mean_hw(dS/dA)[c] * A[c]) for NHWC activation and gradient."""
    weights = jnp.mean(gradient, axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * activation, axis=-1))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("layer",))
def grad_cam_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array | None,
    *,
    layer: str | None = None,
) -> CamResult:
    """Pure Grad-CAM of (graphdef, state): compiled once per graphdef and input shape.

    `layer` optionally targets an earlier feature map (see `xmedjax.explain.capture`).
    """
    capture, chosen = capture_target_gradients(graphdef, state, images, targets, layer)
    raw = gradcam_raw(capture.activation, capture.gradient)
    return CamResult(raw, to_input_size(raw, images.shape[1:3]), capture.logits, chosen)


def grad_cam(model: nnx.Module, images, targets=None) -> CamResult:
    """Grad-CAM of `model` on float32 NHWC `images`, one target class per image.

    `targets` is a (B,) int array, or None to explain each image's predicted class. The
    model runs in eval mode whatever its current mode and is left unchanged.
    """
    graphdef, state = nnx.split(model)
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    if targets is not None:
        targets = jnp.asarray(targets, jnp.int32).reshape(images.shape[0])
    return grad_cam_fn(graphdef, state, images, targets)
