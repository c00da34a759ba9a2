"""The `explain` and `predict` modes: saliency maps, quality scores and predictions on disk.

    result = explain_split(graphdef, state, data_dir=..., split="test", workdir=...,
                           image_size=64, channels=1, normalization="unit")

writes, for each method, `WORKDIR/heatmaps/<split>_<method>.npz` (ids, labels,
predictions, probabilities, targets = the predicted class explained, raw, maps (float16,
[0, 1]), index), a `WORKDIR/heatmaps/<split>_grid.npz` of the report's grid cases, and,
with `quality=True`, `WORKDIR/explain_quality.json`: every registry method (the nine of
`QUALITY_METHODS`) scored on a fixed subset of the split (the first `quality_images`
images with a non-empty lesion mask, or the first ones when the dataset has no masks),
explaining the TRUE class, with localisation (masks only), deletion/insertion AUC,
cascading weight randomisation ("ends": head only and all layers) and a cheap label
randomisation (the head refit on shuffled labels by ridge regression unless the caller
passes `label_state`, a model trained on shuffled labels).

`explain_folder`, `predict_folder` and `predict_split` do the same for a folder of the
user's PNG/JPEG/DICOM files or a prepared split. Progress bars go to stderr (tqdm).
Everything with side effects lives here and in `export.py`; the maths is in pure jitted
functions of (graphdef, state, inputs).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from xmedjax import names
from xmedjax.explain import export
from xmedjax.explain import quality as quality_lib
from xmedjax.explain.cams import auto_cam_layer, compute_methods
from xmedjax.explain.capture import forward_fn

QUALITY_METHODS = names.QUALITY_METHODS  # every registry method, the random baseline last
# Options that keep the quality stage cheap on CPU; callers may override per method.
FAST_OPTS: dict[str, dict] = {
    "scorecam": {"chunk": 32},
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 8},  # the same stack length as IG: one compile serves both
}


def predict_fn(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(float32 logits, softmax probabilities) of a batch in eval mode (the shared jitted forward)."""
    logits, _ = forward_fn(graphdef, state, images, None)
    return logits, jax.nn.softmax(logits, axis=-1)


def _batches(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    normalization: str,
) -> Iterable[dict]:
    from xmedjax import input_pipeline

    return input_pipeline.make_eval_iterator(
        data_dir,
        split,
        global_batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
        shard_index=0,
        shard_count=1,
    )


def _label_names(data_dir: str) -> list[str] | None:
    try:
        from xmedjax import input_pipeline

        return list(input_pipeline.read_dataset_info(data_dir).label_names)
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None


def _merge_opts(method_opts: dict[str, dict] | None) -> dict[str, dict]:
    out = {k: dict(v) for k, v in FAST_OPTS.items()}
    for k, v in (method_opts or {}).items():
        out.setdefault(k, {}).update(v)
    return out


