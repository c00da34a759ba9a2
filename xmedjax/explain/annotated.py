"""Scoring a user's annotated folder: the predict/explain modes' `explain_quality_folder.json`.

    settings = FolderAnnotations(path="outlines.json", format="via", positive_class=-1)
    run.explain_folder(..., annotations=settings)

The annotations (VIA, COCO, YOLO or mask images, read by `data_prep.annotations`) are
rasterised at each image's source resolution. Every method's map explains the lesion
class (`positive_class`) and is scored on the images with a known, non-empty lesion mask:

- pointing game at the source resolution: the stored float16 map's `np.argmax` (first in
  row-major order on ties), pixel centre (col + 0.5, row + 0.5) scaled by
  (width / S, height / S) to the source image (the input pipeline stretches the whole image
  to S x S), a hit when that source pixel, (floor(x), floor(y)), is lesion
  (`quality.peak_positions`, `quality.points_in_masks`);
- energy in mask and IoU at the model's input size S x S, against the source mask resized by
  area (`data_prep.annotations.resize_mask`: a pixel is lesion when at least half of it is,
  a non-empty mask stays non-empty), on the same float16 maps;
- lesion reliance (`xmedjax.explain.reliance`) with the positive class as the true class.

`FolderScorer` is an `explain_batches` on_batch hook; `folder_quality` turns what it saw
into the JSON (the keys of explain_quality.json) and `npz_rows` into the per-image rows
added to each `heatmaps/folder_<method>.npz`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
from flax import nnx

from data_prep import annotations as annotations_lib
from data_prep import image_io, layouts
from xmedjax import metrics as metrics_lib
from xmedjax.explain import quality as quality_lib
from xmedjax.explain import reliance as reliance_lib

GEOMETRY = (
    "maps are S x S at the model's input size; the input pipeline stretches the whole source "
    "image (height x width) to S x S (PIL bilinear), so map pixel (row, col) has its centre "
    "at source x = (col + 0.5) * width / S, y = (row + 0.5) * height / S"
)
POINTING = (
    "np.argmax of the stored float16 map (first in row-major order on ties), mapped to the "
    "source image as in geometry; a hit when source pixel (floor(x), floor(y)) is lesion in "
    "the mask rasterised at the source resolution (pixel centres inside the outline)"
)
AREA = (
    "energy_in_mask and iou (map >= 0.5) at S x S against the source mask resized by area "
    "(lesion where at least half of the pixel is; npz 'masks')"
)
MAX_LISTED = 100  # annotation errors listed in _meta (all are counted)
RELIANCE_KEYS = tuple(f"p_{c}" for c in reliance_lib.CONDITIONS)


@dataclasses.dataclass(frozen=True)
class FolderAnnotations:
    """Lesion annotations of a predict/explain folder and how they are scored."""

    path: str
    format: str = "auto"  # auto | via | coco | yolo | masks
    positive_class: int = -1  # the lesion class explained and measured; -1: the last
    negative_class: str = ""  # the lesion-free class's name: adds "any lesion" scores
    bootstrap_samples: int = 1000
    seed: int = 0
    reliance: bool = True

    @classmethod
    def from_config(cls, config) -> FolderAnnotations | None:
        """From config.predict.{annotations, annotation_format, positive_class,
        negative_class}; None without."""
        p = config.predict
        if not p.annotations:
            return None
        return cls(
            path=p.annotations,
            format=p.annotation_format,
            positive_class=int(p.positive_class),
            negative_class=str(p.get("negative_class", "")),
            bootstrap_samples=int(config.evaluate.bootstrap_samples),
            seed=int(config.training.seed),
        )

    def resolve_class(self, num_classes: int) -> int:
        """The positive class as an index in [0, num_classes)."""
        k = self.positive_class
        if not -num_classes <= k < num_classes:
            raise ValueError(
                f"config.predict.positive_class={k} but the model has {num_classes} classes"
            )
        return k % num_classes

    def resolve_negative(
        self, label_names: Sequence[str] | None, num_classes: int
    ) -> tuple[int, str] | None:
        """The lesion-free class as (index, name), named or given as an index; None unset."""
        name = self.negative_class
        if not name:
            return None
        names = [str(n) for n in (label_names or [])]
        if name in names:
            return names.index(name), name
        if name.isdigit() and int(name) < num_classes:
            k = int(name)
            return k, names[k] if names else name
        raise ValueError(
            f"config.predict.negative_class={name!r} is not a class of the model "
            f"(classes: {', '.join(names) or num_classes})"
        )


def num_classes(graphdef: nnx.GraphDef, state: nnx.State) -> int:
    """The number of classes of the model's linear head."""
    kernel, _ = quality_lib._head_paths(graphdef, state)
    flat = dict(nnx.to_flat_state(state))
    return int(flat[kernel].get_value().shape[-1])


