"""Does the model need the lesion? Lesion reliance on annotated positive images.

For each image with a known, non-empty lesion mask and its true (lesion) class t, the
probability of t is measured on four versions of the image (`CONDITIONS`):

- ``original``: the image as the model sees it;
- ``lesion_removed``: the lesion region filled from its surroundings (`FILL`);
- ``control_removed``: the same-shaped region, translated to a random place inside the
  anatomy (not on the lesion, not in the background), filled the same way: a model that
  reads the lesion cares about the first removal and not about this one;
- ``lesion_only``: everything but the lesion replaced by the background value.

The region removed is the lesion mask dilated by `margin_px` (outlines are drawn by hand).
The anatomy is the largest connected foreground region of the image (pixels differing
from the background value, the median of a thin border frame, by more than 10% of the
image's 99th-percentile difference), holes filled; the control region is placed uniformly
at random among the translations that keep it inside the anatomy and off the lesion
(dilated by the margin); when none exists it takes the translation that leaves least of
it outside (counted in ``control.fallback``).

`summarise` reports each condition's mean probability, mean drop (original - condition)
and flip rate (among images whose original decision was t, the fraction whose decision
is no longer t), with percentile bootstrap 95% intervals over images, and the paired
difference lesion_removed - control_removed. The probabilities are one jitted function of
(graphdef, state, ...); placing the control regions is host numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage, signal

from xmedjax import metrics
from xmedjax.explain.capture import eval_model
from xmedjax.explain.quality import binarize_masks, gaussian_blur

CONDITIONS = ("original", "lesion_removed", "control_removed", "lesion_only")
FILL = (
    "diffusion fill restricted to the region: a normalised Gaussian convolution of the "
    "pixels outside it (sigma = image side / 16), then 64 Jacobi steps of the 4-neighbour "
    "mean with the outside pixels held (harmonic inpainting: smooth, no texture)"
)
FILL_ITERATIONS = 64


def margin_px(size: int) -> int:
    """Pixels the lesion mask is dilated by before removal: max(1, round(size / 64))."""
    return max(1, int(round(size / 64)))


@functools.partial(jax.jit, static_argnames=("iterations",))
def fill_from_surroundings(
    images: jax.Array, masks: jax.Array, *, iterations: int = FILL_ITERATIONS
) -> jax.Array:
    """NHWC `images` with the (B, H, W) `masks` regions filled from their surroundings (`FILL`)."""
    m = masks.astype(jnp.float32)[..., None]
    keep = 1.0 - m
    sigma = max(1.0, images.shape[1] / 16.0)
    num = gaussian_blur(images * keep, sigma)
    den = gaussian_blur(jnp.broadcast_to(keep, images.shape), sigma)
    start = jnp.where(m > 0, num / jnp.maximum(den, 1e-6), images)

    def step(_, x):
        p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        mean = 0.25 * (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:])
        return jnp.where(m > 0, mean, images)

    return jax.lax.fori_loop(0, iterations, step, start)


@functools.partial(jax.jit, static_argnums=0)
def reliance_probabilities_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    lesion: jax.Array,
    control: jax.Array,
    background: jax.Array,
) -> jax.Array:
    """Softmax probabilities (4, B, K) of the `CONDITIONS` versions of NHWC `images`.

    `lesion`, `control`: (B, H, W) regions to remove (already dilated); `background`
    (B, C): the value that replaces everything but the lesion in ``lesion_only``.
    """
    batch = images.shape[0]
    lesion_removed = fill_from_surroundings(images, lesion)
    control_removed = fill_from_surroundings(images, control)
    only = jnp.where(lesion[..., None] > 0, images, background[:, None, None, :])
    stacked = jnp.concatenate([images, lesion_removed, control_removed, only])
    probs = jax.nn.softmax(eval_model(graphdef, state)(stacked).astype(jnp.float32), axis=-1)
    return probs.reshape(4, batch, -1)


# ----------------------------------------------------------------------------- regions (host)


def background_values(images: np.ndarray) -> np.ndarray:
    """(B, C): per image and channel, the median of a border frame max(1, H // 32) wide."""
    images = np.asarray(images, np.float32)
    b = max(1, images.shape[1] // 32)
    frame = np.concatenate(
        [
            images[:, :b].reshape(len(images), -1, images.shape[-1]),
            images[:, -b:].reshape(len(images), -1, images.shape[-1]),
            images[:, b:-b, :b].reshape(len(images), -1, images.shape[-1]),
            images[:, b:-b, -b:].reshape(len(images), -1, images.shape[-1]),
        ],
        axis=1,
    )
    return np.median(frame, axis=1)


def anatomy_mask(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """bool (H, W): the largest connected foreground region of one HWC image, holes filled."""
    diff = np.abs(np.asarray(image, np.float32) - background[None, None, :]).max(axis=-1)
    scale = float(np.percentile(diff, 99))
    fg = diff > 0.1 * scale if scale > 0 else np.zeros(diff.shape, bool)
    fg = ndimage.binary_opening(fg)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones(diff.shape, bool)  # a flat image: anywhere off the lesion
    largest = 1 + int(np.argmax(ndimage.sum(fg, labels, index=np.arange(1, n + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def place_control(
    lesion: np.ndarray, anatomy: np.ndarray, rng: np.random.Generator, margin: int
) -> tuple[np.ndarray, bool]:
    """The lesion's shape translated into the anatomy, off the (dilated) lesion.

    Returns (bool (H, W) region, placed: True when it lies wholly inside the anatomy and off
    the lesion; False: the translation that leaves least of it outside, a fallback).
    """
    lesion = np.asarray(lesion, bool)
    if not lesion.any():
        return np.zeros_like(lesion), False
    rows, cols = np.nonzero(lesion)
    shape = lesion[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    near = ndimage.binary_dilation(lesion, iterations=margin) if margin > 0 else lesion
    forbidden = (~np.asarray(anatomy, bool) | near).astype(np.float32)
    if shape.shape[0] > lesion.shape[0] or shape.shape[1] > lesion.shape[1]:
        return np.zeros_like(lesion), False
    outside = signal.fftconvolve(forbidden, shape[::-1, ::-1].astype(np.float32), mode="valid")
    free = np.argwhere(outside < 0.5)
    placed = len(free) > 0
    if placed:
        top, left = free[rng.integers(len(free))]
    else:
        top, left = np.unravel_index(int(np.argmin(outside)), outside.shape)
    region = np.zeros_like(lesion)
    region[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
    return region, placed


def removal_regions(
    images: np.ndarray, masks: np.ndarray, keys: Sequence[int], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """The regions `reliance_probabilities_fn` removes, for a batch (host numpy).

    Returns {"lesion": the masks dilated by `margin_px`, "control": `place_control` of each
    (the generator of image i seeded by (seed, keys[i]): the same image gets the same control
    whatever the batching), "placed" (B,) bool, "background" (B, C)}. Empty masks give
    empty regions.
    """
    images = np.asarray(images, np.float32)
    masks = binarize_masks(masks)
    margin = margin_px(images.shape[1])
    background = background_values(images)
    lesion = np.zeros_like(masks)
    control = np.zeros_like(masks)
    placed = np.zeros(len(masks), bool)
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        lesion[i] = ndimage.binary_dilation(mask, iterations=margin)
        rng = np.random.default_rng([seed, int(keys[i]) & 0x7FFFFFFF])
        anatomy = anatomy_mask(images[i], background[i])
        control[i], placed[i] = place_control(lesion[i], anatomy, rng, margin)
    return {"lesion": lesion, "control": control, "placed": placed, "background": background}


def reliance_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: np.ndarray,
    masks: np.ndarray,
    keys: Sequence[int],
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (4, B, K) of the `CONDITIONS`, control placed (B,)) of one batch."""
    regions = removal_regions(images, masks, keys, seed=seed)
    probs = reliance_probabilities_fn(
        graphdef,
        state,
        jnp.asarray(images, jnp.float32),
        jnp.asarray(regions["lesion"]),
        jnp.asarray(regions["control"]),
        jnp.asarray(regions["background"]),
    )
    return np.array(probs), regions["placed"]


# ----------------------------------------------------------------------------- summary


def _decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    if threshold is None or probs.shape[-1] != 2:
        return np.argmax(probs, axis=-1)
    return (probs[..., 1] >= threshold).astype(np.int64)


def decision_rule(num_classes: int, threshold: float | None) -> str:
    """How a class is decided from probabilities, in words (for the JSON)."""
    if threshold is None or num_classes != 2:
        return "argmax"
    return f"class 1 when its probability >= {threshold:.4g}, else class 0"


def _mean_ci(values: np.ndarray, samples: int, seed: int) -> tuple[float, list[float]]:
    values = np.asarray(values, np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    return mean, metrics.bootstrap_mean_ci(values, samples=samples, seed=seed)


def summarise(
    probs: np.ndarray,
    targets: np.ndarray,
    placed: np.ndarray,
    *,
    threshold: float | None = None,
    samples: int = 1000,
    seed: int = 0,
) -> dict:
    """The ``lesion_reliance`` section from per-image probabilities (4, N, K) of the
    `CONDITIONS` (see the module docstring for every key)."""
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.int64)
    n, k = probs.shape[1], probs.shape[2]
    p = probs[:, np.arange(n), targets]  # (4, N): the target's probability
    decided = _decide(probs, threshold) == targets[None, :]  # (4, N)
    base = decided[0]
    out: dict = {
        "n_images": int(n),
        "n_predicted_target": int(base.sum()),
        "decision": decision_rule(k, threshold),
        "fill": FILL,
        "control": {"placed": int(np.sum(placed)), "fallback": int(n - np.sum(placed))},
    }
    mean, ci = _mean_ci(p[0], samples, seed)
    out["original"] = {"probability": mean, "probability_ci95": ci}
    for c, name in enumerate(CONDITIONS[1:], start=1):
        entry: dict = {"probability": float(p[c].mean()) if n else float("nan")}
        entry["mean_drop"], entry["mean_drop_ci95"] = _mean_ci(p[0] - p[c], samples, seed)
        flips = (~decided[c][base]).astype(np.float64)
        entry["flip_rate"], entry["flip_rate_ci95"] = _mean_ci(flips, samples, seed)
        out[name] = entry
    drop_diff = p[2] - p[1]  # (p0 - p_lesion) - (p0 - p_control)
    flip_diff = decided[2][base].astype(np.float64) - decided[1][base]
    out["lesion_vs_control"] = {}
    vs = out["lesion_vs_control"]
    vs["mean_drop_difference"], vs["mean_drop_difference_ci95"] = _mean_ci(drop_diff, samples, seed)
    vs["flip_rate_difference"], vs["flip_rate_difference_ci95"] = _mean_ci(flip_diff, samples, seed)
    return out


def lesion_reliance(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: np.ndarray,
    masks: np.ndarray,
    targets: np.ndarray,
    *,
    threshold: float | None = None,
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
) -> dict | None:
    """`summarise` of the images with a non-empty mask (None when there is none), their
    true classes `targets`; batches of `batch_size` (the last padded: one compile)."""
    masks = binarize_masks(masks)
    keep = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    if not len(keep):
        return None
    images = np.asarray(images, np.float32)
    parts, placed = [], []
    for start in range(0, len(keep), batch_size):
        idx = keep[start : start + batch_size]
        pad = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
        probs, ok = reliance_batch(graphdef, state, images[pad], masks[pad], pad, seed=seed)
        parts.append(probs[:, : len(idx)])
        placed.append(ok[: len(idx)])
    return summarise(
        np.concatenate(parts, axis=1),
        np.asarray(targets)[keep],
        np.concatenate(placed),
        threshold=threshold,
        samples=samples,
        seed=seed,
    )


__all__ = [
    "CONDITIONS",
    "FILL",
    "anatomy_mask",
    "background_values",
    "decision_rule",
    "fill_from_surroundings",
    "lesion_reliance",
    "margin_px",
    "place_control",
    "reliance_batch",
    "reliance_probabilities_fn",
    "removal_regions",
    "summarise",
]
