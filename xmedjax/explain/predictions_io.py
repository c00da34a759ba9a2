"""Predictions on disk: WORKDIR/<name>.csv and WORKDIR/<name>.json (predict mode).

    rows = prediction_rows(ids, predictions, probabilities)
    write_predictions(workdir, "predictions_folder", rows, label_names=["normal", "tumor"])

The CSV has one row per file: id, prediction, prediction_name, confidence (the highest
probability), p_<class name> per class, status ("ok" or "error") and error (why the file
could not be read; its prediction cells stay empty). The JSON holds {"label_names": [...],
"counts": {"ok": n, "error": n}, "predictions": [row, ...]} with each row's id, prediction,
probabilities, status, error and prediction_name (null where unknown). Both files are
written to temp files and swapped in.
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
    """One JSON-ready row per image: {"id", "prediction", "probabilities", "status": "ok",
    "error": None}."""
    return [
        {
            "id": str(i),
            "prediction": int(p),
            "probabilities": [float(v) for v in pr],
            "status": "ok",
            "error": None,
        }
        for i, p, pr in zip(ids, np.asarray(predictions), np.asarray(probabilities))
    ]


def error_row(file_id: str, message: str) -> dict:
    """The row of a file that could not be read: status "error", no prediction."""
    return {
        "id": str(file_id),
        "prediction": None,
        "probabilities": None,
        "status": "error",
        "error": message,
    }


def class_names(label_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """`label_names`, or "0", "1", ... when there are none."""
    return list(label_names) if label_names else [str(c) for c in range(num_classes)]


def predictions_csv(rows: Sequence[dict], names: Sequence[str]) -> str:
    """The CSV text of `rows` (see the module docstring)."""
    out = io.StringIO()
    writer = csv.writer(out)
    head = ["id", "prediction", "prediction_name", "confidence", *[f"p_{n}" for n in names]]
    writer.writerow([*head, "status", "error"])
    for r in rows:
        if r["prediction"] is None:
            cells = [""] * (len(head) - 1)
        else:
            probs = r["probabilities"]
            cells = [r["prediction"], names[r["prediction"]], f"{max(probs):.6f}"]
            cells += [f"{p:.6f}" for p in probs]
        writer.writerow([r["id"], *cells, r["status"], r["error"] or ""])
    return out.getvalue()


def write_predictions(
    workdir: str, name: str, rows: Sequence[dict], label_names: Sequence[str] | None
) -> dict[str, str]:
    """Writes WORKDIR/<name>.csv and .json; returns {"csv": path, "json": path}."""
    ok = [r for r in rows if r["prediction"] is not None]
    names = class_names(label_names, len(ok[0]["probabilities"]) if ok else 0)
    paths = {
        "csv": os.path.join(workdir, f"{name}.csv"),
        "json": os.path.join(workdir, f"{name}.json"),
    }
    json_io.write_text_atomic(paths["csv"], predictions_csv(rows, names))
    named = [
        {**r, "prediction_name": None if r["prediction"] is None else names[r["prediction"]]}
        for r in rows
    ]
    counts = {"ok": len(ok), "error": len(rows) - len(ok)}
    content = {"label_names": names, "counts": counts, "predictions": named}
    json_io.write_json(paths["json"], content, indent=1)
    return paths


__all__ = ["class_names", "error_row", "prediction_rows", "predictions_csv", "write_predictions"]
