"""Clinical metrics: values, the val-chosen threshold, bootstrap intervals, figures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xmedjax import evaluate, metrics, report


def _binary(n=200, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * (2 * labels - 1))))
    return labels, np.stack([1 - score, score], 1)


def test_binary_metrics_match_hand_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.4, 0.7, 0.8, 0.6, 0.3, 0.9, 0.2])
    out = metrics.classification_metrics(
        labels,
        np.stack([1 - p1, p1], 1),
        threshold=0.5,
        bootstrap_samples=0,
        label_names=["neg", "pos"],
    )
    # predictions: 0 0 1 1 1 0 1 0 -> tp 3, fn 1, tn 3, fp 1
    assert out["confusion_matrix"] == [[3, 1], [1, 3]]
    assert out["accuracy"] == 0.75 and out["sensitivity"] == 0.75 and out["specificity"] == 0.75
    assert abs(out["f1"] - 0.75) < 1e-12
    assert abs(out["auc_roc"] - 13 / 16) < 1e-12  # 13 of 16 (pos, neg) pairs ranked right
    assert set(out["per_class"]) == {"neg", "pos"} and out["per_class"]["pos"]["support"] == 4


def test_threshold_is_chosen_on_val_and_applied_to_test(tmp_path):
    val = _binary(seed=1)
    test = _binary(seed=2)
    # A model whose scores are all shifted: 0.5 is a poor threshold, Youden's J finds a better one.
    shift = lambda p: np.stack([1 - p[:, 1] ** 3, p[:, 1] ** 3], 1)  # noqa: E731
    preds = {
        s: {
            "labels": y,
            "probabilities": shift(p),
            "ids": np.array([f"{s}{i}" for i in range(len(y))]),
            "index": np.arange(len(y)),
        }
        for s, (y, p) in {"val": val, "test": test}.items()
    }
    out = evaluate.evaluate_splits(
        preds, workdir=str(tmp_path), label_names=["a", "b"], bootstrap_samples=50
    )
    thr = metrics.choose_threshold(val[0], shift(val[1]))
    assert out["val"]["threshold"] == out["test"]["threshold"] == thr
    assert thr < 0.4
    expected = metrics.point_metrics(test[0], shift(test[1]), metrics.predict(shift(test[1]), thr))
    assert out["test"]["accuracy"] == expected["accuracy"]
    saved = json.load(open(tmp_path / "metrics.json"))
    for split in ("val", "test"):
        for key in (
            "accuracy",
            "auc_roc",
            "f1",
            "average_precision",
            "sensitivity",
            "specificity",
            "confusion_matrix",
            "ci95",
            "per_class",
        ):
            assert key in saved[split], key
        for m, (lo, hi) in saved[split]["ci95"].items():
            assert lo <= saved[split][m] + 1e-9 and saved[split][m] <= hi + 1e-9, m
    assert "shortcut_baseline" in saved
    for name in ("roc_test.png", "pr_test.png", "confusion_val.png"):
        assert os.path.getsize(tmp_path / "figures" / name) > 1000
    page = report.write_report(
        str(tmp_path), saved, figures={"test": {"roc": str(tmp_path / "figures" / "roc_test.png")}}
    )
    text = open(page).read()
    assert "data:image/png;base64," in text and 'src="http' not in text


def test_multiclass_and_degenerate_splits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 120)
    logits = rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[labels]
    probs = metrics.softmax(logits)
    out = metrics.classification_metrics(labels, probs, bootstrap_samples=30)
    assert out["threshold"] is None and len(out["confusion_matrix"]) == 4
    assert 0.5 < out["auc_roc"] <= 1 and 0 <= out["specificity"] <= 1
    single = metrics.classification_metrics(
        np.zeros(5, int), np.tile([[0.7, 0.3]], (5, 1)), bootstrap_samples=10
    )
    assert np.isnan(single["auc_roc"]) and single["accuracy"] == 1.0


def test_json_io_writes_strict_json_atomically(tmp_path):
    from xmedjax import json_io

    value = {
        1: np.float32(0.5),
        "nan": float("nan"),
        "arr": np.array([1.0, np.inf]),
        "t": (np.int64(3), np.bool_(True), None),
        "other": tmp_path,
    }
    want = {"1": 0.5, "nan": None, "arr": [1.0, None], "t": [3, True, None], "other": str(tmp_path)}
    assert json_io.to_jsonable(value) == want
    path = str(tmp_path / "sub" / "x.json")
    assert json_io.write_json(path, value) == path
    with open(path) as f:
        assert json.loads(f.read(), parse_constant=lambda c: pytest.fail(c)) == want
    with pytest.raises(TypeError):  # a failed write leaves the old file whole, and no temp
        json_io.write_text_atomic(path, object())
    assert json.load(open(path)) == want and os.listdir(tmp_path / "sub") == ["x.json"]