def _image_size(path: str) -> tuple[int, int] | None:
    """(height, width) of an image file from its header (DICOM: decoded); None: unreadable."""
    try:
        with PIL.Image.open(path) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - DICOM or a bad file: try the full decoder
        try:
            decoded = image_io.decode_file(path)
            return decoded.height, decoded.width
        except Exception:  # noqa: BLE001 - the explain loop reports the file as an error
            return None


class FolderMasks:
    """The annotations of a folder's images, as masks at the source resolution."""

    def __init__(self, folder: str, files: Sequence[str], settings: FolderAnnotations):
        self.folder = os.path.abspath(folder)
        self.source = annotations_lib.source_for(
            settings.format, settings.path, self.folder, "folder"
        )
        if self.source is None:
            raise ValueError("config.predict.annotations names no annotations")
        self.files = [p for p in files if not self.source.excludes(self._raw(p))]
        refs = []
        for p in self.files:
            hw = _image_size(p)
            if hw is not None:
                rel, size = self._raw(p).relpath, os.path.getsize(p)
                refs.append(annotations_lib.ImageRef(rel, os.path.abspath(p), hw[1], hw[0], size))
        self.set = self.source.load(refs)
        # entries naming an image the folder does not hold (a folder with part of an
        # annotated set) are set aside; the other bad entries are errors (image unknown)
        missing = [e for e in self.set.errors if e.image is None and "not an image of" in e.problem]
        self.missing = [e.entry for e in missing]
        self.errors = [str(e) for e in self.set.errors if e not in missing]

    def _raw(self, path: str) -> layouts.RawFile:
        rel = os.path.relpath(os.path.abspath(path), self.folder).replace(os.sep, "/")
        return layouts.RawFile("", "", rel, os.path.abspath(path))

    def mask(self, relpath: str, height: int, width: int) -> np.ndarray | None:
        """bool (height, width) at the source resolution; None when the image is unknown."""
        ann = self.set.by_image.get(relpath.replace(os.sep, "/"))
        return None if ann is None else annotations_lib.rasterise(ann, height, width)

    def counts(self) -> dict[str, Any]:
        """What _meta.annotations reports: format, path, entries naming no image here."""
        return {
            "format": self.source.format,
            "path": self.source.path or "beside the images",
            "entries_without_image": len(self.missing),
            "entries_without_image_first": self.missing[:20],
        }


