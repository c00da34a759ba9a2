"""The `explain` and `predict` modes: saliency maps, quality scores and predictions on disk.

    result = explain_split(graphdef, state, data_dir=..., split="test", workdir=...,
                           preprocess=Preprocess(64, 1, "unit"))

writes, for each method, `WORKDIR/heatmaps/<split>_<method>.npz` (ids, labels,
predictions, probabilities, targets = the predicted class explained, raw, maps (float16,
[0, 1]), index), a `WORKDIR/heatmaps/<split>_grid.npz` of the report's grid cases, and,
with `quality` settings (the default), `WORKDIR/explain_quality.json`: every registry
method (the nine of `QUALITY_METHODS`) scored on a fixed subset of the split by
`quality.score_subset` (the first `QualitySettings.n_images` images with a non-empty lesion
mask, or the first ones when the dataset has no masks), explaining the TRUE class, with
localisation (masks only), deletion/insertion AUC, cascading weight randomisation ("ends":
head only and all layers) and a cheap label randomisation (the head refit on shuffled
labels by ridge regression unless the settings carry `label_state`, a model trained on
shuffled labels); localisation comes with bootstrap intervals and paired differences, and
with masks the `lesion_reliance` section (`xmedjax.explain.reliance`).

`explain_folder` and `predict_folder` do the same for a folder of the user's PNG/JPEG/DICOM
files and write `WORKDIR/predictions_folder.{csv,json}` (`predictions_io`), one row per
file, with status "error" for a file that cannot be read (the rest goes on). Both paths run
one batch loop, `explain_batches`, whose `choose_targets` rule picks each image's class
once: the class explained is the class reported (a val-chosen threshold included), except
in an annotated folder (`annotations=annotated.FolderAnnotations(...)`), whose maps explain
the lesion class and are scored against the outlines into
`WORKDIR/explain_quality_folder.json` (`xmedjax.explain.annotated`).
Progress bars go to stderr (tqdm). Everything with side effects lives here, in `export.py`
and `predictions_io.py`; the maths is in pure jitted functions of (graphdef, state, inputs).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from data_prep import image_io
from xmedjax import input_pipeline, json_io, logging_utils, metrics, names
from xmedjax.explain import annotated, export, predictions_io
from xmedjax.explain import quality as quality_lib
from xmedjax.explain.cams import auto_cam_layer, cam_layer_caveat, compute_methods
from xmedjax.explain.capture import forward_fn
from xmedjax.input_pipeline import Preprocess

QUALITY_METHODS = names.QUALITY_METHODS  # every registry method, the random baseline last
# Options that keep the quality stage cheap on CPU; callers may override per method.
FAST_OPTS: dict[str, dict] = {
    "scorecam": {"chunk": 32},
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 8},  # the same stack length as IG: one compile serves both
}


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """What the quality stage of `explain_split` scores: the first `n_images` images (with a
    known lesion), `steps` deletion/insertion steps, `methods`, for label randomisation
    `label_state` (a model trained on shuffled labels; None: the ridge head refit),
    `bootstrap_samples` for the intervals and whether to measure lesion `reliance`."""

    n_images: int = 32
    steps: int = 10
    methods: tuple[str, ...] = QUALITY_METHODS
    label_state: nnx.State | None = dataclasses.field(default=None, compare=False)
    seed: int = 0
    bootstrap_samples: int = 1000  # localisation and lesion-reliance intervals
    reliance: bool = True  # the lesion_reliance section (datasets with masks)

    def new_subset(self) -> quality_lib.QualitySubset:
        """An empty subset: n_images, plus 2 * n_images for the head refit (no label_state)."""
        fit_images = 0 if self.label_state is not None else 2 * self.n_images
        return quality_lib.QualitySubset(self.n_images, fit_images)

    def score(
        self,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        subset: quality_lib.QualitySubset,
        *,
        split: str,
        method_opts: dict[str, dict],
        layer: str | None,
        batch_size: int,
    ) -> dict[str, dict] | None:
        """`quality.score_subset` with these settings (None for an empty subset)."""
        return quality_lib.score_subset(
            graphdef,
            state,
            subset,
            self.methods,
            split=split,
            method_opts=method_opts,
            steps=self.steps,
            layer=layer,
            label_state=self.label_state,
            seed=self.seed,
            batch_size=batch_size,
            bootstrap_samples=self.bootstrap_samples,
            reliance=self.reliance,
        )


def predict_fn(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(float32 logits, softmax probabilities) of a batch in eval mode (the shared jitted forward)."""
    logits, _ = forward_fn(graphdef, state, images, None)
    return logits, jax.nn.softmax(logits, axis=-1)


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """int32 classes: argmax, or for two classes with a threshold class 1 when p1 >= threshold
    (`metrics.predict`, the rule of metrics.json)."""
    probs = np.asarray(probs)
    if threshold is None or probs.shape[1] != 2:
        return np.argmax(probs, axis=1).astype(np.int32)
    return metrics.predict(probs, threshold).astype(np.int32)


