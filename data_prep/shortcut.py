"""Shortcut audit: can the label be guessed from per-image metadata, without the lesion?

Classifiers see only metadata features, in groups:
  geometry   width, height, aspect ratio, log area
  intensity  mean, std, near-black fraction, border mean/std, corner mean, colourfulness
  file       channels, source mode, file format, file size, bytes per pixel
  all        everything above
Each group is fitted on train (+ val) and scored on test (5-fold cross-validation when
there is no test split) with a gradient-boosting classifier; reported with accuracy,
AUC-ROC, the majority-class baseline, and ``risk`` = the group beats the majority baseline
by >= 10 accuracy points. Permutation importance on the test split names the most
informative features of the ``all`` group.

``audit_section(files, records)`` serves ``python -m data_prep.audit --shortcut``;
``prepared_baseline(data_dir)`` computes the same on a prepared dataset (which stores the
original size, mode, format and file size of every image) for training runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

RISK_POINTS = 0.10
GEOMETRY = ("width", "height", "aspect", "log_area")
# Not near-white: bright lesions (contrast-enhanced tumours) would count as a shortcut.
INTENSITY = (
    "mean",
    "std",
    "near_black",
    "border_mean",
    "border_std",
    "corner_mean",
    "colourfulness",
)
FILE = ("channels", "mode_code", "format_code", "file_size", "bytes_per_pixel")
GROUPS = {
    "geometry": GEOMETRY,
    "intensity": INTENSITY,
    "file": FILE,
    "all": GEOMETRY + INTENSITY + FILE,
}
_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "YCbCr")
_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "DICOM")


def _code(value: str, table: Sequence[str]) -> float:
    return float(table.index(value)) if value in table else float(len(table))


def features(meta: dict[str, Any]) -> dict[str, float]:
    """Metadata features of one image from its audit record (or an equivalent dict).

    ``meta`` keys: width, height, channels, mode, format, file_size, stats (the
    ``audit.intensity_stats`` dict).
    """
    w, h = float(meta["width"]), float(meta["height"])
    st = meta["stats"]
    f = {
        "width": w,
        "height": h,
        "aspect": w / max(h, 1.0),
        "log_area": math.log(max(w * h, 1)),
        "channels": float(meta["channels"]),
        "mode_code": _code(meta["mode"], _MODES),
        "format_code": _code(meta["format"], _FORMATS),
        "file_size": float(meta["file_size"]),
        "bytes_per_pixel": float(meta["file_size"]) / max(w * h, 1.0),
    }
    for k in INTENSITY:
        f[k] = float(st[k])
    return f


def _model(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=100, learning_rate=0.1, early_stopping=False, random_state=seed
    )


def _scores(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    pred = classes[np.argmax(proba, axis=1)]
    out = {"accuracy": float(accuracy_score(y_true, pred))}
    try:
        if len(classes) == 2:
            out["auc_roc"] = float(roc_auc_score(y_true == classes[1], proba[:, 1]))
        else:
            out["auc_roc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", labels=classes))
    except ValueError:  # a single class in y_true
        out["auc_roc"] = float("nan")
    return out


def evaluate(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    names: Sequence[str],
    seed: int = 0,
    importance: bool = True,
) -> dict[str, Any]:
    """Fits each feature group and scores it; returns the ``shortcut`` section dict.

    Runs single-threaded: on small data OpenMP start-up dominates, and on a busy machine
    it makes gradient-boosting prediction 10x slower.
    """
    # Import first: threadpool_limits only limits the OpenMP runtimes already loaded.
    import sklearn.ensemble  # noqa: F401
    import sklearn.inspection  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _evaluate(x_train, y_train, x_test, y_test, names, seed, importance)


def _evaluate(x_train, y_train, x_test, y_test, names, seed, importance) -> dict[str, Any]:
    from sklearn.inspection import permutation_importance
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    names = list(names)
    protocol = "train -> test"
    if x_test is None or len(x_test) == 0:
        protocol = "5-fold cross-validation on train"
    classes, counts = np.unique(y_train, return_counts=True)
    majority = classes[np.argmax(counts)]
    y_eval = y_train if x_test is None or len(x_test) == 0 else y_test
    base = float(np.mean(y_eval == majority))
    groups: dict[str, Any] = {}
    for g, cols in GROUPS.items():
        idx = [names.index(c) for c in cols]
        model = _model(seed)
        if protocol.startswith("5-fold"):
            nfold = int(min(5, counts.min()))
            if nfold < 2:
                continue
            cv = StratifiedKFold(nfold, shuffle=True, random_state=seed)
            proba = cross_val_predict(
                model, x_train[:, idx], y_train, cv=cv, method="predict_proba"
            )
            fitted, xt = None, None
        else:
            fitted = model.fit(x_train[:, idx], y_train)
            xt = x_test[:, idx]
            proba = fitted.predict_proba(xt)
        s = _scores(y_eval, proba, classes)
        s["majority_baseline"] = base
        s["points_over_baseline"] = round(100 * (s["accuracy"] - base), 1)
        s["risk"] = bool(s["accuracy"] - base >= RISK_POINTS)
        s["features"] = list(cols)
        if importance and g == "all" and fitted is not None:
            pi = permutation_importance(
                fitted, xt, y_test, n_repeats=5, random_state=seed, scoring="accuracy"
            )
            order = np.argsort(-pi.importances_mean)[:6]
            s["top_features"] = [
                [cols[i], round(float(pi.importances_mean[i]), 4)]
                for i in order
                if pi.importances_mean[i] > 0
            ]
        groups[g] = s
    risky = [g for g, s in groups.items() if s["risk"]]
    return {
        "protocol": protocol,
        "classifier": "HistGradientBoostingClassifier",
        "n_train": int(len(y_train)),
        "n_test": int(len(y_eval)),
        "classes": [int(c) for c in classes],
        "majority_baseline": base,
        "groups": groups,
        "risk": bool(risky),
        "risky_groups": risky,
    }


def audit_section(
    files, records, *, dataset: str = "folder", label_map: str = "binary"
) -> dict[str, Any]:
    """The ``shortcut`` section of audit.json from decodable files and their records."""
    from data_prep import layouts

    classes = sorted({f.class_name for f in files})
    lmap = layouts.label_map_for(dataset, label_map, classes)
    feats = [features(r) for r in records]
    if not feats:
        return {"error": "no decodable images"}
    names = list(feats[0])
    x = np.array([[f[n] for n in names] for f in feats], np.float64)
    y = np.array([lmap.label_of(f.class_name) for f in files])
    split = np.array([f.split for f in files])
    train = np.isin(split, ["train", "val"])
    test = split == "test"
    if len(np.unique(y[train])) < 2:
        return {"error": "train holds fewer than two classes"}
    out = evaluate(
        x[train], y[train], x[test] if test.any() else None, y[test] if test.any() else None, names
    )
    out["label_names"] = list(lmap.label_names)
    return out


def prepared_baseline(
    data_dir: str,
    *,
    train_splits: Sequence[str] = ("train", "val"),
    test_split: str = "test",
    seed: int = 0,
    importance: bool = False,
) -> dict[str, Any]:
    """The metadata baseline of a prepared dataset.

    Returns {"accuracy", "auc_roc", "majority_baseline", "risk", "groups": {...}} where the
    top-level numbers are those of the ``all`` group (train + val -> test).
    """
    from data_prep import audit, dataset_format, image_io

    info = dataset_format.read_dataset_info(data_dir)

    def load(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        src = dataset_format.PreparedSource(data_dir, split)
        rows, ys = [], []
        for i in range(len(src)):
            rec = src[i]
            px = image_io.decode_png(rec["image"])
            h, w = (int(v) for v in rec["orig_size"])
            meta = {
                "width": w,
                "height": h,
                "mode": _text(rec["orig_mode"]),
                "format": _text(rec["file_format"]),
                "file_size": int(rec["file_size"]),
                "channels": 1 if px.ndim == 2 or image_io.collapse_grey(px).ndim == 2 else 3,
                "stats": audit.intensity_stats(px),
            }
            rows.append(features(meta))
            ys.append(int(rec["label"]))
        names = list(rows[0]) if rows else []
        return np.array([[r[n] for n in names] for r in rows]), np.array(ys), names

    parts = [load(s) for s in train_splits if s in info.splits]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    names = parts[0][2]
    x_test, y_test = load(test_split)[:2] if test_split in info.splits else (None, None)
    res = evaluate(x_train, y_train, x_test, y_test, names, seed=seed, importance=importance)
    top = res["groups"]["all"]
    return {
        "accuracy": top["accuracy"],
        "auc_roc": top["auc_roc"],
        "majority_baseline": res["majority_baseline"],
        "risk": res["risk"],
        "risky_groups": res["risky_groups"],
        "protocol": res["protocol"],
        "groups": {
            g: {k: s[k] for k in ("accuracy", "auc_roc", "risk")} for g, s in res["groups"].items()
        },
    }


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def markdown(section: dict[str, Any]) -> str:
    """The audit.md paragraph of the shortcut section."""
    if "error" in section:
        return f"## Shortcut audit\n\nNot run: {section['error']}.\n"
    lines = [
        "## Shortcut audit (metadata only, no pixels of the lesion)",
        "",
        f"{section['classifier']} on per-image metadata, {section['protocol']} "
        f"({section['n_train']} train / {section['n_test']} evaluated images). "
        f"Majority-class baseline accuracy: {section['majority_baseline']:.3f}.",
        "",
        "| features | accuracy | AUC-ROC | points over baseline | risk |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g, s in section["groups"].items():
        lines.append(
            f"| {g} | {s['accuracy']:.3f} | {s['auc_roc']:.3f} | "
            f"{s['points_over_baseline']:+.1f} | {'**yes**' if s['risk'] else 'no'} |"
        )
    top = section["groups"].get("all", {}).get("top_features")
    if top:
        lines += [
            "",
            "Most informative features (permutation importance, accuracy drop): "
            + ", ".join(f"{n} ({v:.3f})" for n, v in top)
            + ".",
        ]
    lines.append("")
    if section["risk"]:
        lines.append(
            f"**Shortcut risk**: {', '.join(section['risky_groups'])} metadata alone "
            "predicts the label at least 10 points above the majority baseline. A "
            "model's accuracy on these splits may come from the acquisition rather "
            "than the lesion: check its heatmaps and compare with this baseline."
        )
    else:
        lines.append(
            "No shortcut risk found: metadata alone stays within 10 points of the "
            "majority baseline."
        )
    return "\n".join(lines) + "\n"
