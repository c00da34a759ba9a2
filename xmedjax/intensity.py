"""Photometric (intensity) augmentation: what a scanner, protocol or site changes.

The geometric augmentation (`xmedjax.augment`) moves pixels; this one changes their values,
so that a model cannot tell where an image came from by its contrast, gamma, sharpness,
resolution or noise, only by its content. Applied to the training images only, after the
geometric transform, on float pixels in [0, 1], before normalisation; masks are untouched.

Per image, in this order (each drawn independently, every range includes "no change"):

- ``resolution_range`` r: shrink to a uniform fraction in [1 - r, 1] of the side, then back
  (PIL bilinear both ways): the detail of a lower-resolution source;
- ``blur_sigma`` s: Gaussian blur with sigma uniform in [0, s] pixels (at the model size);
- ``gamma_range`` g: x ** gamma with log(gamma) uniform in [-log(1 + g), log(1 + g)];
- ``contrast_range`` c: (x - mean) * uniform[1 - c, 1 + c] + mean;
- ``brightness_range`` b: + uniform[-b, b];
- ``noise_std`` n: + Gaussian noise with sigma uniform in [0, n];

then clipped to [0, 1]. All zero (the default, as the paper) is no intensity augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields
from typing import Any

import numpy as np
import PIL.Image
from scipy import ndimage

INTENSITY_KEYS = (
    "resolution_range",
    "blur_sigma",
    "gamma_range",
    "contrast_range",
    "brightness_range",
    "noise_std",
)


@dataclass(frozen=True)
class IntensityParams:
    """Validated intensity-augmentation ranges (see the module docstring)."""

    resolution_range: float = 0.0
    blur_sigma: float = 0.0
    gamma_range: float = 0.0
    contrast_range: float = 0.0
    brightness_range: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"augment.{f.name} must be finite and >= 0, got {v}")
        if self.resolution_range >= 1 or self.contrast_range >= 1:
            raise ValueError("augment.resolution_range and augment.contrast_range must be < 1")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> IntensityParams | None:
        """The intensity keys of `m` (others are ignored) -> params; None when all are zero."""
        p = cls(**{k: float(m[k]) for k in INTENSITY_KEYS if m and k in m})
        return None if not any(astuple(p)) else p


def augment(x: np.ndarray, rng: np.random.Generator, p: IntensityParams) -> np.ndarray:
    """float32 (H, W) or (H, W, 3) pixels in [0, 1] -> augmented, same shape, in [0, 1]."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[:2]
    if p.resolution_range:
        scale = rng.uniform(1.0 - p.resolution_range, 1.0)
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        x = _per_channel(x, lambda a: _resize_f(_resize_f(a, small), (w, h)))
    if p.blur_sigma:
        sigma = rng.uniform(0.0, p.blur_sigma)
        x = _per_channel(x, lambda a: ndimage.gaussian_filter(a, sigma, mode="nearest"))
    x = np.clip(x, 0.0, 1.0)
    if p.gamma_range:
        x = x ** np.float32(math.exp(rng.uniform(-1, 1) * math.log1p(p.gamma_range)))
    if p.contrast_range:
        mean = x.mean()
        x = (x - mean) * np.float32(rng.uniform(1 - p.contrast_range, 1 + p.contrast_range)) + mean
    if p.brightness_range:
        x = x + np.float32(rng.uniform(-p.brightness_range, p.brightness_range))
    if p.noise_std:
        sigma = rng.uniform(0.0, p.noise_std)
        x = x + rng.normal(0.0, sigma, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _per_channel(x: np.ndarray, fn) -> np.ndarray:
    if x.ndim == 2:
        return fn(x).astype(np.float32)
    return np.stack([fn(x[..., c]) for c in range(x.shape[2])], axis=-1).astype(np.float32)


def _resize_f(a: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    img = PIL.Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F")
    return np.asarray(img.resize(size_wh, PIL.Image.Resampling.BILINEAR))
