"""Keras ``ImageDataGenerator``-style geometric augmentation, fused with the resize.

As Keras' ``flow_from_directory`` + ``ImageDataGenerator(rotation_range, width_shift_range,
height_shift_range, zoom_range, horizontal_flip)``: the image is resized to the model size
(PIL bilinear, the same resize as the eval path), then one random affine transform
(rotation, shift, zoom, then flip, about the centre) is applied with PIL (bilinear), points
outside taking the nearest edge value (Keras' default ``fill_mode='nearest'``). Masks go
through exactly the same resize and transform, so they stay aligned with their image.

Parameters follow Keras: ``rotation_range`` in degrees (uniform in +-range), shift ranges
as fractions of the width/height, ``zoom_range`` z gives independent zooms in
[1 - z, 1 + z] for both axes (values > 1 zoom out, as in Keras), ``horizontal_flip`` a
coin flip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

AUGMENT_KEYS = (
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "zoom_range",
    "horizontal_flip",
)
PAPER_DEFAULTS = {
    "rotation_range": 20.0,
    "width_shift_range": 0.1,
    "height_shift_range": 0.1,
    "zoom_range": 0.1,
    "horizontal_flip": True,
}


@dataclass(frozen=True)
class AugmentParams:
    """Validated augmentation ranges."""

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    zoom_range: float = 0.0
    horizontal_flip: bool = False

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> AugmentParams | None:
        """None/empty mapping -> None (no augmentation); unknown keys raise ValueError."""
        if not m:
            return None
        m = dict(m)
        unknown = sorted(set(m) - set(AUGMENT_KEYS))
        if unknown:
            raise ValueError(f"unknown augment key(s) {unknown}; expected {list(AUGMENT_KEYS)}")
        zoom = m.get("zoom_range", 0.0)
        if isinstance(zoom, (tuple, list)):  # Keras also accepts [lower, upper]
            zoom = max(1.0 - float(zoom[0]), float(zoom[1]) - 1.0)
        p = cls(
            float(m.get("rotation_range", 0.0)),
            float(m.get("width_shift_range", 0.0)),
            float(m.get("height_shift_range", 0.0)),
            float(zoom),
            bool(m.get("horizontal_flip", False)),
        )
        if p.is_identity():
            return None
        return p

    def is_identity(self) -> bool:
        return (
            self.rotation_range == 0
            and self.width_shift_range == 0
            and self.height_shift_range == 0
            and self.zoom_range == 0
            and not self.horizontal_flip
        )


def sample_transform(rng: np.random.Generator, p: AugmentParams, size: int) -> np.ndarray:
    """A 3x3 matrix mapping output (x, y) to augmented-frame (x, y), both at ``size``.

    Coordinates are continuous with pixel centres at i + 0.5; the rotation, zoom and shift
    act about the image centre as in Keras' ``apply_affine_transform``.
    """
    theta = (
        math.radians(rng.uniform(-p.rotation_range, p.rotation_range))
        if (p.rotation_range)
        else 0.0
    )
    tx = (
        rng.uniform(-p.width_shift_range, p.width_shift_range) * size
        if (p.width_shift_range)
        else 0.0
    )
    ty = (
        rng.uniform(-p.height_shift_range, p.height_shift_range) * size
        if (p.height_shift_range)
        else 0.0
    )
    if p.zoom_range:
        zx, zy = rng.uniform(1 - p.zoom_range, 1 + p.zoom_range, 2)
    else:
        zx = zy = 1.0
    flip = bool(p.horizontal_flip and rng.random() < 0.5)
    c = size / 2.0
    cos, sin = math.cos(theta), math.sin(theta)
    rot = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    to_c = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
    from_c = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
    m = from_c @ rot @ shift @ zoom @ to_c
    if flip:  # Keras flips after the affine transform: output x -> size - x first.
        m = m @ np.array([[-1, 0, size], [0, 1, 0], [0, 0, 1]])
    return m


def warp(arrays: list[np.ndarray], transform: np.ndarray | None, size: int) -> list[np.ndarray]:
    """Resizes (and, with a transform, augments) arrays that share one geometry.

    ``arrays``: uint8 (H, W) / (H, W, 3) images or float32 (H, W) masks of the same H, W.
    ``transform``: from ``sample_transform`` (None: plain bilinear resize). Points outside
    the image take the nearest edge value (Keras ``fill_mode='nearest'``).
    """
    # As Keras' flow_from_directory: resize to the target size first (PIL bilinear with
    # its antialiasing, same as the eval path), then transform at that size.
    arrays = [_resize(a, size) for a in arrays]
    if transform is None:
        return arrays
    m = transform
    # Pad with edge values just enough to cover where the output corners land.
    corners = m @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], float)
    over = max(
        0.0, -corners[0].min(), -corners[1].min(), corners[0].max() - size, corners[1].max() - size
    )
    pad = int(math.ceil(over)) + 2
    m = np.array([[1, 0, pad], [0, 1, pad], [0, 0, 1]]) @ m
    data = (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2])
    out = []
    for a in arrays:
        padded = np.pad(a, ((pad, pad), (pad, pad)) + ((0, 0),) * (a.ndim - 2), mode="edge")
        img = _to_pil(padded)
        res = img.transform(
            (size, size), PIL.Image.Transform.AFFINE, data, resample=PIL.Image.Resampling.BILINEAR
        )
        out.append(np.asarray(res))
    return out


def _to_pil(a: np.ndarray) -> PIL.Image.Image:
    if a.dtype == np.float32:
        if a.ndim != 2:
            raise ValueError(f"float arrays (masks) must be 2-D, got shape {a.shape}")
        return PIL.Image.fromarray(a, mode="F")
    return PIL.Image.fromarray(a)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    return np.asarray(_to_pil(a).resize((size, size), PIL.Image.Resampling.BILINEAR))
