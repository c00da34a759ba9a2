"""Clinical classification metrics with scikit-learn, bootstrap intervals and the threshold.

Binary tasks: the positive class is label 1; its probability is thresholded at a value
chosen on val (Youden's J, or 0.5) and that same value is applied to test. Multi-class:
argmax, with macro-averaged AUC-ROC (one-vs-rest), F1, average precision, sensitivity
(recall) and specificity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

CI_METRICS = ("accuracy", "auc_roc", "f1", "average_precision", "sensitivity", "specificity")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float64)


def choose_threshold(labels: np.ndarray, probs: np.ndarray, method: str = "youden") -> float:
    """Binary decision threshold on P(class 1), chosen on val: Youden's J = TPR - FPR."""
    if method == "0.5" or probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(labels, probs[:, 1])
    j = tpr - fpr
    best = int(np.argmax(j))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def predict(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary: P(1) >= threshold; multi-class: argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return np.argmax(probs, axis=1)


def _specificities(cm: np.ndarray) -> np.ndarray:
    total = cm.sum()
    out = []
    for k in range(cm.shape[0]):
        tp = cm[k, k]
        fp = cm[:, k].sum() - tp
        fn = cm[k, :].sum() - tp
        tn = total - tp - fp - fn
        out.append(tn / (tn + fp) if tn + fp else np.nan)
    return np.asarray(out, np.float64)


def point_metrics(labels: np.ndarray, probs: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """accuracy, auc_roc, f1, average_precision, sensitivity, specificity (NaN when undefined)."""
    k = probs.shape[1]
    classes = np.arange(k)
    out = {"accuracy": float(skm.accuracy_score(labels, preds))}
    present = np.unique(labels)
    cm = skm.confusion_matrix(labels, preds, labels=classes)
    if k == 2:
        score = probs[:, 1]
        both = len(present) == 2
        out["auc_roc"] = float(skm.roc_auc_score(labels, score)) if both else float("nan")
        out["average_precision"] = (
            float(skm.average_precision_score(labels, score)) if both else float("nan")
        )
        out["f1"] = float(skm.f1_score(labels, preds, pos_label=1, zero_division=0))
        tn, fp, fn, tp = cm.ravel()
        out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out["specificity"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    else:
        onehot = np.eye(k)[labels]
        cols = [c for c in classes if 0 < onehot[:, c].sum() < len(labels)]
        if len(cols) >= 2:
            out["auc_roc"] = float(
                np.mean([skm.roc_auc_score(onehot[:, c], probs[:, c]) for c in cols])
            )
            out["average_precision"] = float(
                np.mean([skm.average_precision_score(onehot[:, c], probs[:, c]) for c in cols])
            )
        else:
            out["auc_roc"] = out["average_precision"] = float("nan")
        out["f1"] = float(
            skm.f1_score(labels, preds, average="macro", labels=classes, zero_division=0)
        )
        out["sensitivity"] = float(
            skm.recall_score(labels, preds, average="macro", labels=present, zero_division=0)
        )
        out["specificity"] = float(np.nanmean(_specificities(cm)))
    return out


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    preds: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile bootstrap 95% intervals (resampling examples with replacement)."""
    if samples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = {m: [] for m in CI_METRICS}
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        values = point_metrics(labels[idx], probs[idx], preds[idx])
        for m in CI_METRICS:
            draws[m].append(values[m])
    out = {}
    for m, v in draws.items():
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        out[m] = (
            [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            if len(v)
            else [float("nan"), float("nan")]
        )
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float | None]:
    """Wilson score 95% interval of a proportion successes / n ([None, None] when n = 0);
    unlike a bootstrap it stays informative at 0 / n and n / n."""
    if n <= 0:
        return [None, None]
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def bootstrap_mean_ci(
    values: np.ndarray, *, samples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of per-example `values`.

    Examples are resampled with replacement (`samples` draws from a generator seeded by
    `seed`); NaN values are dropped first. A paired comparison of two scores on the same
    examples passes their per-example differences. [nan, nan] when there is no value or
    `samples` is 0.
    """
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v) or samples <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(samples, np.float64)
    chunk = max(1, 2_000_000 // len(v))  # bounded memory: at most ~2M indices at a time
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        means[start : start + n] = v[rng.integers(0, len(v), (n, len(v)))].mean(axis=1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


def classification_metrics(
    labels: Sequence[int],
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    label_names: Sequence[str] | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric of one split, JSON-ready.

    Keys: n, threshold (binary), accuracy, auc_roc, f1, average_precision, sensitivity,
    specificity, confusion_matrix (rows: true, columns: predicted), ci95 (metric ->
    [low, high]), per_class (scikit-learn's classification report), label_names.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    names = list(label_names) if label_names is not None else [str(i) for i in range(k)]
    preds = predict(probs, threshold)
    out = {"n": int(len(labels)), "threshold": float(threshold) if k == 2 else None}
    out.update(point_metrics(labels, probs, preds))
    out["confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=np.arange(k)).tolist()
    out["ci95"] = bootstrap_ci(labels, probs, preds, samples=bootstrap_samples, seed=seed)
    report = skm.classification_report(
        labels, preds, labels=np.arange(k), target_names=names, output_dict=True, zero_division=0
    )
    out["per_class"] = {name: {key: float(v) for key, v in report[name].items()} for name in names}
    out["label_names"] = names
    return out


def curves(labels: np.ndarray, probs: np.ndarray) -> dict[str, dict]:
    """ROC and PR curves per class (binary: the positive class only), for plotting."""
    labels = np.asarray(labels, np.int64)
    k = probs.shape[1]
    out = {}
    for c in [1] if k == 2 else range(k):
        y = (labels == c).astype(np.int64)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = skm.roc_curve(y, probs[:, c])
            precision, recall, _ = skm.precision_recall_curve(y, probs[:, c])
            out[int(c)] = {
                "fpr": fpr,
                "tpr": tpr,
                "precision": precision,
                "recall": recall,
                "auc": float(skm.auc(fpr, tpr)),
                "ap": float(skm.average_precision_score(y, probs[:, c])),
            }
    return out
