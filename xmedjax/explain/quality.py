"""How good is a saliency map: localisation, faithfulness and sanity checks.

- Localisation against a binary lesion mask (or boxes, via `boxes_to_masks`): the pointing
  game (is the map's maximum inside the lesion), the fraction of map energy inside the
  lesion, and IoU of the map thresholded at `threshold` with the lesion (numpy, per image).
- Faithfulness: deletion and insertion AUC (Petsiuk et al. 2018) of the target class
  probability while the most salient pixels are replaced by (deletion) or restored from
  (insertion) a Gaussian-blurred copy of the image; a jitted function of
  (graphdef, state, ...) whose steps run on device as one `lax.map` of batched forwards.
  Lower deletion AUC and higher insertion AUC are better.
- Sanity checks (Adebayo et al. 2018): cascading parameter randomisation from the head
  down (`cascading_randomization`), and label randomisation (`compare_maps` scores the maps
  of the trained model against those of a model trained on shuffled labels, which the
  caller supplies; `shuffled_label_head` is a cheap stand-in that refits only the linear
  head on shuffled labels by ridge regression, documented as such). Both are scored by
  Spearman rank correlation and SSIM to the original maps; a map that does not depend on
  the model keeps a correlation near 1, a faithful one drops.

`score_methods` runs all of it for a set of registry methods on one batch of images;
`QualitySubset` gathers a split's fixed subset while its batches stream by and
`score_subset` scores it (with `_meta`) for `xmedjax.explain.run`, which writes the JSON.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage, stats

from xmedjax.explain.capture import eval_model, forward_fn
from xmedjax.models import model_spec

# ----------------------------------------------------------------------------- localisation


def boxes_to_masks(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) boxes (x0, y0, x1, y1), pixel coordinates, end-exclusive -> (N, H, W) bool masks."""
    boxes = np.asarray(boxes)
    masks = np.zeros((len(boxes), *shape), bool)
    for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
        masks[i, max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return masks


def binarize_masks(masks: np.ndarray) -> np.ndarray:
    """Masks as (N, H, W) bool, from bool, {0,1} or {0,255} arrays with or without a channel axis."""
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[..., 0]
    if masks.dtype == bool:
        return masks
    return masks > (127 if masks.dtype == np.uint8 and masks.max() > 1 else 0.5)


def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Per image, 1.0 if the map's maximum lies inside the (dilated by `tolerance` px) mask."""
    maps, masks = np.asarray(maps), binarize_masks(masks)
    if tolerance > 0:
        struct = ndimage.generate_binary_structure(2, 1)
        masks = np.stack([ndimage.binary_dilation(m, struct, iterations=tolerance) for m in masks])
    flat = np.argmax(maps.reshape(len(maps), -1), axis=1)
    return masks.reshape(len(masks), -1)[np.arange(len(maps)), flat].astype(np.float64)


def energy_in_mask(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the fraction of (non-negative) map mass inside the mask; 0 for an empty map."""
    maps = np.clip(np.asarray(maps, np.float64), 0, None)
    masks = binarize_masks(masks)
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def iou(maps: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per image, IoU of {map >= threshold} (maps scaled to [0, 1]) with the mask."""
    pred = np.asarray(maps) >= threshold
    masks = binarize_masks(masks)
    inter = (pred & masks).sum(axis=(1, 2))
    union = (pred | masks).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


LOCALISATION_KEYS = ("pointing_game", "energy_in_mask", "iou")
# What every method is compared with, image by image, when present (`paired_comparisons`).
PAIRED_REFERENCES = ("random", "gradcam")


def localisation_per_image(
    maps: np.ndarray, masks: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """{pointing_game, energy_in_mask, iou}: float64 (N,) per image, every image given."""
    masks = binarize_masks(masks)
    return {
        "pointing_game": pointing_game(maps, masks),
        "energy_in_mask": energy_in_mask(maps, masks),
        "iou": iou(maps, masks, threshold),
    }


def summarise_localisation(
    per_image: Mapping[str, np.ndarray], *, samples: int = 1000, seed: int = 0
) -> dict:
    """Means of per-image localisation scores, `n_localisation` and `ci95` (percentile
    bootstrap over images, `metrics.bootstrap_mean_ci`): {key: [low, high]}."""
    from xmedjax.metrics import bootstrap_mean_ci

    n = len(next(iter(per_image.values()))) if per_image else 0
    out: dict = {k: _nanmean(per_image[k]) if n else float("nan") for k in LOCALISATION_KEYS}
    out["n_localisation"] = int(n)
    out["ci95"] = {
        k: bootstrap_mean_ci(per_image[k] if n else [], samples=samples, seed=seed)
        for k in LOCALISATION_KEYS
    }
    return out


def paired_comparisons(
    per_image: Mapping[str, Mapping[str, np.ndarray]],
    references: Sequence[str] = PAIRED_REFERENCES,
    *,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Each method against each reference method on the same images.

    `per_image` is {method: localisation_per_image(...)} over one set of images. Returns
    {method: {reference: {"n": images, key: {"difference": mean(method - reference),
    "ci95": [low, high]}}}} (paired bootstrap: the per-image differences are resampled);
    a method is not compared with itself, an absent reference is skipped.
    """
    from xmedjax.metrics import bootstrap_mean_ci

    out: dict[str, dict] = {}
    for method, scores in per_image.items():
        out[method] = {}
        for ref in references:
            if ref == method or ref not in per_image:
                continue
            entry: dict = {"n": int(len(scores["pointing_game"]))}
            for key in LOCALISATION_KEYS:
                diff = np.asarray(scores[key], np.float64) - np.asarray(per_image[ref][key])
                entry[key] = {
                    "difference": _nanmean(diff) if len(diff) else float("nan"),
                    "ci95": bootstrap_mean_ci(diff, samples=samples, seed=seed),
                }
            out[method][ref] = entry
    return out


def peak_positions(maps: np.ndarray, image_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float64 (N,): each map's maximum in the coordinates of its source image.

    The peak is `np.argmax` of the map as given (the first in row-major order on ties);
    its pixel centre (col + 0.5, row + 0.5) on the S x S map is scaled to the source
    image of `image_hw` (N, 2) = (height, width), which the input pipeline stretched to
    S x S: x = (col + 0.5) * width / S, y = (row + 0.5) * height / S.
    """
    maps = np.asarray(maps)
    n, rows, cols = maps.shape
    flat = np.argmax(maps.reshape(n, -1), axis=1)
    row, col = np.divmod(flat, cols)
    hw = np.asarray(image_hw, np.float64).reshape(n, 2)
    return (col + 0.5) * hw[:, 1] / cols, (row + 0.5) * hw[:, 0] / rows


def points_in_masks(xs: np.ndarray, ys: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """1.0 where source pixel (floor(x), floor(y)) of each image's own-size mask is lesion."""
    out = np.zeros(len(masks), np.float64)
    for i, mask in enumerate(masks):
        h, w = mask.shape
        c = min(w - 1, max(0, int(np.floor(xs[i]))))
        r = min(h - 1, max(0, int(np.floor(ys[i]))))
        out[i] = float(bool(mask[r, c]))
    return out


# ----------------------------------------------------------------------------- faithfulness


def gaussian_matrix(size: int, sigma: float) -> jax.Array:
    """(size, size) row-normalised Gaussian smoothing matrix (edges renormalised)."""
    pos = jnp.arange(size, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of NHWC images."""
    gh = gaussian_matrix(images.shape[1], sigma)
    gw = gaussian_matrix(images.shape[2], sigma)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", gh, images, gw, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps",))
def deletion_insertion_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    maps: jax.Array,
    targets: jax.Array,
    *,
    steps: int = 16,
    blur_sigma: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Deletion and insertion curves and AUCs of the target-class probability.

    At step s of `steps`, the round(s / steps * H * W) most salient pixels (by `maps`,
    ties broken by position) are blurred (deletion) or un-blurred (insertion). The blur is
    Gaussian with `blur_sigma` (default H / 16). Returns (deletion_auc (B,),
    insertion_auc (B,), deletion_curve (steps + 1, B), insertion_curve (steps + 1, B));
    AUCs by the trapezoid rule over the fraction of pixels in [0, 1].
    """
    batch, height, width, _ = images.shape
    sigma = max(1.0, height / 16.0) if blur_sigma is None else blur_sigma
    blurred = gaussian_blur(images, sigma)
    order = jnp.argsort(-maps.reshape(batch, -1), axis=1, stable=True)
    rank = jnp.argsort(order, axis=1).reshape(batch, height, width, 1)
    counts = jnp.round(jnp.arange(steps + 1, dtype=jnp.float32) / steps * height * width).astype(
        jnp.int32
    )
    model = eval_model(graphdef, state)
    both_targets = jnp.concatenate([targets, targets]).astype(jnp.int32)

    def probs(count):
        top = rank < count
        deleted = jnp.where(top, blurred, images)
        inserted = jnp.where(top, images, blurred)
        p = jax.nn.softmax(model(jnp.concatenate([deleted, inserted])).astype(jnp.float32), axis=-1)
        p = jnp.take_along_axis(p, both_targets[:, None], axis=1)[:, 0]
        return p[:batch], p[batch:]

    deletion, insertion = jax.lax.map(probs, counts)

    def auc(curve):
        return (jnp.sum(curve, axis=0) - 0.5 * (curve[0] + curve[-1])) / steps

    return auc(deletion), auc(insertion), deletion, insertion


# ----------------------------------------------------------------------------- map similarity


def spearman(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Per-image Spearman rank correlation (average ranks for ties).

    A constant map has no ranking: against a non-constant map it scores 0 (it shares no
    ordering with it), against another constant map 1.
    """
    a = np.asarray(maps_a, np.float64).reshape(len(maps_a), -1)
    b = np.asarray(maps_b, np.float64).reshape(len(maps_b), -1)
    ra = stats.rankdata(a, axis=1)
    rb = stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    sa, sb = (ra**2).sum(axis=1), (rb**2).sum(axis=1)
    denom = np.sqrt(sa * sb)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, rho, np.where((sa == 0) & (sb == 0), 1.0, 0.0))


def ssim(
    maps_a: np.ndarray, maps_b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5
) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004, Gaussian window) of two (N, H, W) map sets in [0, data_range]."""
    a = np.asarray(maps_a, np.float64)
    b = np.asarray(maps_b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x):
        return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="reflect", truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return index.mean(axis=(1, 2))


def compare_maps(maps_a: np.ndarray, maps_b: np.ndarray) -> dict[str, float]:
    """Mean Spearman and SSIM between two map sets of the same images (label randomisation)."""
    return {"spearman": _nanmean(spearman(maps_a, maps_b)), "ssim": _nanmean(ssim(maps_a, maps_b))}


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


# ----------------------------------------------------------------------------- randomisation


def randomization_stages(
    model: nnx.Module | nnx.GraphDef, state: nnx.State | None = None
) -> list[str]:
    """The model's parameter groups from the head down (ResNet: fc, layer4 .. layer1, bn1, conv1).

    `randomization_stages(graphdef, state)` or `randomization_stages(model)`: the order the
    model declares (`ModelSpec.randomization_order`).
    """
    return list(model_spec(model, state).randomization_order)


def _in_stages(path: tuple, stages: Sequence[tuple[str, ...]]) -> bool:
    parts = tuple(map(str, path))
    return any(parts[: len(stage)] == stage for stage in stages)


def randomize_stages(state: nnx.State, stages: Sequence[str], seed: int = 0) -> nnx.State:
    """A copy of `state` whose conv/linear kernels in `stages` are re-drawn from N(0, 2 / fan_in).

    A stage is a dotted path prefix of parameter paths ("layer4", "features.denseblock1").
    Biases, BatchNorm parameters and statistics are kept (Adebayo et al. re-initialise the
    weights; the kernels carry what the network learned).
    """
    wanted = [tuple(stage.split(".")) for stage in stages]
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        value = var.get_value()
        if isinstance(var, nnx.Param) and _in_stages(path, wanted) and value.ndim >= 2:
            fan_in = int(np.prod(value.shape[:-1]))
            noise = jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
            var = var.replace((noise * np.sqrt(2.0 / fan_in)).astype(value.dtype))
        out.append((path, var))
    return nnx.from_flat_state(out)


def cascading_randomization(
    method: Callable,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array,
    *,
    original: np.ndarray | Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    stages: Sequence[str] | None = None,
    cuts: Sequence[int] | None = None,
    **opts,
) -> list[dict] | dict[str, list[dict]]:
    """Adebayo et al.'s cascade: randomise stage after stage from the head down.

    Returns one entry per cumulative stage: {"stage": last stage randomised, "spearman",
    "ssim"} (means over images) of the randomised model's maps against `original` (the
    trained model's maps, computed here when not given), same targets. `cuts` (default:
    every stage) are the numbers of stages randomised, e.g. (1, len(stages)) for the two ends.

    `method(graphdef, state, images, targets, **opts)` is one registry method (a CamResult:
    the result is one list) or several at once, returning {name: CamResult} (such as
    `cams.compute_methods` with `names=`, which shares the gradient CAMs' backward pass:
    the result is {name: list}, and `original`, when given, is {name: maps}).
    """

    def maps_of(model_state) -> dict:
        result = method(graphdef, model_state, images, targets, **opts)
        if isinstance(result, Mapping):
            return {name: np.asarray(r.maps) for name, r in result.items()}
        return {None: np.asarray(result.maps)}

    if original is None:
        original = maps_of(state)
    elif not isinstance(original, Mapping):
        original = {None: np.asarray(original)}
    stages = list(randomization_stages(graphdef, state) if stages is None else stages)
    cuts = range(1, len(stages) + 1) if cuts is None else cuts
    results: dict = {name: [] for name in original}
    for n in cuts:
        maps = maps_of(randomize_stages(state, stages[:n], seed))
        for name, entries in results.items():
            entries.append({"stage": stages[n - 1], **compare_maps(original[name], maps[name])})
    return results[None] if None in results else results


def _head_paths(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[tuple, tuple]:
    """The (kernel, bias) parameter paths of the model's linear head (`ModelSpec.head`)."""
    head = tuple(model_spec(graphdef, state).head.split("."))
    flat = {path: var for path, var in nnx.to_flat_state(state)}
    kernel, bias = (*head, "kernel"), (*head, "bias")
    if kernel not in flat or bias not in flat:
        raise KeyError(f"the head {'.'.join(head)!r} has no kernel and bias")
    return kernel, bias


def shuffled_label_head(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    l2: float = 1e-3,
    batch_size: int = 32,
) -> nnx.State:
    """A cheap label-randomisation model: the head refit on shuffled labels, features kept.

    The full test re-trains the whole network on shuffled labels (pass that model's state
    to `compare_maps` via the caller instead when you have it). This stand-in fits the
    linear head by ridge regression of one-hot shuffled labels (scaled to +-1) on the
    pooled target activation of `images`, so only what the head learned is randomised; it
    is a lower bound on how much a method depends on the labels.
    """
    if len(np.unique(np.asarray(labels))) < 2:
        raise ValueError(
            "shuffled_label_head needs images of at least two classes (shuffling one class changes nothing)"
        )
    kernel_path, bias_path = _head_paths(graphdef, state)
    flat = {path: var for path, var in nnx.to_flat_state(state)}
    num_classes = flat[kernel_path].get_value().shape[-1]
    feats = []
    images = np.asarray(images, np.float32)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad: every call has the same shape, one compile
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
        _, act = forward_fn(graphdef, state, jnp.asarray(chunk), None)
        feats.append(np.asarray(jnp.mean(act, axis=(1, 2)), np.float64)[:n])
    feats = np.concatenate(feats)
    shuffled = np.random.default_rng(seed).permutation(np.asarray(labels))
    onehot = 2.0 * np.eye(num_classes)[shuffled] - 1.0
    mean = feats.mean(axis=0)
    centred = feats - mean
    gram = centred.T @ centred + l2 * len(feats) * np.eye(feats.shape[1])
    kernel = np.linalg.solve(gram, centred.T @ (onehot - onehot.mean(axis=0)))
    bias = onehot.mean(axis=0) - mean @ kernel
    out = []
    for path, var in nnx.to_flat_state(state):
        if path == kernel_path:
            var = var.replace(jnp.asarray(kernel, var.get_value().dtype))
        elif path == bias_path:
            var = var.replace(jnp.asarray(bias, var.get_value().dtype))
        out.append((path, var))
    return nnx.from_flat_state(out)


# ----------------------------------------------------------------------------- all together


def localisation_scores(
    maps: np.ndarray, masks: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Mean pointing game, energy in mask and IoU over the images with a non-empty mask."""
    masks = binarize_masks(masks)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    if not keep.any():
        return {
            "pointing_game": float("nan"),
            "energy_in_mask": float("nan"),
            "iou": float("nan"),
            "n_localisation": 0,
        }
    maps, masks = np.asarray(maps)[keep], masks[keep]
    return {
        "pointing_game": float(pointing_game(maps, masks).mean()),
        "energy_in_mask": float(energy_in_mask(maps, masks).mean()),
        "iou": float(iou(maps, masks, threshold).mean()),
        "n_localisation": int(keep.sum()),
    }


def score_localisation(
    maps: Mapping[str, np.ndarray],
    masks: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict]:
    """{method: summarise_localisation(...) + "paired": paired_comparisons(...)[method]} of
    every method's maps (N, H, W) against `masks`, over the images with a non-empty mask
    (the localisation targets; an empty mask is a negative, not scored)."""
    masks = binarize_masks(masks)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    per_image = {
        name: localisation_per_image(np.asarray(m)[keep], masks[keep], threshold)
        for name, m in maps.items()
    }
    paired = paired_comparisons(per_image, samples=samples, seed=seed)
    return {
        name: {
            **summarise_localisation(scores, samples=samples, seed=seed),
            "paired": paired[name],
        }
        for name, scores in per_image.items()
    }


def score_methods(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: np.ndarray,
    targets: np.ndarray,
    masks: np.ndarray | None,
    names: Sequence[str],
    *,
    method_opts: dict[str, dict] | None = None,
    faithfulness: bool = True,
    steps: int = 16,
    sanity: bool = True,
    cascade: str = "full",
    label_state: nnx.State | None = None,
    label_model: str = "caller",
    layer: str | None = None,
    seed: int = 0,
    bootstrap_samples: int = 1000,
) -> dict[str, dict]:
    """Every quality score of every named registry method on one batch of images.

    `targets` are the classes to explain (for localisation: the lesion class). `masks`
    (N, H, W) or None skips localisation (`score_localisation`: intervals, paired). The parameter-randomisation summary
    (`sanity_randomization_spearman`/`_ssim`) is the fully randomised end of the cascade,
    `sanity_randomization_head_*` the head-only start; `cascade="full"` also scores every
    stage in between (under `sanity_randomization_cascade`), `"ends"` only those two
    (cheaper). `label_state`, when given, is the state of a model with the same graphdef
    trained on shuffled labels (`label_model` says how it was made) for the
    label-randomisation check (`sanity_label_*`). `layer` is the CAM target layer
    (None: the model's own; see `xmedjax.explain.capture`).
    """
    from xmedjax.explain.cams import compute_methods

    names = tuple(names)
    images = jnp.asarray(images, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    original = compute_methods(graphdef, state, images, targets, names, method_opts, layer)
    maps = {name: np.asarray(result.maps) for name, result in original.items()}
    out: dict[str, dict] = {name: {"n_images": int(len(images))} for name in names}
    if masks is not None:
        for name, scores in score_localisation(maps, masks, samples=bootstrap_samples).items():
            out[name].update(scores)
    for name in names:
        if faithfulness:
            d_auc, i_auc, _, _ = deletion_insertion_fn(
                graphdef, state, images, original[name].maps, targets, steps=steps
            )
            out[name]["deletion_auc"] = float(jnp.mean(d_auc))
            out[name]["insertion_auc"] = float(jnp.mean(i_auc))
    if sanity:
        stages = randomization_stages(graphdef, state)
        cascades = cascading_randomization(
            compute_methods,
            graphdef,
            state,
            images,
            targets,
            original=maps,
            seed=seed,
            stages=stages,
            cuts=None if cascade == "full" else sorted({1, len(stages)}),
            names=names,
            method_opts=method_opts,
            layer=layer,
        )
        for name in names:
            out[name]["sanity_randomization_spearman"] = cascades[name][-1]["spearman"]
            out[name]["sanity_randomization_ssim"] = cascades[name][-1]["ssim"]
            out[name]["sanity_randomization_head_spearman"] = cascades[name][0]["spearman"]
            out[name]["sanity_randomization_head_ssim"] = cascades[name][0]["ssim"]
            out[name]["sanity_randomization_cascade"] = cascades[name]
    if label_state is not None:
        other = compute_methods(graphdef, label_state, images, targets, names, method_opts, layer)
        for name in names:
            compared = compare_maps(maps[name], np.asarray(other[name].maps))
            out[name]["sanity_label_spearman"] = compared["spearman"]
            out[name]["sanity_label_ssim"] = compared["ssim"]
            out[name]["sanity_label_model"] = label_model
    return out


# ----------------------------------------------------------------------------- a split's subset


def _count(parts: dict[str, list]) -> int:
    return sum(len(x) for x in parts["images"])


def collect_subset(
    subset: dict[str, list], batch: Mapping, valid: np.ndarray, limit: int | None = None
) -> None:
    """Appends a batch's valid images that have a known, non-empty lesion mask (every valid
    image when the batch has no masks) to subset["images"], ["labels"] and ["masks"], up to
    `limit` images in all (None: no limit). `mask_known` False (not annotated) is never
    taken; a known empty mask is a negative, not a localisation target."""
    keep = np.asarray(valid, bool).copy()
    masks = None
    if "mask" in batch:
        masks = binarize_masks(np.asarray(batch["mask"]))
        keep &= masks.reshape(len(masks), -1).any(axis=1)
        if "mask_known" in batch:
            keep &= np.asarray(batch["mask_known"], bool)
    if limit is not None:
        keep &= np.cumsum(keep) <= max(0, limit - _count(subset))
    if masks is not None:
        subset["masks"].append(masks[keep])
    subset["images"].append(np.asarray(batch["image"], np.float32)[keep])
    subset["labels"].append(np.asarray(batch["label"])[keep])


class QualitySubset:
    """The fixed subset of a split that the quality scores use, gathered as batches stream by.

    The first `n_images` images with a known (`mask_known`), non-empty lesion mask (the
    first images when the dataset has no masks), and, while fewer than `fit_images` are
    held, every valid image of each batch, any class, for `shuffled_label_head` (0: none).
    `mask_counts` counts every valid image seen: with a lesion, known empty, not annotated.
    """

    def __init__(self, n_images: int, fit_images: int = 0):
        self.n_images, self.fit_images = n_images, fit_images
        self.has_masks = False
        # every valid image seen: with a lesion mask, known empty (negatives), not annotated
        self.mask_counts = {"annotated": 0, "empty": 0, "unknown": 0}
        self._subset: dict[str, list] = {"images": [], "labels": [], "masks": []}
        self._fit: dict[str, list] = {"images": [], "labels": []}

    def _count_masks(self, batch: Mapping, valid: np.ndarray) -> None:
        if "mask" not in batch:
            return
        masks = binarize_masks(np.asarray(batch["mask"]))[valid]
        known = np.asarray(batch.get("mask_known", np.ones(len(valid), bool)), bool)[valid]
        lesion = masks.reshape(len(masks), -1).any(axis=1)
        self.mask_counts["annotated"] += int((known & lesion).sum())
        self.mask_counts["empty"] += int((known & ~lesion).sum())
        self.mask_counts["unknown"] += int((~known).sum())

    def add(self, batch: Mapping, valid: np.ndarray) -> None:
        """Takes what it still needs from one batch (dict of image, label, mask?,
        mask_known?) and counts its masks."""
        valid = np.asarray(valid, bool)
        self._count_masks(batch, valid)
        if _count(self._subset) < self.n_images:
            collect_subset(self._subset, batch, valid, self.n_images)
            self.has_masks = self.has_masks or "mask" in batch
        if _count(self._fit) < self.fit_images:
            self._fit["images"].append(np.asarray(batch["image"], np.float32)[valid])
            self._fit["labels"].append(np.asarray(batch["label"])[valid])

    def arrays(self) -> dict[str, np.ndarray | None] | None:
        """{"images", "labels" (int32), "masks" (None without masks)}; None when empty."""
        if not _count(self._subset):
            return None
        parts = self._subset
        return {
            "images": np.concatenate(parts["images"]),
            "labels": np.concatenate(parts["labels"]).astype(np.int32),
            "masks": np.concatenate(parts["masks"]) if self.has_masks else None,
        }

    def fit_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) gathered for the shuffled-label head (empty arrays when none)."""
        if not self._fit["labels"]:
            return np.zeros((0,), np.float32), np.zeros((0,), np.int32)
        return np.concatenate(self._fit["images"]), np.concatenate(self._fit["labels"])


def label_randomization_model(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    fit_images: np.ndarray,
    fit_labels: np.ndarray,
    *,
    label_state: nnx.State | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[nnx.State | None, str]:
    """(state, how it was made) of the model for the label-randomisation check.

    `label_state` (a model trained on shuffled labels) when the caller has one, else the
    `shuffled_label_head` refit on (`fit_images`, `fit_labels`), else None when those hold
    a single class.
    """
    if label_state is not None:
        return label_state, "caller-supplied model trained on shuffled labels"
    if len(np.unique(fit_labels)) < 2:
        return None, "none (the split has a single class)"
    head = shuffled_label_head(
        graphdef, state, fit_images, fit_labels, seed=seed, batch_size=batch_size
    )
    return head, (
        f"linear head refit by ridge on {len(fit_labels)} images with shuffled labels, "
        "features kept"
    )


def _reliance_section(graphdef, state, arrays, samples, seed, batch_size) -> dict | None:
    """The lesion_reliance section of a subset's arrays, labels as the true class."""
    from xmedjax.explain.reliance import lesion_reliance

    section = lesion_reliance(
        graphdef,
        state,
        arrays["images"],
        arrays["masks"],
        arrays["labels"],
        samples=samples,
        seed=seed,
        batch_size=batch_size,
    )
    return None if section is None else {**section, "targets": "true label"}


def score_subset(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    subset: QualitySubset,
    methods: Sequence[str],
    *,
    split: str,
    method_opts: dict[str, dict] | None = None,
    steps: int = 10,
    layer: str | None = None,
    label_state: nnx.State | None = None,
    seed: int = 0,
    batch_size: int = 32,
    bootstrap_samples: int = 1000,
    reliance: bool = True,
) -> dict[str, dict] | None:
    """`score_methods` of `methods` on a split's `QualitySubset`, explaining the TRUE class,
    with the cheap cascade ("ends") and label randomisation; None when the subset is empty.

    With masks, localisation comes with bootstrap `ci95` and `paired` comparisons, and
    (`reliance`) the `lesion_reliance` section (`xmedjax.explain.reliance`) of the subset's
    images, their labels as the true class. The scores come with `_meta`: split, n_images,
    targets, label_model, subset, mask_counts (every image of the split: with a lesion,
    known empty, not annotated), method_opts, cam_layer, cam_layer_caveat (a warning when
    channel-weighted CAMs map an earlier layer: `cams.cam_layer_caveat`), bootstrap_samples
    and seconds (this call, the head refit included).
    """
    from xmedjax.explain.cams import cam_layer_caveat

    started = time.time()
    arrays = subset.arrays()
    if arrays is None:
        return None
    label_state, label_model = label_randomization_model(
        graphdef,
        state,
        *subset.fit_arrays(),
        label_state=label_state,
        seed=seed,
        batch_size=batch_size,
    )
    scores = score_methods(
        graphdef,
        state,
        arrays["images"],
        arrays["labels"],
        arrays["masks"],
        tuple(methods),
        method_opts=method_opts,
        cascade="ends",
        steps=steps,
        label_state=label_state,
        label_model=label_model,
        layer=layer,
        seed=seed,
        bootstrap_samples=bootstrap_samples,
    )
    if reliance and arrays["masks"] is not None:
        section = _reliance_section(graphdef, state, arrays, bootstrap_samples, seed, batch_size)
        if section is not None:
            scores["lesion_reliance"] = section
    scores["_meta"] = {
        "split": split,
        "n_images": int(len(arrays["images"])),
        "targets": "true label",
        "label_model": label_model,
        "subset": (
            "first images with a known, non-empty mask" if subset.has_masks else "first images"
        ),
        "mask_counts": subset.mask_counts if subset.has_masks else None,
        "method_opts": method_opts,
        "cam_layer": layer or "model target",
        "cam_layer_caveat": cam_layer_caveat(methods, layer),
        "bootstrap_samples": bootstrap_samples,
        "seconds": round(time.time() - started, 2),
    }
    return scores


__all__ = [
    "LOCALISATION_KEYS",
    "PAIRED_REFERENCES",
    "QualitySubset",
    "binarize_masks",
    "boxes_to_masks",
    "cascading_randomization",
    "collect_subset",
    "compare_maps",
    "deletion_insertion_fn",
    "energy_in_mask",
    "gaussian_blur",
    "iou",
    "label_randomization_model",
    "localisation_per_image",
    "localisation_scores",
    "paired_comparisons",
    "peak_positions",
    "points_in_masks",
    "score_localisation",
    "summarise_localisation",
    "pointing_game",
    "randomization_stages",
    "randomize_stages",
    "score_methods",
    "score_subset",
    "shuffled_label_head",
    "spearman",
    "ssim",
]
