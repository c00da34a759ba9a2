"""Mirrored and rotated copies are duplicates: hashes of transforms, the audit, --dedup_test."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest

from data_prep import audit, build, hashing


def _img(seed: int, size=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize(size[::-1], PIL.Image.BICUBIC))


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.ascontiguousarray(arr)).save(path)


def _noisy(a: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-2, 3, a.shape)
    return np.clip(a.astype(int) + 3 + noise, 0, 255).astype(np.uint8)


def test_transforms_compose_and_invert():
    a = _img(1)
    for t in hashing.TRANSFORMS:
        back = hashing.apply_transform(hashing.apply_transform(a, t), hashing.inverse(t))
        assert np.array_equal(back, a), t
        for u in hashing.TRANSFORMS:
            both = hashing.apply_transform(hashing.apply_transform(a, t), u)
            assert np.array_equal(both, hashing.apply_transform(a, hashing.compose(t, u)))
    assert np.array_equal(hashing.apply_transform(a, "fliplr"), a[:, ::-1])
    assert np.array_equal(hashing.apply_transform(a, "rot90"), np.rot90(a))


def test_transform_hashes_match_the_copies():
    a = _img(2)  # smaller than hashing.HASH_SOURCE: exact
    th = hashing.transform_hashes(a)
    for k, t in enumerate(hashing.TRANSFORMS):
        b = np.ascontiguousarray(hashing.apply_transform(a, t))
        assert th["pixel"][k] == hashing.pixel_hash(b)
        assert th["dhash"][k] == hashing.dhash64(b) and th["phash"][k] == hashing.phash64(b)


def test_transform_hashes_of_a_large_image_stay_close():
    a = _img(3, size=(300, 420))
    th = hashing.transform_hashes(a)
    for k, t in enumerate(hashing.TRANSFORMS):
        b = np.ascontiguousarray(hashing.apply_transform(a, t))
        assert th["pixel"][k] == hashing.pixel_hash(b)
        assert bin(th["dhash"][k] ^ hashing.dhash64(b)).count("1") <= 3, t
        assert bin(th["phash"][k] ^ hashing.phash64(b)).count("1") <= 3, t


def test_near_pairs_find_a_mirrored_and_a_rotated_copy():
    imgs = [_img(10 + i) for i in range(6)]
    imgs.append(_noisy(imgs[1][:, ::-1], 0))  # 6: mirrored copy of 1
    imgs.append(_noisy(np.rot90(imgs[3]), 1))  # 7: rotated copy of 3 (48 x 40)
    th = [hashing.transform_hashes(a) for a in imgs]
    dh = np.array([h["dhash"] for h in th], np.uint64)
    ph = np.array([h["phash"] for h in th], np.uint64)
    thumbs = [hashing.thumbnail(a) for a in imgs]
    found = hashing.near_duplicate_pairs_transformed(dh, ph, thumbs=thumbs)
    assert {(i, j, t) for i, j, t, _ in found} == {(1, 6, "fliplr"), (3, 7, "rot90")}
    plain = hashing.near_duplicate_pairs(dh[:, 0], ph[:, 0], thumbs=thumbs)
    assert plain == []


@pytest.fixture(scope="module")
def leak(tmp_path_factory) -> str:
    """train/{a,b} x 5, test/{a,b} x 4, plus: an exact mirror (PNG) of train/a/a0 in test,
    a noisy 90-degree rotation of train/b/b1 in test, an up-down mirror of train/a/a2 in val,
    and a plain byte copy of train/b/b3 in test."""
    root = str(tmp_path_factory.mktemp("mirror_leak"))
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    for i in range(5):
        _save(j("train", "a", f"a{i}.png"), _img(100 + i))
        _save(j("train", "b", f"b{i}.png"), _img(200 + i))
    for i in range(4):
        _save(j("test", "a", f"ta{i}.png"), _img(300 + i))
        _save(j("test", "b", f"tb{i}.png"), _img(400 + i))
    _save(j("test", "a", "mirror.png"), _img(100)[:, ::-1])
    _save(j("test", "b", "rotated.png"), _noisy(np.rot90(_img(201)), 5))
    _save(j("val", "a", "upside_down.png"), _img(102)[::-1])
    _save(j("test", "b", "plain.png"), _img(203))
    return root


def _problem(res, name: str) -> dict:
    return next(p for p in res["problems"] if name in " ".join(p["files"]))


def test_audit_records_the_transform_of_each_copy(leak):
    res = audit.run_audit(leak, workers=1, progress=False)
    p = _problem(res, "mirror.png")
    assert p["kind"] == "cross_split_pixel_duplicate"
    assert dict(zip(p["files"], p["transforms"])) == {
        "test/a/mirror.png": "identity",
        "train/a/a0.png": "fliplr",
    }
    p = _problem(res, "rotated.png")
    assert p["kind"] == "cross_split_near_duplicate" and "mirrored or rotated" in p["detail"]
    assert dict(zip(p["files"], p["transforms"])) == {
        "test/b/rotated.png": "identity",
        "train/b/b1.png": "rot270",  # rotated = rot90(b1): b1 = rot270(rotated)
    }
    assert _problem(res, "upside_down.png")["transforms"] == ["identity", "flipud"]
    s = res["summary"]
    assert s["test_with_train_pixel_duplicate"] == 2  # the mirror and the plain copy
    assert s["test_with_train_near_duplicate"] == 1  # the noisy rotation
    assert s["test_with_any_train_or_val_copy"] == 3
    assert s["test_with_train_transformed_copy"] == 2
    assert s["test_with_train_transformed_copy_only"] == 2
    # by the transform that maps the test image onto its train copy
    assert s["test_with_train_copy_by_transform"] == {"fliplr": 1, "rot270": 1}
    assert s["val_with_train_copy_by_transform"] == {"flipud": 1}
    assert s["test_with_train_transformed_copy_strict"] == 2
    md = audit.markdown(res)
    assert "test_with_train_transformed_copy: 2" in md


def test_plain_search_misses_the_mirrored_copies(leak):
    res = audit.run_audit(leak, workers=1, progress=False, transforms=hashing.IDENTITY_ONLY)
    s = res["summary"]
    assert s["test_with_any_train_or_val_copy"] == 1  # only the plain byte copy
    assert s["test_with_train_transformed_copy"] == 0
    assert not any("mirror.png" in " ".join(p["files"]) for p in res["problems"])


def test_dedup_test_drops_mirrored_and_rotated_copies(leak, tmp_path):
    out = str(tmp_path / "prep")
    info = build.prepare(
        "folder", leak, out, dedup_test=True, val_fraction=0.0, progress=False, workers=1
    )
    assert info["splits"]["test"] == 11 and info["splits"]["test_dedup"] == 8
    assert info["test_dedup_dropped_by_reason"] == {
        "exact_duplicate": 2,
        "near_duplicate": 1,
        "patient_overlap": 0,
    }
    assert info["test_dedup_dropped_mirrored_or_rotated_only"] == 2
    with open(os.path.join(out, "audit.json")) as f:
        assert json.load(f)["summary"]["test_with_train_transformed_copy"] == 2