class FolderScorer:
    """explain_batches on_batch hook: per-image localisation and reliance of an annotated folder.

    Batches carry image, valid, id, index and image_hw (source (height, width)); `results`
    are the methods' CamResults. Rows are kept in the loop's order (its valid rows).
    """

    def __init__(
        self,
        masks: FolderMasks,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *,
        positive_class: int,
        reliance: bool = True,
        seed: int = 0,
    ):
        self.masks, self.graphdef, self.state = masks, graphdef, state
        self.positive_class, self.reliance, self.seed = positive_class, reliance, seed
        self.rows: dict[str, list] = {"known": [], "lesion": [], "masks": [], "hw": []}
        self.scores: dict[str, dict[str, list]] = {}
        self.probs: list[np.ndarray] = []  # (4, B, K) per batch, NaN off the positives
        self.placed: list[np.ndarray] = []

    def __call__(self, batch: Mapping[str, Any], valid: np.ndarray, results: dict) -> None:
        valid = np.asarray(valid, bool)
        size = np.asarray(batch["image"]).shape[1]
        ids, hw = np.asarray(batch["id"]).astype(str), np.asarray(batch["image_hw"])
        source, small = [], np.zeros((len(valid), size, size), bool)
        known = np.zeros(len(valid), bool)
        for i in np.flatnonzero(valid):
            m = self.masks.mask(ids[i], int(hw[i][0]), int(hw[i][1]))
            source.append(m)
            if m is not None:
                known[i] = True
                small[i] = annotations_lib.resize_mask(m, (size, size))
        lesion = small.reshape(len(valid), -1).any(axis=1) & known
        self.rows["known"].append(known[valid])
        self.rows["lesion"].append(lesion[valid])
        self.rows["masks"].append(small[valid])
        self.rows["hw"].append(hw[valid])
        for name, result in results.items():
            maps = np.asarray(result.maps)[valid].astype(np.float16)  # as the npz stores them
            self._score(name, maps, small[valid], source, hw[valid], lesion[valid])
        if self.reliance:
            self._reliance(batch, valid, np.where(lesion[:, None, None], small, False))

    def _score(self, name, maps, masks, source, hw, lesion) -> None:
        out = self.scores.setdefault(name, {k: [] for k in ("peak_x", "peak_y", "pg", "e", "i")})
        xs, ys = quality_lib.peak_positions(maps, hw)
        nan = np.full(len(maps), np.nan)
        pg, energy, overlap = nan.copy(), nan.copy(), nan.copy()
        idx = np.flatnonzero(lesion)
        if len(idx):
            pg[idx] = quality_lib.points_in_masks(xs[idx], ys[idx], [source[i] for i in idx])
            energy[idx] = quality_lib.energy_in_mask(maps[idx], masks[idx])
            overlap[idx] = quality_lib.iou(maps[idx], masks[idx])
        for key, value in zip(("peak_x", "peak_y", "pg", "e", "i"), (xs, ys, pg, energy, overlap)):
            out[key].append(value)

    def _reliance(self, batch, valid, masks) -> None:
        n_valid = int(valid.sum())
        if not masks.any():
            self.probs.append(np.full((4, n_valid, 0), np.nan))
            self.placed.append(np.zeros(n_valid, bool))
            return
        probs, placed = reliance_lib.reliance_batch(
            self.graphdef,
            self.state,
            np.asarray(batch["image"], np.float32),
            masks,
            np.asarray(batch["index"]),
            seed=self.seed,
        )
        off = ~masks.reshape(len(masks), -1).any(axis=1)
        probs[:, off] = np.nan
        self.probs.append(probs[:, valid])
        self.placed.append(placed[valid])

    # ------------------------------------------------------------------------- results
    def _cat(self, key: str) -> np.ndarray:
        return np.concatenate(self.rows[key]) if self.rows[key] else np.zeros(0)

    def reliance_probs(self) -> np.ndarray | None:
        """(4, N, K) over every row (NaN off the positives); None without reliance."""
        parts = [p for p in self.probs if p.shape[2]]
        if not parts:
            return None
        k = parts[0].shape[2]
        full = [p if p.shape[2] else np.full((4, p.shape[1], k), np.nan) for p in self.probs]
        return np.concatenate(full, axis=1)

    def per_image(self, name: str) -> dict[str, np.ndarray]:
        """Per-row {pointing_game, energy_in_mask, iou, peak_x, peak_y} of one method."""
        s = {k: np.concatenate(v) for k, v in self.scores[name].items()}
        return {
            "pointing_game": s["pg"],
            "energy_in_mask": s["e"],
            "iou": s["i"],
            "peak_x": s["peak_x"],
            "peak_y": s["peak_y"],
        }


def npz_rows(scorer: FolderScorer) -> dict[str, dict[str, np.ndarray]]:
    """{method: per-row arrays} added to each heatmaps/folder_<method>.npz: mask_known,
    lesion (scored), masks (S x S, bool), image_height, image_width, peak_x, peak_y,
    pointing_game, energy_in_mask, iou (NaN where not scored), p_<condition> (NaN off the
    positives or without reliance)."""
    hw = scorer._cat("hw").reshape(-1, 2)
    common = {
        "mask_known": scorer._cat("known").astype(bool),
        "lesion": scorer._cat("lesion").astype(bool),
        "masks": scorer._cat("masks").astype(bool),
        "image_height": hw[:, 0].astype(np.int32),
        "image_width": hw[:, 1].astype(np.int32),
    }
    probs = scorer.reliance_probs()
    if probs is not None:
        target = probs[:, :, scorer.positive_class]
        common.update({key: target[c] for c, key in enumerate(RELIANCE_KEYS)})
    return {name: {**common, **scorer.per_image(name)} for name in scorer.scores}


def detection(reliance: dict[str, Any]) -> dict[str, Any]:
    """How many annotated lesion images the model decides are the positive class (an
    all-lesion external folder: its sensitivity), with a Wilson 95% interval."""
    n, hits = int(reliance["n_images"]), int(reliance["n_predicted_target"])
    return {
        "n_images": n,
        "n_predicted_positive": hits,
        "sensitivity": hits / n if n else None,
        "sensitivity_ci95": metrics_lib.wilson_interval(hits, n),
        "decision": reliance["decision"],
    }