def explain_split(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    data_dir: str,
    split: str,
    workdir: str,
    image_size: int,
    channels: int,
    normalization: str,
    methods: Sequence[str] = ("gradcam",),
    batch_size: int = 32,
    quality: bool = True,
    quality_images: int = 32,
    quality_steps: int = 10,
    quality_methods: Sequence[str] = QUALITY_METHODS,
    method_opts: dict[str, dict] | None = None,
    label_state: nnx.State | None = None,
    grid_per_group: int = 2,
    cam_layer: str | None = "auto",
    predictions: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Saliency maps of a prepared split for `methods`, plus the quality scores.

    `predictions` (optional, one class per example of the split, by index, e.g. from a
    tuned decision threshold) replaces the argmax as the explained class and as the npz's
    `predictions`.

    `cam_layer` is the CAM target layer: "auto" (the model's own unless its grid is under
    7x7, else the deepest finer stage: `cams.auto_cam_layer`), None (the model's own) or a
    dotted path such as "layer3".

    Returns {"heatmaps": {method: npz path}, "grid": path, "quality": scores or None,
    "quality_path": path or None, "seconds": {"maps": s, "quality": s}}.
    """
    methods = tuple(methods)
    opts = _merge_opts(method_opts)
    if cam_layer == "auto":
        cam_layer = auto_cam_layer(graphdef, state, (image_size, image_size, channels))
    started = time.time()
    collected: dict[str, list] = {k: [] for k in ("ids", "index", "labels", "logits", "probs")}
    per_method: dict[str, dict[str, list]] = {
        m: {"raw": [], "maps": [], "targets": []} for m in methods
    }
    subset: dict[str, list] = {"images": [], "labels": [], "masks": []}
    label_fit: dict[str, list] = {
        "images": [],
        "labels": [],
    }  # any class, for the shuffled-label head
    has_masks = False
    batches = _batches(
        data_dir,
        split,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
    )
    for batch in tqdm(
        batches, desc=f"explain {split}", unit="batch", disable=not progress, leave=False
    ):
        valid = np.asarray(batch["valid"], bool)
        images = jnp.asarray(batch["image"], jnp.float32)
        logits, probs = predict_fn(graphdef, state, images)
        # explicit targets (the argmax) so that the quality stage reuses these compiles
        if predictions is None:
            predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            predicted = jnp.asarray(
                np.asarray(predictions)[np.where(valid, batch["index"], 0)], jnp.int32
            )
        results = (
            compute_methods(graphdef, state, images, predicted, methods, opts, cam_layer)
            if methods
            else {}
        )
        collected["ids"].append(np.asarray(batch["id"]).astype(str)[valid])
        collected["index"].append(np.asarray(batch["index"])[valid])
        collected["labels"].append(np.asarray(batch["label"])[valid])
        collected["logits"].append(np.asarray(logits)[valid])
        collected["probs"].append(np.asarray(probs)[valid])
        for name, result in results.items():
            per_method[name]["raw"].append(np.asarray(result.raw)[valid])
            per_method[name]["maps"].append(np.asarray(result.maps)[valid].astype(np.float16))
            per_method[name]["targets"].append(np.asarray(result.targets)[valid])
        if quality and sum(len(x) for x in subset["images"]) < quality_images:
            _collect_subset(subset, batch, valid, quality_images)
            has_masks = has_masks or "mask" in batch
        if (
            quality
            and label_state is None
            and sum(len(x) for x in label_fit["images"]) < 2 * quality_images
        ):
            label_fit["images"].append(np.asarray(batch["image"], np.float32)[valid])
            label_fit["labels"].append(np.asarray(batch["label"])[valid])
    arrays = {k: np.concatenate(v) for k, v in collected.items()}
    if predictions is None:
        predictions = np.argmax(arrays["probs"], axis=1).astype(np.int32)
    else:
        predictions = np.asarray(predictions, np.int32)[arrays["index"]]
    out: dict[str, Any] = {
        "heatmaps": {},
        "grid": None,
        "quality": None,
        "quality_path": None,
        "seconds": {},
        "cam_layer": cam_layer,
    }
    maps_by_method = {}
    for name in methods:
        stacked = {k: np.concatenate(v) for k, v in per_method[name].items()}
        maps_by_method[name] = stacked["maps"]
        out["heatmaps"][name] = export.write_heatmaps(
            export.heatmap_path(workdir, split, name),
            ids=arrays["ids"],
            index=arrays["index"],
            labels=arrays["labels"].astype(np.int32),
            predictions=predictions,
            probabilities=arrays["probs"].astype(np.float32),
            targets=stacked["targets"].astype(np.int32),
            raw=stacked["raw"].astype(np.float32),
            maps=stacked["maps"],
        )
    if methods:
        out["grid"] = _write_grid(
            workdir,
            split,
            data_dir,
            arrays,
            predictions,
            maps_by_method,
            grid_per_group,
            image_size=image_size,
            channels=channels,
            normalization=normalization,
        )
    out["seconds"]["maps"] = round(time.time() - started, 2)
    if quality and subset["images"]:
        started = time.time()
        images = np.concatenate(subset["images"])[:quality_images]
        labels = np.concatenate(subset["labels"])[:quality_images].astype(np.int32)
        masks = (
            np.concatenate(subset["masks"])[:quality_images]
            if has_masks and subset["masks"]
            else None
        )
        label_model = "caller-supplied model trained on shuffled labels"
        fit_labels = np.concatenate(label_fit["labels"]) if label_fit["labels"] else np.zeros(0)
        if label_state is None and len(np.unique(fit_labels)) >= 2:
            fit_images = np.concatenate(label_fit["images"])
            label_state = quality_lib.shuffled_label_head(
                graphdef, state, fit_images, fit_labels, seed=seed, batch_size=batch_size
            )
            label_model = f"linear head refit by ridge on {len(fit_labels)} images with shuffled labels, features kept"
        elif label_state is None:
            label_model = "none (the split has a single class)"
        scores = quality_lib.score_methods(
            graphdef,
            state,
            images,
            labels,
            masks,
            tuple(quality_methods),
            method_opts=opts,
            cascade="ends",
            steps=quality_steps,
            label_state=label_state,
            label_model=label_model,
            layer=cam_layer,
            seed=seed,
        )
        scores["_meta"] = {
            "split": split,
            "n_images": int(len(images)),
            "targets": "true label",
            "label_model": label_model,
            "subset": "first images with a non-empty mask" if masks is not None else "first images",
            "method_opts": opts,
            "cam_layer": cam_layer or "model target",
            "seconds": round(time.time() - started, 2),
        }
        path = os.path.join(workdir, "explain_quality.json")
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(_jsonable(scores), f, indent=1, allow_nan=True)
        out["quality"], out["quality_path"] = scores, path
        out["seconds"]["quality"] = round(time.time() - started, 2)
    return out


def _collect_subset(subset: dict, batch: dict, valid: np.ndarray, limit: int) -> None:
    keep = valid.copy()
    if "mask" in batch:
        masks = quality_lib.binarize_masks(np.asarray(batch["mask"]))
        keep &= masks.reshape(len(masks), -1).any(axis=1)
        subset["masks"].append(masks[keep])
    subset["images"].append(np.asarray(batch["image"], np.float32)[keep])
    subset["labels"].append(np.asarray(batch["label"])[keep])


def _write_grid(
    workdir, split, data_dir, arrays, predictions, maps_by_method, per_group, **load_kw
) -> str | None:
    """Stores the report grid's cases (display images + every method's maps) in <split>_grid.npz."""
    from xmedjax import input_pipeline

    cases = export.select_grid_cases(arrays["labels"], predictions, arrays["probs"], per_group)
    rows = sorted({i for per_class in cases for group in per_class for i in group})
    if not rows:
        return None
    loaded = input_pipeline.load_examples(data_dir, split, arrays["index"][rows], **load_kw)
    display = np.stack(
        [np.round(255 * export.display_image(im)).astype(np.uint8) for im in loaded["image"]]
    )
    remap = {i: j for j, i in enumerate(rows)}
    local = [[[remap[i] for i in group] for group in per_class] for per_class in cases]
    extra = {f"maps_{m}": v[rows] for m, v in maps_by_method.items()}
    path = os.path.join(workdir, "heatmaps", f"{split}_grid.npz")
    np.savez_compressed(
        path,
        images=display,
        labels=arrays["labels"][rows],
        predictions=predictions[rows],
        probabilities=arrays["probs"][rows],
        ids=arrays["ids"][rows],
        cases=np.array(json.dumps(local)),
        methods=np.array(list(maps_by_method)),
        label_names=np.array(_label_names(data_dir) or []),
        **extra,
    )
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # strict JSON: NaN (an undefined score) becomes null
    return x


# ----------------------------------------------------------------------------- user folders


def _folder_batches(
    files: list[str],
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    normalization: str,
    desc: str,
    progress: bool,
):
    """Yields (paths, images padded to batch_size, n_valid): constant shapes, one compile."""
    from xmedjax import input_pipeline

    for start in tqdm(
        range(0, len(files), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        paths = files[start : start + batch_size]
        images = np.stack(
            [
                input_pipeline.load_image_file(
                    p, image_size=image_size, channels=channels, normalization=normalization
                )
                for p in paths
            ]
        ).astype(np.float32)
        pad = batch_size - len(paths)
        if pad:
            images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
        yield paths, images, len(paths)


def _decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """argmax, or for two classes with a threshold: class 1 when p1 >= threshold."""
    probs = np.asarray(probs)
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int32)
    return np.argmax(probs, axis=1).astype(np.int32)


def _write_predictions(
    workdir: str, name: str, rows: list[dict], label_names: Sequence[str] | None
) -> dict[str, str]:
    os.makedirs(workdir, exist_ok=True)
    csv_path = os.path.join(workdir, f"{name}.csv")
    json_path = os.path.join(workdir, f"{name}.json")
    num_classes = len(rows[0]["probabilities"]) if rows else 0
    names = list(label_names) if label_names else [str(c) for c in range(num_classes)]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["id", "prediction", "prediction_name", "confidence", *[f"p_{n}" for n in names]]
        )
        for r in rows:
            writer.writerow(
                [
                    r["id"],
                    r["prediction"],
                    names[r["prediction"]],
                    f"{max(r['probabilities']):.6f}",
                    *[f"{p:.6f}" for p in r["probabilities"]],
                ]
            )
    with open(json_path, "w") as f:
        json.dump(
            {
                "label_names": names,
                "predictions": [{**r, "prediction_name": names[r["prediction"]]} for r in rows],
            },
            f,
            indent=1,
        )
    return {"csv": csv_path, "json": json_path}


def predict_folder(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    folder: str,
    workdir: str,
    image_size: int,
    channels: int,
    normalization: str,
    batch_size: int = 32,
    label_names: Sequence[str] | None = None,
    threshold: float | None = None,
    methods: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Predictions for every PNG/JPEG/DICOM file under `folder`: WORKDIR/predictions_folder.{csv,json}.

    Two classes with a `threshold`: class 1 when its probability >= threshold, else argmax.
    With `methods`, the images are explained too (see `explain_folder`).
    """
    from xmedjax import input_pipeline

    if methods:
        return explain_folder(
            graphdef,
            state,
            folder=folder,
            workdir=workdir,
            image_size=image_size,
            channels=channels,
            normalization=normalization,
            methods=methods,
            batch_size=batch_size,
            label_names=label_names,
            threshold=threshold,
            progress=progress,
        )
    files = input_pipeline.list_image_files(folder)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG/DICOM files under {folder}")
    rows = []
    for paths, images, n in _folder_batches(
        files,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
        desc="predict",
        progress=progress,
    ):
        _, probs = predict_fn(graphdef, state, jnp.asarray(images))
        probs = np.asarray(probs)[:n]
        for p, pr, pred in zip(paths, probs, _decide(probs, threshold)):
            rows.append(
                {
                    "id": os.path.relpath(p, folder),
                    "prediction": int(pred),
                    "probabilities": [float(v) for v in pr],
                }
            )
    return {"predictions": _write_predictions(workdir, "predictions_folder", rows, label_names)}


def predict_split(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    data_dir: str,
    split: str,
    workdir: str,
    image_size: int,
    channels: int,
    normalization: str,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, str]:
    """Predictions for a prepared split: WORKDIR/predictions_<split>.{csv,json} (with the true label)."""
    rows = []
    batches = _batches(
        data_dir,
        split,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
    )
    for batch in tqdm(batches, desc=f"predict {split}", unit="batch", disable=not progress):
        valid = np.asarray(batch["valid"], bool)
        _, probs = predict_fn(graphdef, state, jnp.asarray(batch["image"], jnp.float32))
        for i in np.flatnonzero(valid):
            pr = np.asarray(probs)[i]
            rows.append(
                {
                    "id": str(np.asarray(batch["id"])[i]),
                    "label": int(batch["label"][i]),
                    "prediction": int(np.argmax(pr)),
                    "probabilities": [float(v) for v in pr],
                }
            )
    return _write_predictions(workdir, f"predictions_{split}", rows, _label_names(data_dir))


def explain_folder(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    folder: str,
    workdir: str,
    image_size: int,
    channels: int,
    normalization: str,
    methods: Sequence[str] = ("gradcam",),
    batch_size: int = 32,
    label_names: Sequence[str] | None = None,
    threshold: float | None = None,
    method_opts: dict[str, dict] | None = None,
    overlays: bool = True,
    cam_layer: str | None = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Maps (of the argmax class) for every PNG/JPEG/DICOM file under `folder`.

    Writes WORKDIR/heatmaps/folder_<method>.npz (labels = -1: unknown),
    WORKDIR/overlays/<method>/<relative path>.png and WORKDIR/predictions_folder.{csv,json}.
    """
    from xmedjax import input_pipeline

    methods = tuple(methods)
    opts = _merge_opts(method_opts)
    if cam_layer == "auto":
        cam_layer = auto_cam_layer(graphdef, state, (image_size, image_size, channels))
    files = input_pipeline.list_image_files(folder)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG/DICOM files under {folder}")
    ids, probs_all = [], []
    per_method: dict[str, dict[str, list]] = {
        m: {"raw": [], "maps": [], "targets": []} for m in methods
    }
    for paths, images, n in _folder_batches(
        files,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
        desc="explain",
        progress=progress,
    ):
        images_j = jnp.asarray(images)
        logits, probs = predict_fn(graphdef, state, images_j)
        predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        results = compute_methods(graphdef, state, images_j, predicted, methods, opts, cam_layer)
        rel = [os.path.relpath(p, folder) for p in paths]
        ids.extend(rel)
        probs_all.append(np.asarray(probs)[:n])
        for name, result in results.items():
            maps = np.asarray(result.maps)[:n]
            per_method[name]["raw"].append(np.asarray(result.raw)[:n])
            per_method[name]["maps"].append(maps.astype(np.float16))
            per_method[name]["targets"].append(np.asarray(result.targets)[:n])
            if overlays:
                for r, image, heat in zip(rel, images[:n], maps):
                    export.save_overlay_png(
                        os.path.join(workdir, "overlays", name, os.path.splitext(r)[0] + ".png"),
                        image,
                        heat,
                    )
    probs_all = np.concatenate(probs_all)
    predictions = _decide(probs_all, threshold)
    out: dict[str, Any] = {"heatmaps": {}}
    for name in methods:
        stacked = {k: np.concatenate(v) for k, v in per_method[name].items()}
        out["heatmaps"][name] = export.write_heatmaps(
            export.heatmap_path(workdir, "folder", name),
            ids=np.array(ids),
            labels=np.full(len(ids), -1, np.int32),
            predictions=predictions,
            probabilities=probs_all.astype(np.float32),
            targets=stacked["targets"].astype(np.int32),
            raw=stacked["raw"].astype(np.float32),
            maps=stacked["maps"],
        )
    rows = [
        {"id": i, "prediction": int(p), "probabilities": [float(v) for v in pr]}
        for i, p, pr in zip(ids, predictions, probs_all)
    ]
    out["predictions"] = _write_predictions(workdir, "predictions_folder", rows, label_names)
    return out


__all__ = [
    "QUALITY_METHODS",
    "explain_folder",
    "explain_split",
    "predict_fn",
    "predict_folder",
    "predict_split",
]