# (probabilities (B, K) of a batch, the batch) -> int32 (B,) classes
TargetChooser = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]


def choose_targets(
    *, threshold: float | None = None, predictions: np.ndarray | None = None
) -> TargetChooser:
    """The rule that gives each image its predicted class, which is also the class explained.

    `predictions` (one class per example of a split, by `index`) when given, else `decide`
    on the batch's probabilities with `threshold`.
    """
    if predictions is not None:
        given = np.asarray(predictions, np.int32)

        def by_index(probs: np.ndarray, batch: Mapping[str, Any]) -> np.ndarray:
            valid = np.asarray(batch["valid"], bool)
            return given[np.where(valid, np.asarray(batch["index"]), 0)]

        return by_index
    return lambda probs, batch: decide(probs, threshold)


def explain_batches(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batches: Iterable[Mapping[str, Any]],
    *,
    choose: TargetChooser,
    methods: Sequence[str] = (),
    method_opts: dict[str, dict] | None = None,
    cam_layer: str | None = None,
    on_batch: Callable[[Mapping[str, Any], np.ndarray, dict], None] | None = None,
    explain_class: TargetChooser | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """THE explain loop: predictions and `methods`' maps of every valid row of `batches`.

    Each batch is a dict of numpy arrays of one constant batch size (one compile): image
    (B, H, W, C), valid (B,) bool, id (B,) str, index (B,), label (B,) (-1: unknown), mask?.
    `choose(probabilities, batch)` picks the classes that are both explained and returned
    as `predictions`, unless `explain_class` (same signature) picks other classes to
    explain (an annotated folder: the lesion class; the maps' `targets` say which).
    `on_batch(batch, valid, results)` sees every batch and its maps.
    Returns (rows: ids, index, labels, probabilities, predictions; {method: raw, maps
    (float16), targets}), valid rows only, in batch order.
    """
    methods = tuple(methods)
    rows: dict[str, list] = {
        k: [] for k in ("ids", "index", "labels", "probabilities", "predictions")
    }
    per_method = {m: {"raw": [], "maps": [], "targets": []} for m in methods}
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        images = jnp.asarray(batch["image"], jnp.float32)
        _, probs = predict_fn(graphdef, state, images)
        probs = np.asarray(probs)
        targets = np.asarray(choose(probs, batch), np.int32)
        explained = targets if explain_class is None else explain_class(probs, batch)
        results = (
            compute_methods(
                graphdef,
                state,
                images,
                jnp.asarray(explained, jnp.int32),
                methods,
                method_opts,
                cam_layer,
            )
            if methods
            else {}
        )
        rows["ids"].append(np.asarray(batch["id"]).astype(str)[valid])
        rows["index"].append(np.asarray(batch["index"])[valid])
        rows["labels"].append(np.asarray(batch["label"]).astype(np.int32)[valid])
        rows["probabilities"].append(probs.astype(np.float32)[valid])
        rows["predictions"].append(targets[valid])
        for name, result in results.items():
            per_method[name]["raw"].append(np.asarray(result.raw, np.float32)[valid])
            per_method[name]["maps"].append(np.asarray(result.maps)[valid].astype(np.float16))
            per_method[name]["targets"].append(np.asarray(result.targets, np.int32)[valid])
        if on_batch is not None:
            on_batch(batch, valid, results)
    if not rows["ids"]:  # no batch at all (a folder of unreadable files)
        return {k: np.zeros(0) for k in rows}, {m: {} for m in methods}
    stacked = {k: np.concatenate(v) for k, v in rows.items()}
    return stacked, {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in per_method.items()}


def _write_heatmaps(
    workdir: str,
    name: str,
    rows: dict,
    per_method: dict,
    *,
    with_index: bool,
    per_row: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, str]:
    """WORKDIR/heatmaps/<name>_<method>.npz for every method, with `per_row[method]`'s
    arrays (one row per image) when given; returns {method: path}."""
    extra = {"index": rows["index"]} if with_index else {}
    return {
        method: export.write_heatmaps(
            export.heatmap_path(workdir, name, method),
            ids=rows["ids"],
            **extra,
            **(per_row or {}).get(method, {}),
            labels=rows["labels"],
            predictions=rows["predictions"],
            probabilities=rows["probabilities"],
            targets=arrays["targets"],
            raw=arrays["raw"],
            maps=arrays["maps"],
        )
        for method, arrays in per_method.items()
    }


def _label_names(data_dir: str) -> list[str] | None:
    try:
        return list(input_pipeline.read_dataset_info(data_dir).label_names)
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None


def method_options(method_opts: dict[str, dict] | None = None) -> dict[str, dict]:
    """FAST_OPTS updated per method by `method_opts` (the options every quality stage uses)."""
    out = {k: dict(v) for k, v in FAST_OPTS.items()}
    for k, v in (method_opts or {}).items():
        out.setdefault(k, {}).update(v)
    return out


def _cam_layer(graphdef, state, preprocess: Preprocess, cam_layer: str | None) -> str | None:
    return auto_cam_layer(graphdef, state, preprocess.shape) if cam_layer == "auto" else cam_layer


def _progress(items: Iterable, desc: str, enabled: bool, **kw) -> Iterable:
    return tqdm(items, desc=desc, unit="batch", disable=not enabled, **kw)


# ----------------------------------------------------------------------------- prepared splits


def _split_batches(data_dir: str, split: str, batch_size: int, preprocess: Preprocess):
    """A prepared split's eval batches, all of them in this process."""
    return input_pipeline.make_eval_iterator(
        data_dir,
        split,
        global_batch_size=batch_size,
        preprocess=preprocess,
        shard_index=0,
        shard_count=1,
    )


def explain_split(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    data_dir: str,
    split: str,
    workdir: str,
    preprocess: Preprocess,
    methods: Sequence[str] = ("gradcam",),
    batch_size: int = 32,
    quality: QualitySettings | None = QualitySettings(),
    method_opts: dict[str, dict] | None = None,
    grid_per_group: int = 2,
    cam_layer: str | None = "auto",
    predictions: np.ndarray | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Saliency maps of a prepared split for `methods`, plus the quality scores.

    `predictions` (optional, one class per example of the split, by index, e.g. from a
    tuned decision threshold) replaces the argmax as the explained class and as the npz's
    `predictions`. `quality=None` skips the quality stage.

    `cam_layer` is the CAM target layer: "auto" (the model's own unless its grid is under
    7x7, else the deepest finer stage: `cams.auto_cam_layer`), None (the model's own) or a
    dotted path such as "layer3".

    Returns {"heatmaps": {method: npz path}, "grid": path, "quality": scores or None,
    "quality_path": path or None, "seconds": {"maps": s, "quality": s}, "cam_layer": ...,
    "cam_layer_caveat": `cams.cam_layer_caveat` of `methods` (also printed) or None}.
    """
    methods, opts = tuple(methods), method_options(method_opts)
    cam_layer = _cam_layer(graphdef, state, preprocess, cam_layer)
    caveat = cam_layer_caveat(methods, cam_layer)
    if caveat:
        print(f"note: {caveat}", flush=True)
    started = time.time()
    subset = None if quality is None else quality.new_subset()
    batches = _split_batches(data_dir, split, batch_size, preprocess)
    rows, per_method = explain_batches(
        graphdef,
        state,
        _progress(batches, f"explain {split}", progress, leave=False),
        choose=choose_targets(predictions=predictions),
        methods=methods,
        method_opts=opts,
        cam_layer=cam_layer,
        on_batch=None if subset is None else (lambda batch, valid, _: subset.add(batch, valid)),
    )
    out: dict[str, Any] = {
        "heatmaps": _write_heatmaps(workdir, split, rows, per_method, with_index=True)
    }
    out.update(grid=None, quality=None, quality_path=None, seconds={}, cam_layer=cam_layer)
    out["cam_layer_caveat"] = caveat
    if methods:
        maps = {m: arrays["maps"] for m, arrays in per_method.items()}
        out["grid"] = _write_grid(workdir, split, data_dir, rows, maps, grid_per_group, preprocess)
    out["seconds"]["maps"] = round(time.time() - started, 2)
    if subset is not None:
        scores = quality.score(
            graphdef,
            state,
            subset,
            split=split,
            method_opts=opts,
            layer=cam_layer,
            batch_size=batch_size,
        )
        if scores is not None:
            path = os.path.join(workdir, "explain_quality.json")
            out["quality"], out["quality_path"] = scores, json_io.write_json(path, scores)
            out["seconds"]["quality"] = scores["_meta"]["seconds"]
    return out


def _write_grid(
    workdir: str,
    split: str,
    data_dir: str,
    rows: dict[str, np.ndarray],
    maps_by_method: dict[str, np.ndarray],
    per_group: int,
    preprocess: Preprocess,
) -> str | None:
    """Stores the report grid's cases (display images, every method's maps, the lesion masks
    and mask_known when the split has masks) in <split>_grid.npz."""
    predictions = rows["predictions"]
    cases = export.select_grid_cases(rows["labels"], predictions, rows["probabilities"], per_group)
    picked = sorted({i for per_class in cases for group in per_class for i in group})
    if not picked:
        return None
    loaded = input_pipeline.load_examples(
        data_dir, split, rows["index"][picked], preprocess=preprocess
    )
    display = np.stack(
        [np.round(255 * export.display_image(im)).astype(np.uint8) for im in loaded["image"]]
    )
    remap = {i: j for j, i in enumerate(picked)}
    local = [[[remap[i] for i in group] for group in per_class] for per_class in cases]
    extra = {f"maps_{m}": v[picked] for m, v in maps_by_method.items()}
    if "mask" in loaded:  # the report draws the lesion outline of the known masks
        extra["masks"] = quality_lib.binarize_masks(loaded["mask"])
        extra["mask_known"] = np.asarray(loaded.get("mask_known", np.ones(len(picked), bool)))
    path = os.path.join(workdir, "heatmaps", f"{split}_grid.npz")
    np.savez_compressed(
        path,
        images=display,
        labels=rows["labels"][picked],
        predictions=predictions[picked],
        probabilities=rows["probabilities"][picked],
        ids=rows["ids"][picked],
        cases=np.array(json.dumps(local)),
        methods=np.array(list(maps_by_method)),
        label_names=np.array(_label_names(data_dir) or []),
        **extra,
    )
    return path


# ----------------------------------------------------------------------------- user folders


class _FolderImages:
    """The readable files of a folder as `explain_batches` batches; the others in `errors`.

    A file that cannot be read or decoded (truncated, not an image, a DICOM without pixel
    data or without its codec) is left out of the batches and recorded as
    errors[file index] = message: one bad file does not stop the folder. Batches are full
    but the last, padded with copies of its first image (valid False): one compile.
    """

    def __init__(
        self, folder: str, files: Sequence[str], *, batch_size: int, preprocess: Preprocess
    ):
        self.files, self.batch_size, self.preprocess = list(files), batch_size, preprocess
        self.ids = [os.path.relpath(p, folder) for p in self.files]
        self.errors: dict[int, str] = {}

    def _load(self, index: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(model input, source (height, width)) of one file; None (and an error) if unreadable."""
        path = self.files[index]
        try:
            pixels = image_io.decode_file(path).pixels
            image = input_pipeline.preprocess_pixels(pixels, preprocess=self.preprocess)
            return image, pixels.shape[:2]
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the folder
            message = str(e).removeprefix(f"{path}: ")
            self.errors[index] = f"{type(e).__name__}: {message}"
            return None

    def _batch(self, pending: list[tuple[int, tuple]]) -> dict[str, np.ndarray]:
        pad = self.batch_size - len(pending)
        index = np.array([i for i, _ in pending] + [-1] * pad)
        images = [im for _, (im, _) in pending]
        sizes = [hw for _, (_, hw) in pending]
        return {
            "image": np.stack(images + [images[0]] * pad, dtype=np.float32),
            "valid": index >= 0,
            "id": np.array([self.ids[i] for i, _ in pending] + [""] * pad),
            "index": index,
            "label": np.full(self.batch_size, -1, np.int32),
            "image_hw": np.array(sizes + [sizes[0]] * pad, np.int32),  # source (height, width)
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pending: list[tuple[int, tuple]] = []
        for index in range(len(self.files)):
            loaded = self._load(index)
            if loaded is not None:
                pending.append((index, loaded))
            if pending and (len(pending) == self.batch_size or index == len(self.files) - 1):
                yield self._batch(pending)
                pending = []

    def table(self, rows: dict[str, np.ndarray]) -> list[dict]:
        """Prediction rows of every file in folder order: `rows` (explain_batches'), errors."""
        ok = predictions_io.prediction_rows(rows["ids"], rows["predictions"], rows["probabilities"])
        by_index = dict(zip(rows["index"].tolist(), ok))
        return [
            by_index[i] if i in by_index else predictions_io.error_row(self.ids[i], self.errors[i])
            for i in range(len(self.files))
        ]


# what a folder run writes (overlays are staged in the hidden folder, then moved in)
_FOLDER_OUTPUTS = (
    "predictions_folder.csv",
    "predictions_folder.json",
    "overlays",
    "explain_quality_folder.json",
)
_OVERLAY_STAGING = ".overlays.partial"


def _clear_folder_outputs(workdir: str) -> None:
    """Removes what an earlier folder run wrote (predictions_folder.*, overlays/,
    heatmaps/folder_*.npz, explain_quality_folder.json, a killed run's staged overlays), so
    that a run that fails leaves nothing stale that looks fresh and overlays of two runs
    never mix."""
    stale = [os.path.join(workdir, name) for name in (*_FOLDER_OUTPUTS, _OVERLAY_STAGING)]
    stale += glob.glob(os.path.join(glob.escape(workdir), "heatmaps", "folder_*.npz"))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _overlay_writer(
    folder: str, methods: Sequence[str]
) -> Callable[[Mapping[str, Any], np.ndarray, dict], None]:
    """on_batch hook: FOLDER/<method>/<relative path, extension kept>.png (a.jpg -> a.jpg.png,
    so a.jpg, a.png and a.dcm keep three overlays) for each of `methods`."""

    def write(batch: Mapping[str, Any], valid: np.ndarray, results: dict) -> None:
        ids, images = np.asarray(batch["id"])[valid], np.asarray(batch["image"])[valid]
        for name, result in results.items():
            if name not in methods:
                continue
            for rel, image, heat in zip(ids, images, np.asarray(result.maps)[valid]):
                export.save_overlay_png(os.path.join(folder, name, f"{rel}.png"), image, heat)

    return write


def _hooks(*hooks: Callable | None) -> Callable | None:
    """One on_batch hook calling each given hook in turn (None when there is none)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def call(batch: Mapping[str, Any], valid: np.ndarray, results: dict) -> None:
        for hook in live:
            hook(batch, valid, results)

    return call


@dataclasses.dataclass
class _FolderScoring:
    """An annotated folder's scoring: its masks, the on_batch scorer, the lesion class and
    the lesion-free class (None unless config.predict.negative_class names it)."""

    settings: annotated.FolderAnnotations
    masks: annotated.FolderMasks
    scorer: annotated.FolderScorer
    negative: tuple[int, str] | None = None  # (index, name)

    @classmethod
    def start(
        cls, graphdef, state, folder: str, files: Sequence[str], settings, label_names=None
    ) -> _FolderScoring:
        masks = annotated.FolderMasks(folder, files, settings)
        if masks.missing:
            logging_utils.log(
                f"{len(masks.missing)} annotation entries name images that are not under "
                f"{folder} (ignored), e.g. {masks.missing[0]}"
            )
        if masks.errors:
            logging_utils.log(
                f"{len(masks.errors)} bad annotation(s) skipped (their images are unknown, "
                f"listed in explain_quality_folder.json): {masks.errors[0]}"
            )
        k = annotated.num_classes(graphdef, state)
        positive = settings.resolve_class(k)
        negative = settings.resolve_negative(label_names, k)
        scorer = annotated.FolderScorer(
            masks,
            graphdef,
            state,
            positive_class=positive,
            reliance=settings.reliance,
            seed=settings.seed,
        )
        return cls(settings, masks, scorer, negative)

    def explain_class(self) -> TargetChooser:
        """The positive class; with a lesion-free class and more than two classes, each
        image's most probable lesion class (the maps explain the tumour the model sees)."""
        positive, negative = self.scorer.positive_class, self.negative

        def most_probable_lesion(probs, batch):
            probs = np.array(probs, np.float64)
            probs[:, negative[0]] = -np.inf
            return np.argmax(probs, axis=-1).astype(np.int32)

        if (
            negative is not None
            and annotated.num_classes(self.scorer.graphdef, self.scorer.state) > 2
        ):
            return most_probable_lesion
        return lambda probs, batch: np.full(len(probs), positive, np.int32)

    def write(
        self,
        workdir: str,
        threshold: float | None,
        meta: dict,
        *,
        label_names: Sequence[str] | None,
        started: float,
    ) -> tuple[dict, str]:
        """explain_quality_folder.json: (scores, path); `meta` gains the positive class's
        name and the seconds since `started`."""
        if label_names is not None:
            meta["positive_class_name"] = str(label_names[self.scorer.positive_class])
        meta["seconds"] = round(time.time() - started, 2)
        scores = annotated.folder_quality(
            self.scorer,
            self.settings,
            threshold=threshold,
            meta=meta,
            negative=self.negative,
        )
        path = os.path.join(workdir, "explain_quality_folder.json")
        return scores, json_io.write_json(path, scores)


def _folder_files(
    graphdef, state, folder: str, workdir: str, annotations, label_names=None
) -> tuple[list[str], _FolderScoring | None]:
    """The folder's image files (annotation files left out) and its scoring (None without
    annotations); clears the previous folder outputs once there are images."""
    files = input_pipeline.list_image_files(folder)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG/DICOM files under {folder}")
    _clear_folder_outputs(workdir)
    if annotations is None:
        return files, None
    scoring = _FolderScoring.start(graphdef, state, folder, files, annotations, label_names)
    if not scoring.masks.files:
        raise FileNotFoundError(f"no images under {folder}, only annotation files")
    return scoring.masks.files, scoring


def explain_folder(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    folder: str,
    workdir: str,
    preprocess: Preprocess,
    methods: Sequence[str] = ("gradcam",),
    batch_size: int = 32,
    label_names: Sequence[str] | None = None,
    threshold: float | None = None,
    method_opts: dict[str, dict] | None = None,
    overlays: bool = True,
    cam_layer: str | None = "auto",
    progress: bool = True,
    annotations: annotated.FolderAnnotations | None = None,
) -> dict[str, Any]:
    """Predictions and maps for every PNG/JPEG/DICOM file under `folder`.

    Each image's class is `decide(probabilities, threshold)` (two classes with a threshold:
    class 1 when its probability >= threshold, else argmax), and that class is the one
    explained. Writes WORKDIR/heatmaps/folder_<method>.npz (labels = -1: unknown),
    WORKDIR/overlays/<method>/<relative path>.png and WORKDIR/predictions_folder.{csv,json}
    with a row per file: status "ok", or "error" and the error for a file that could not be
    read (left out of the maps; the count is printed). The previous run's folder outputs are
    removed first, overlays are written aside and moved in at the end, the predictions last.
    Raises RuntimeError, after writing the predictions, when no file could be read.

    With `annotations` (`annotated.FolderAnnotations`), every map explains the lesion class
    (npz `targets`; `predictions` stay the decisions), `random` is added to the methods when
    missing (the baseline; no overlays), each npz gains per-image rows (`annotated.npz_rows`)
    and WORKDIR/explain_quality_folder.json holds localisation with intervals and lesion
    reliance (`annotated.folder_quality`); annotation files inside `folder` are not images.
    Returns {"heatmaps": {method: path}, "predictions": {"csv": path, "json": path},
    "quality": scores or None, "quality_path": path or None}.
    """
    started, methods = time.time(), tuple(methods)
    files, scoring = _folder_files(graphdef, state, folder, workdir, annotations, label_names)
    explained = methods + (("random",) if scoring and "random" not in methods else ())
    images = _FolderImages(folder, files, batch_size=batch_size, preprocess=preprocess)
    layer = _cam_layer(graphdef, state, preprocess, cam_layer) if explained else None
    staging = os.path.join(workdir, _OVERLAY_STAGING)
    try:
        rows, per_method = explain_batches(
            graphdef,
            state,
            _progress(images, "explain" if explained else "predict", progress),
            choose=choose_targets(threshold=threshold),
            methods=explained,
            method_opts=method_options(method_opts),
            cam_layer=layer,
            on_batch=_hooks(
                _overlay_writer(staging, methods) if overlays and methods else None,
                scoring.scorer if scoring else None,
            ),
            explain_class=scoring.explain_class() if scoring else None,
        )
        per_row = annotated.npz_rows(scoring.scorer) if scoring and len(rows["ids"]) else None
        heatmaps = (
            _write_heatmaps(workdir, "folder", rows, per_method, with_index=False, per_row=per_row)
            if len(rows["ids"])
            else {}
        )
        if os.path.isdir(staging):
            os.replace(staging, os.path.join(workdir, "overlays"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out = {"heatmaps": heatmaps, "quality": None, "quality_path": None}
    if scoring is not None and len(rows["ids"]):
        meta = {"folder": folder, "n_files": len(files), "n_images": int(len(rows["ids"]))}
        meta.update(cam_layer=layer or "model target", methods=list(explained))
        meta["cam_layer_caveat"] = cam_layer_caveat(explained, layer)
        out["quality"], out["quality_path"] = scoring.write(
            workdir, threshold, meta, label_names=label_names, started=started
        )
    out["predictions"] = _write_folder_predictions(workdir, folder, images, rows, label_names)
    return out


def _write_folder_predictions(
    workdir: str, folder: str, images: _FolderImages, rows: dict, label_names
) -> dict[str, str]:
    """predictions_folder.{csv,json}; raises RuntimeError when no file could be read."""
    table = images.table(rows)
    paths = predictions_io.write_predictions(workdir, "predictions_folder", table, label_names)
    n_files = len(images.files)
    n_ok = n_files - len(images.errors)
    logging_utils.log(
        f"predicted {n_ok} of {n_files} files under {folder}; {len(images.errors)} could "
        f"not be read (status error in {paths['csv']})"
    )
    if not n_ok:
        raise RuntimeError(f"none of the {n_files} files under {folder} could be read")
    return paths


def predict_folder(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    folder: str,
    workdir: str,
    preprocess: Preprocess,
    methods: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Predict mode: `explain_folder` with no maps unless `methods` are named (same keywords:
    batch_size, label_names, threshold, method_opts, overlays, cam_layer, progress,
    annotations)."""
    return explain_folder(
        graphdef,
        state,
        folder=folder,
        workdir=workdir,
        preprocess=preprocess,
        methods=methods,
        **kwargs,
    )


__all__ = [
    "FAST_OPTS",
    "QUALITY_METHODS",
    "QualitySettings",
    "choose_targets",
    "decide",
    "explain_batches",
    "explain_folder",
    "explain_split",
    "predict_fn",
    "predict_folder",
]
