"""The metadata shortcut audit flags planted shortcuts and stays quiet on clean phantoms."""

from __future__ import annotations

import json
import os

import pytest

from data_prep import audit, phantoms, shortcut

COUNTS = {"train": 200, "test": 200}


def _audit(tmp_path, kind="brain", sc=None, strength=1.0):
    root = phantoms.write_phantom_folder(
        str(tmp_path / "raw"),
        kind,
        COUNTS,
        size=32,
        seed=0,
        shortcut=sc,
        shortcut_strength=strength,
    )
    res = audit.run_audit(root, workers=1, progress=False, shortcut=True)
    return res


@pytest.mark.parametrize("kind", phantoms.KINDS)
def test_quiet_on_clean_phantoms(tmp_path, kind):
    res = _audit(tmp_path, kind)
    sc = res["shortcut"]
    assert not sc["risk"], sc["groups"]
    for g in ("geometry", "intensity", "all"):
        assert sc["groups"][g]["accuracy"] < sc["majority_baseline"] + 0.1
    # Phantoms share their layout but are not near duplicates of one another.
    flagged = {f for p in res["problems"] if "duplicate" in p["kind"] for f in p["files"]}
    assert len(flagged) <= 4


@pytest.mark.parametrize(
    "planted,group",
    [
        ("size", "geometry"),
        ("aspect", "geometry"),
        ("intensity", "intensity"),
        ("border", "intensity"),
    ],
)
def test_flags_planted_shortcuts(tmp_path, planted, group):
    sc = _audit(tmp_path, "brain", planted)["shortcut"]
    assert sc["risk"] and group in sc["risky_groups"]
    assert sc["groups"][group]["accuracy"] >= 0.9
    assert sc["groups"][group]["auc_roc"] >= 0.9
    if group == "intensity":
        assert not sc["groups"]["geometry"]["risk"]


def test_report_files(tmp_path):
    res = _audit(tmp_path, "chest", "size")
    audit.write_report(res, str(tmp_path / "out"))
    with open(tmp_path / "out" / "audit.json") as f:
        data = json.load(f)
    top = data["shortcut"]["groups"]["all"]["top_features"]
    assert top and top[0][0] in shortcut.GEOMETRY + shortcut.FILE
    md = (tmp_path / "out" / "audit.md").read_text()
    assert "Shortcut audit" in md and "Shortcut risk" in md


def test_prepared_baseline(tmp_path):
    counts = {"train": 120, "val": 40, "test": 120}
    clean = phantoms.build_phantom_dataset(str(tmp_path / "clean"), "chest", counts, size=24)
    skew = phantoms.build_phantom_dataset(
        str(tmp_path / "skew"), "chest", counts, size=24, shortcut="aspect"
    )
    b0 = shortcut.prepared_baseline(clean)
    b1 = shortcut.prepared_baseline(skew)
    assert set(b0) >= {"accuracy", "auc_roc", "majority_baseline", "risk"}
    assert not b0["risk"] and b0["accuracy"] < 0.65
    assert b1["risk"] and b1["accuracy"] >= 0.95 and b1["groups"]["geometry"]["risk"]
    assert os.path.isfile(os.path.join(skew, "xmedjax_dataset.json"))
