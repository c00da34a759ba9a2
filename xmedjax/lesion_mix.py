"""Counterfactual lesion augmentation: erase lesions from positives, paste them into negatives.

When every lesion-free training image comes from one source and every lesion image from
others (the Kaggle brain set: its "notumor" images are all Br35H's), a model can separate
the classes by the source and never look at the lesion. This augmentation makes the source
useless as a cue, using the lesion masks of the training split (e.g. boxes borrowed with
`data_prep.build --annotations_from`):

- erase (`lesion_erase_prob`): a lesion image with a known, non-empty mask gets its lesion
  region (dilated by 3% of the side) filled from its surroundings (a normalised Gaussian
  convolution of the pixels outside it, sigma = side / 16, plus noise with the standard
  deviation of a ring around the region) and becomes an example of the lesion-free class
  (`lesion_negative_class`), mask empty: the lesion's own source, without lesion;
- paste (`lesion_paste_prob`): a lesion-free image gets the lesion box (grown by 15%) of a
  random annotated lesion image of the split, scaled with the image size, its intensities
  put on the target's scale (the mean and standard deviation of each image's anatomy: the
  lesion keeps its contrast to the tissue), blended with a feathered edge at a random place inside the anatomy, and takes the donor's class and mask: the
  lesion-free source, with a lesion.

Both act on the decoded source image before the geometric and intensity augmentation, and
only in training; every draw comes from the example's generator (deterministic for a seed).
Colour images are mixed in greyscale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
from scipy import ndimage

MIX_KEYS = ("lesion_erase_prob", "lesion_paste_prob", "lesion_negative_class")


@dataclass(frozen=True)
class LesionMixParams:
    """Validated probabilities and the lesion-free class (an index of the dataset's labels)."""

    erase_prob: float
    paste_prob: float
    negative_class: int

    @classmethod
    def from_mapping(cls, m, label_names) -> LesionMixParams | None:
        """augment.{lesion_erase_prob, lesion_paste_prob, lesion_negative_class} -> params;
        None when both probabilities are zero. ValueError names the key."""
        erase, paste = float(m.get("lesion_erase_prob", 0)), float(m.get("lesion_paste_prob", 0))
        for key, p in (("lesion_erase_prob", erase), ("lesion_paste_prob", paste)):
            if not 0 <= p <= 1:
                raise ValueError(f"augment.{key} must be in [0, 1], got {p}")
        if erase == 0 and paste == 0:
            return None
        name = str(m.get("lesion_negative_class", ""))
        names = [str(n) for n in label_names]
        if name not in names:
            raise ValueError(
                f"augment.lesion_negative_class must name the lesion-free class, one of "
                f"{names}, got {name!r}"
            )
        return cls(erase, paste, names.index(name))


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image.mean(-1).round().astype(np.uint8)


def _foreground(g: np.ndarray) -> np.ndarray:
    return g > max(10.0, 0.15 * float(np.percentile(g, 99)))


def erase(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 image (H, W) with the region mask > 0.5 (dilated) filled from its surroundings."""
    g = _grey(image).astype(np.float32)
    side = max(g.shape)
    region = ndimage.binary_dilation(mask > 0.5, iterations=max(1, round(0.03 * side)))
    outside = (~region).astype(np.float32)
    sigma = side / 16
    num = ndimage.gaussian_filter(g * outside, sigma, mode="nearest")
    den = ndimage.gaussian_filter(outside, sigma, mode="nearest")
    fill = num / np.maximum(den, 1e-3)
    ring = ndimage.binary_dilation(region, iterations=max(1, round(0.03 * side))) & ~region
    std = float(g[ring].std()) if ring.any() else 0.0
    fill = fill + rng.normal(0.0, std * 0.5, g.shape).astype(np.float32)
    out = np.where(region, fill, g)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _box(mask: np.ndarray, grow: float) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    t, b, lf, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = round((b - t) * grow / 2), round((r - lf) * grow / 2)
    h, w = mask.shape
    return max(0, t - dy), min(h, b + dy), max(0, lf - dx), min(w, r + dx)


def _resize(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    img = PIL.Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize((hw[1], hw[0]), PIL.Image.Resampling.BILINEAR))


def paste(
    image: np.ndarray,
    donor: np.ndarray,
    donor_mask: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 image, float32 mask) with the donor's lesion box pasted inside the anatomy;
    None when the donor has no lesion or the image no room for it."""
    g, d = _grey(image).astype(np.float32), _grey(donor).astype(np.float32)
    box = _box(donor_mask > 0.5, 0.15)
    if box is None:
        return None
    t, b, lf, r = box
    scale = max(g.shape) / max(d.shape)
    ph, pw = max(2, round((b - t) * scale)), max(2, round((r - lf) * scale))
    h, w = g.shape
    if ph >= h or pw >= w:
        return None
    patch = _resize(d[t:b, lf:r], (ph, pw))
    lesion = _resize((donor_mask[t:b, lf:r] > 0.5).astype(np.float32), (ph, pw)) > 0.5
    centres = np.argwhere(
        _foreground(g)[ph // 2 : h - (ph - ph // 2), pw // 2 : w - (pw - pw // 2)]
    )
    if not len(centres):
        return None
    y0, x0 = centres[rng.integers(len(centres))]
    # the donor's intensities on the target's scale (their anatomies' mean and spread; the
    # ratio of means for a target without spread), so the lesion keeps its contrast
    fg_t, fg_d = g[_foreground(g)], d[_foreground(d)]
    spread_t, spread_d = float(fg_t.std()), max(float(fg_d.std()), 1.0)
    gain = spread_t / spread_d if spread_t >= 1 else fg_t.mean() / max(fg_d.mean(), 1.0)
    patch = (patch - fg_d.mean()) * gain + fg_t.mean()
    spot = g[y0 : y0 + ph, x0 : x0 + pw]
    alpha = np.ones((ph, pw), np.float32)
    feather = max(1.0, 0.08 * min(ph, pw))
    alpha = ndimage.gaussian_filter(np.pad(alpha, 1), feather)[1:-1, 1:-1]
    alpha = np.clip((alpha - alpha.min()) / max(float(np.ptp(alpha)), 1e-6), 0, 1)
    out = g.copy()
    out[y0 : y0 + ph, x0 : x0 + pw] = spot * (1 - alpha) + patch * alpha
    mask = np.zeros(g.shape, np.float32)
    mask[y0 : y0 + ph, x0 : x0 + pw] = lesion.astype(np.float32)
    return np.clip(out, 0, 255).round().astype(np.uint8), mask


def donor_indices(source, negative_class: int) -> np.ndarray:
    """Indices of the split's records that can lend a lesion: annotated, not lesion-free."""
    out = []
    for i in range(len(source)):
        rec = source[i]
        known = bool(rec["mask_known"]) if "mask_known" in rec else True
        if known and int(rec["label"]) != negative_class:
            out.append(i)
    return np.asarray(out, np.int64)
