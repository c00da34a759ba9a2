"""Predictions on disk: WORKDIR/<name>.csv and WORKDIR/<name>.json (predict mode).

    rows = prediction_rows(ids, predictions, probabilities)
    write_predictions(workdir, "predictions_folder", rows, label_names=["normal", "tumor"])

The CSV has one row per image: id, prediction, prediction_name, confidence (the highest
probability), p_<class name> per class. The JSON holds {"label_names": [...],
"predictions": [row, ...]} with each row's id, prediction, probabilities and
prediction_name. Both files are written to temp files and swapped in.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from xmedjax import json_io


def prediction_rows(
    ids: Sequence[str], predictions: np.ndarray, probabilities: np.ndarray
) -> list[dict]:
    """One JSON-ready row per image: {"id", "prediction", "probabilities"}."""
    return [
        {"id": str(i), "prediction": int(p), "probabilities": [float(v) for v in pr]}
        for i, p, pr in zip(ids, np.asarray(predictions), np.asarray(probabilities))
    ]


def class_names(label_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """`label_names`, or "0", "1", ... when there are none."""
    return list(label_names) if label_names else [str(c) for c in range(num_classes)]


def predictions_csv(rows: Sequence[dict], names: Sequence[str]) -> str:
    """The CSV text of `rows` (see the module docstring)."""
    out = io.StringIO()
    writer = csv.writer(out)
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
    return out.getvalue()


def write_predictions(
    workdir: str, name: str, rows: Sequence[dict], label_names: Sequence[str] | None
) -> dict[str, str]:
    """Writes WORKDIR/<name>.csv and .json; returns {"csv": path, "json": path}."""
    num_classes = len(rows[0]["probabilities"]) if rows else 0
    names = class_names(label_names, num_classes)
    paths = {
        "csv": os.path.join(workdir, f"{name}.csv"),
        "json": os.path.join(workdir, f"{name}.json"),
    }
    json_io.write_text_atomic(paths["csv"], predictions_csv(rows, names))
    named = [{**r, "prediction_name": names[r["prediction"]]} for r in rows]
    json_io.write_json(paths["json"], {"label_names": names, "predictions": named}, indent=1)
    return paths


__all__ = ["class_names", "prediction_rows", "predictions_csv", "write_predictions"]