def any_lesion_probs(probs: np.ndarray, negative_class: int) -> np.ndarray:
    """(..., K) class probabilities -> (..., 2): [p(lesion-free), p(any other class)]."""
    p_negative = probs[..., negative_class]
    return np.stack([p_negative, 1.0 - p_negative], axis=-1)


def any_lesion(
    probs: np.ndarray,
    placed: np.ndarray,
    *,
    negative_class: int,
    negative_name: str,
    threshold: float | None,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """Lesion reliance and detection of "any lesion class" (probabilities (4, N, K) of the
    lesion rows): the model's classes collapsed to lesion-free vs the rest, for a folder of
    lesions of any kind (a 4-class brain model on tumours of unknown type). A model with two
    classes keeps its decision threshold; with more, "any lesion" is decided when the other
    classes together are more probable than the lesion-free one."""
    k = probs.shape[-1]
    keep_threshold = threshold if k == 2 and negative_class == 0 else None
    section = reliance_lib.summarise(
        any_lesion_probs(probs, negative_class),
        np.ones(probs.shape[1], np.int64),
        placed,
        threshold=keep_threshold,
        samples=samples,
        seed=seed,
    )
    if keep_threshold is None:
        section["decision"] = f"any lesion when p(not {negative_name}) > p({negative_name})"
    section["targets"] = f"any class but {negative_name} (class {negative_class})"
    section["negative_class"] = negative_name
    return {"lesion_reliance": section, "detection": detection(section)}


def folder_quality(
    scorer: FolderScorer,
    settings: FolderAnnotations,
    *,
    threshold: float | None,
    meta: dict[str, Any],
    negative: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """explain_quality_folder.json: per method localisation (means, ci95, paired), the
    lesion_reliance and detection sections, with `negative` (the lesion-free class's
    (index, name)) also `any_lesion` ({lesion_reliance, detection} of any lesion class),
    and _meta."""
    lesion = scorer._cat("lesion").astype(bool)
    samples, seed = settings.bootstrap_samples, settings.seed
    per_image = {
        name: {k: v[lesion] for k, v in scorer.per_image(name).items()} for name in scorer.scores
    }
    paired = quality_lib.paired_comparisons(per_image, samples=samples, seed=seed)
    out: dict[str, Any] = {
        name: {
            "n_images": int(lesion.sum()),
            **quality_lib.summarise_localisation(scores, samples=samples, seed=seed),
            "paired": paired[name],
        }
        for name, scores in per_image.items()
    }
    probs = scorer.reliance_probs()
    if probs is not None and lesion.any():
        out["lesion_reliance"] = reliance_lib.summarise(
            probs[:, lesion],
            np.full(int(lesion.sum()), scorer.positive_class),
            np.concatenate(scorer.placed)[lesion],
            threshold=threshold,
            samples=samples,
            seed=seed,
        )
        out["lesion_reliance"]["targets"] = f"positive class {scorer.positive_class}"
        out["detection"] = detection(out["lesion_reliance"])
        if negative is not None:
            out["any_lesion"] = any_lesion(
                probs[:, lesion],
                np.concatenate(scorer.placed)[lesion],
                negative_class=negative[0],
                negative_name=negative[1],
                threshold=threshold,
                samples=samples,
                seed=seed,
            )
    known = scorer._cat("known").astype(bool)
    out["_meta"] = {
        **meta,
        "annotations": scorer.masks.counts(),
        "mask_counts": {
            "annotated": int(lesion.sum()),
            "empty": int((known & ~lesion).sum()),
            "unknown": int((~known).sum()),
        },
        "annotation_errors": scorer.masks.errors[:MAX_LISTED],
        "annotation_error_count": len(scorer.masks.errors),
        "n_localisation": int(lesion.sum()),
        "targets": f"positive class {scorer.positive_class}"
        if negative is None
        else f"maps: positive class {scorer.positive_class}, or with more than two classes "
        f"each image's most probable class but {negative[1]}",
        "geometry": GEOMETRY,
        "pointing_game": POINTING,
        "energy_iou": AREA,
        "bootstrap_samples": samples,
        "seed": seed,
    }
    return out


__all__ = [
    "FolderAnnotations",
    "FolderMasks",
    "FolderScorer",
    "folder_quality",
    "npz_rows",
    "num_classes",
]
