"""Evaluation of a trained model: predictions over a split, metrics.json, ROC/PR/confusion PNGs.

The binary decision threshold is chosen on val and applied, unchanged, to test.

    WORKDIR/metrics.json            {"val": {...}, "test": {...}, "shortcut_baseline": {...}|null}
    WORKDIR/predictions/<split>.npz  ids, index, labels, probabilities, predictions
    WORKDIR/figures/{roc,pr,confusion}_<split>.png
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from xmedjax import input_pipeline, json_io, metrics

SHORTCUT_NOTE = (
    "A classifier that sees only acquisition metadata (image size, aspect, intensity and "
    "border statistics), never the anatomy; if it scores close to the model, the model may "
    "be reading a shortcut rather than the lesion."
)


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def predict_split(
    eval_fn: Callable,
    state: Any,
    mesh,
    *,
    data_dir: str,
    split: str,
    batch_size: int,
    preprocess: input_pipeline.Preprocess,
) -> dict[str, np.ndarray]:
    """Runs `eval_fn(state, batch)` over every example of a split once.

    Returns numpy arrays in split order: index, labels, logits, probabilities, ids.
    Every process gets all rows (the eval step's outputs are replicated).
    """
    batch_size = _round_up(batch_size, max(mesh.devices.size, jax.process_count()))
    batches = input_pipeline.make_eval_iterator(
        data_dir,
        split,
        global_batch_size=batch_size,
        preprocess=preprocess,
    )
    logits, labels, index, valid, local_ids = [], [], [], [], {}
    for batch in batches:
        for i, name in zip(batch["index"], batch["id"]):
            if i >= 0:
                local_ids[int(i)] = str(name)
        host = {
            "image": batch["image"],
            "label": batch["label"],
            "valid": batch["valid"],
            "index": batch["index"].astype(np.int32),
        }
        out = jax.device_get(eval_fn(state, input_pipeline.to_global_array(host, mesh)))
        logits.append(out["logits"])
        labels.append(out["label"])
        index.append(out["index"])
        valid.append(out["valid"])
    valid = np.concatenate(valid).astype(bool)
    index = np.concatenate(index)[valid]
    order = np.argsort(index, kind="stable")
    index = index[order]
    logits = np.concatenate(logits)[valid][order]
    labels = np.concatenate(labels)[valid][order]
    if len(index) != batches.num_examples or np.any(index != np.arange(batches.num_examples)):
        raise RuntimeError(
            f"eval of {split} saw {len(index)} examples, expected {batches.num_examples}"
        )
    missing = [int(i) for i in index if int(i) not in local_ids]
    if missing:  # other processes' rows: read their ids from the records
        source = input_pipeline.PreparedSource(data_dir, split)
        for i in missing:
            rid = source[i]["id"]
            local_ids[i] = rid.decode() if isinstance(rid, bytes) else str(rid)
    ids = np.array([local_ids[int(i)] for i in index])
    return {
        "index": index,
        "labels": labels.astype(np.int64),
        "logits": logits,
        "probabilities": metrics.softmax(logits),
        "ids": ids,
    }


def loss_and_accuracy(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean (unweighted) cross-entropy and accuracy of predictions."""
    p = np.clip(pred["probabilities"][np.arange(len(pred["labels"])), pred["labels"]], 1e-12, 1.0)
    return {
        "loss": float(-np.mean(np.log(p))),
        "accuracy": float(np.mean(np.argmax(pred["probabilities"], 1) == pred["labels"])),
    }


def quick_metrics(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """loss, accuracy and AUC-ROC, for per-epoch validation."""
    out = loss_and_accuracy(pred)
    probs = pred["probabilities"]
    out["auc_roc"] = metrics.point_metrics(pred["labels"], probs, metrics.predict(probs))["auc_roc"]
    return out


def shortcut_baseline(data_dir: str) -> dict | None:
    """`data_prep.shortcut.prepared_baseline(data_dir)`, or {"error": ...} when it fails."""
    from data_prep import shortcut  # noqa: PLC0415 (scikit-learn fits: load on use)

    try:
        result = dict(shortcut.prepared_baseline(data_dir))
    except Exception as exc:  # noqa: BLE001 - a baseline failure must not lose the run's metrics
        return {"error": f"{type(exc).__name__}: {exc}", "note": SHORTCUT_NOTE}
    result.setdefault("note", SHORTCUT_NOTE)
    return json_io.to_jsonable(result)


def save_predictions(path: str, pred: dict[str, np.ndarray], threshold: float) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(
        path,
        ids=pred["ids"],
        index=pred["index"],
        labels=pred["labels"],
        probabilities=pred["probabilities"].astype(np.float32),
        predictions=metrics.predict(pred["probabilities"], threshold),
        threshold=np.float32(threshold),
    )


def _legend(ax, loc: str) -> None:
    """A legend of the curves; a split with one class has none (no ROC/PR curve exists)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize=8)
    else:
        ax.text(0.5, 0.5, "one class only: no curve", ha="center", transform=ax.transAxes)


def plot_split(
    figdir: str, split: str, pred: dict[str, np.ndarray], result: dict
) -> dict[str, str]:
    """roc_<split>.png, pr_<split>.png, confusion_<split>.png; returns their paths."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(figdir, exist_ok=True)
    names = result["label_names"]
    curves = metrics.curves(pred["labels"], pred["probabilities"])
    paths = {}
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for c, cur in curves.items():
        ax.plot(cur["fpr"], cur["tpr"], label=f"{names[c]} (AUC {cur['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=f"ROC, {split}")
    _legend(ax, "lower right")
    fig.tight_layout()
    paths["roc"] = os.path.join(figdir, f"roc_{split}.png")
    fig.savefig(paths["roc"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for c, cur in curves.items():
        ax.plot(cur["recall"], cur["precision"], label=f"{names[c]} (AP {cur['ap']:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall, {split}", ylim=(0, 1.02))
    _legend(ax, "lower left")
    fig.tight_layout()
    paths["pr"] = os.path.join(figdir, f"pr_{split}.png")
    fig.savefig(paths["pr"], dpi=110)
    plt.close(fig)

    cm = np.asarray(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(names), 1.4 + 0.9 * len(names)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black"
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion, {split}")
    fig.tight_layout()
    paths["confusion"] = os.path.join(figdir, f"confusion_{split}.png")
    fig.savefig(paths["confusion"], dpi=110)
    plt.close(fig)
    return paths


def evaluate_splits(
    preds: dict[str, dict[str, np.ndarray]],
    *,
    workdir: str,
    label_names,
    val_split: str = "val",
    threshold_method: str = "youden",
    bootstrap_samples: int = 1000,
    seed: int = 0,
    data_dir: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Metrics of each split with the threshold chosen on `val_split`; writes metrics.json,
    predictions and figures (call on process 0 only). Returns the metrics dict."""
    val = preds.get(val_split)
    threshold = (
        metrics.choose_threshold(val["labels"], val["probabilities"], threshold_method)
        if val is not None
        else 0.5
    )
    out: dict[str, Any] = {}
    figures = {}
    for split, pred in preds.items():
        result = metrics.classification_metrics(
            pred["labels"],
            pred["probabilities"],
            threshold=threshold,
            label_names=label_names,
            bootstrap_samples=bootstrap_samples,
            seed=seed,
        )
        result.update(loss_and_accuracy(pred) | {"accuracy": result["accuracy"]})
        result["threshold_source"] = val_split if val is not None else "default 0.5"
        out[split] = result
        figures[split] = plot_split(os.path.join(workdir, "figures"), split, pred, result)
        save_predictions(os.path.join(workdir, "predictions", f"{split}.npz"), pred, threshold)
    out["shortcut_baseline"] = shortcut_baseline(data_dir) if data_dir else None
    if extra:
        out.update(extra)
    out = json_io.to_jsonable(out)  # strict JSON: NaN/inf -> null
    json_io.write_json(os.path.join(workdir, "metrics.json"), out, indent=2)
    return out
