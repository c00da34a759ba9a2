"""Input attributions: integrated gradients and SmoothGrad, pure, jitted and batched.

Both average each image's input gradient of its target logit (`jax.grad` of the summed
selected logits; images are independent in eval mode) over a stack of perturbed copies
of the batch, in one jitted `lax.scan` (`mean_input_gradient`, shared by both methods: the
same stack length compiles once), and return a `CamResult` at the input resolution:

- integrated gradients (Sundararajan et al. 2017): attr = (x - x0) * mean_k dS/dx at
  x0 + a_k (x - x0), a_k = (k + 1/2) / steps (midpoint Riemann sum), x0 = 0 unless a
  baseline is given. `raw` is the attribution summed over input channels (signed; it sums
  to S(x) - S(x0) up to the quadrature error), `maps` is |raw| min-max scaled per image.
- SmoothGrad (Smilkov et al. 2017): the mean of dS/dx over `samples` noisy copies
  x + N(0, (noise * (max x - min x))^2) per image; `raw` is the absolute mean gradient
  summed over input channels, `maps` is raw min-max scaled.

Memory stays that of one forward/backward pass of the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.explain.capture import eval_model, logits_and_targets, select_logits
from xmedjax.explain.gradcam import CamResult
from xmedjax.explain.maps import normalize_per_image


def input_gradients(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, targets: jax.Array
) -> jax.Array:
    """d logit[b, targets[b]] / d images[b] for every image, NHWC float32."""

    def score(x):
        return select_logits(eval_model(graphdef, state)(x).astype(jnp.float32), targets).sum()

    return jax.grad(score)(images)


@functools.partial(jax.jit, static_argnums=0)
def mean_input_gradient(
    graphdef: nnx.GraphDef, state: nnx.State, stack: jax.Array, targets: jax.Array
) -> jax.Array:
    """Mean over k of input_gradients(stack[k]): (S, B, H, W, C) -> (B, H, W, C), one scan."""

    def step(total, images):
        return total + input_gradients(graphdef, state, images, targets), None

    total, _ = jax.lax.scan(step, jnp.zeros(stack.shape[1:], jnp.float32), stack)
    return total / stack.shape[0]


def _attribution(graphdef, state, images, targets, stack, maps_of) -> CamResult:
    """What both methods share: the logits and the classes explained, the mean input gradient
    over `stack` (S, B, H, W, C), and `maps_of(mean gradient) -> (raw, maps)`."""
    logits, chosen = logits_and_targets(graphdef, state, images, targets)
    raw, maps = maps_of(mean_input_gradient(graphdef, state, stack, chosen))
    return CamResult(raw, maps, logits, chosen)


@functools.partial(jax.jit, static_argnames=("steps",))
def _ig_path(images: jax.Array, baseline: jax.Array, steps: int) -> jax.Array:
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    return baseline[None] + alphas[:, None, None, None, None] * (images - baseline)[None]


@jax.jit
def _ig_maps(
    images: jax.Array, baseline: jax.Array, mean_grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    raw = jnp.sum((images - baseline) * mean_grad, axis=-1)
    return raw, normalize_per_image(jnp.abs(raw))


def integrated_gradients_fn(
    graphdef, state, images, targets, *, steps: int = 32, baseline: jax.Array | None = None
) -> CamResult:
    """Integrated gradients from `baseline` (zeros by default) with a `steps`-point midpoint rule."""
    images = jnp.asarray(images, jnp.float32)
    x0 = (
        jnp.zeros_like(images)
        if baseline is None
        else jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), images.shape)
    )
    path = _ig_path(images, x0, steps)
    return _attribution(
        graphdef, state, images, targets, path, functools.partial(_ig_maps, images, x0)
    )


@functools.partial(jax.jit, static_argnames=("samples",))
def _noisy_copies(images: jax.Array, noise: jax.Array, seed: jax.Array, samples: int) -> jax.Array:
    span = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(
        images, axis=(1, 2, 3), keepdims=True
    )
    eps = jax.random.normal(jax.random.PRNGKey(seed), (samples, *images.shape), images.dtype)
    return images[None] + noise * span[None] * eps


@jax.jit
def _sg_maps(mean_grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    raw = jnp.sum(jnp.abs(mean_grad), axis=-1)
    return raw, normalize_per_image(raw)


def smoothgrad_fn(
    graphdef, state, images, targets, *, samples: int = 16, noise: float = 0.15, seed: int = 0
) -> CamResult:
    """SmoothGrad: absolute mean input gradient over `samples` Gaussian-noised copies."""
    images = jnp.asarray(images, jnp.float32)
    stack = _noisy_copies(images, jnp.float32(noise), jnp.uint32(seed), samples)
    return _attribution(graphdef, state, images, targets, stack, _sg_maps)


__all__ = ["input_gradients", "integrated_gradients_fn", "mean_input_gradient", "smoothgrad_fn"]
