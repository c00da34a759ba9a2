"""Input attributions: integrated gradients and SmoothGrad, pure, jitted and batched.

Both differentiate each image's target logit with respect to the input pixels
(`jax.grad` of the summed selected logits; images are independent in eval mode) and
return a `CamResult` whose maps live at the input resolution:

- integrated gradients (Sundararajan et al. 2017): attr = (x - x0) * mean_k dS/dx at
  x0 + a_k (x - x0), a_k = (k + 1/2) / steps (midpoint Riemann sum), x0 = 0 (black) unless
  a baseline is given. `raw` is the attribution summed over input channels (signed; it
  sums to S(x) - S(x0) up to the quadrature error), `maps` is |raw| min-max scaled.
- SmoothGrad (Smilkov et al. 2017): mean of dS/dx over `samples` noisy copies,
  x + N(0, (noise * (max x - min x))^2) per image; `raw` is the absolute mean gradient
  summed over input channels, `maps` is raw min-max scaled.

The step and sample loops are `lax.scan`s over full batches, so memory stays that of one
forward/backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.explain.capture import eval_model, select_logits
from xmedjax.explain.gradcam import CamResult
from xmedjax.explain.maps import normalize_per_image


def _logits(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return eval_model(graphdef, state)(images).astype(jnp.float32)


def input_gradients(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, targets: jax.Array) -> jax.Array:
    """d logit[b, targets[b]] / d images[b] for every image, NHWC float32."""

    def score(x):
        return select_logits(_logits(graphdef, state, x), targets).sum()

    return jax.grad(score)(images)


def _targets(graphdef, state, images, targets):
    logits = _logits(graphdef, state, images)
    chosen = jnp.argmax(logits, axis=-1) if targets is None else targets
    return logits, chosen.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps",))
def integrated_gradients_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array | None,
    *,
    steps: int = 32,
    baseline: jax.Array | None = None,
) -> CamResult:
    """Integrated gradients from `baseline` (zeros by default) with a `steps`-point midpoint rule."""
    logits, chosen = _targets(graphdef, state, images, targets)
    x0 = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(baseline, images.shape)
    delta = images - x0
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps

    def step(total, alpha):
        return total + input_gradients(graphdef, state, x0 + alpha * delta, chosen), None

    total, _ = jax.lax.scan(step, jnp.zeros_like(images), alphas)
    raw = jnp.sum(delta * total / steps, axis=-1)
    return CamResult(raw, normalize_per_image(jnp.abs(raw)), logits, chosen)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("samples",))
def smoothgrad_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array | None,
    *,
    samples: int = 16,
    noise: float = 0.15,
    seed: int | jax.Array = 0,
) -> CamResult:
    """SmoothGrad: absolute mean input gradient over `samples` Gaussian-noised copies."""
    logits, chosen = _targets(graphdef, state, images, targets)
    span = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(images, axis=(1, 2, 3), keepdims=True)
    sigma = noise * span
    keys = jax.random.split(jax.random.PRNGKey(seed), samples)

    def step(total, key):
        noisy = images + sigma * jax.random.normal(key, images.shape, images.dtype)
        return total + input_gradients(graphdef, state, noisy, chosen), None

    total, _ = jax.lax.scan(step, jnp.zeros_like(images), keys)
    raw = jnp.sum(jnp.abs(total / samples), axis=-1)
    return CamResult(raw, normalize_per_image(raw), logits, chosen)


__all__ = ["input_gradients", "integrated_gradients_fn", "smoothgrad_fn"]
