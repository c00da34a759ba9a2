"""Post-processing shared by every saliency method: resize and per-image scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_per_image(maps: jax.Array) -> jax.Array:
    """Min-max scales each (H, W) map to [0, 1]; a constant map becomes all zeros, never NaN."""
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    shifted = maps - lo
    hi = jnp.max(shifted, axis=(1, 2), keepdims=True)
    return jnp.where(hi > 0, shifted / jnp.where(hi > 0, hi, 1.0), 0.0)


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, h, w) maps to (B, H, W) (half-pixel centres, like OpenCV)."""
    batch = maps.shape[0]
    return jax.image.resize(
        maps.astype(jnp.float32), (batch, *size), method="bilinear", antialias=False
    )


def to_input_size(raw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Raw (B, h, w) maps -> (B, H, W) upsampled and scaled to [0, 1] per image."""
    return normalize_per_image(upsample(raw, size))
