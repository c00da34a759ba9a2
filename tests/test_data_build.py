"""Building prepared datasets from raw folders: round trip, label maps, splits, bad files."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from data_prep import build, image_io, layouts
from xmedjax import input_pipeline as ip


def _img(seed: int, shape=(20, 24), colour=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3) if colour else (4, 5), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize(shape[::-1], PIL.Image.BICUBIC))


def _raw(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """id -> stored pixels of a prepared split."""
    src = ip.PreparedSource(data_dir, split)
    out = {}
    for i in range(len(src)):
        rec = src[i]
        out[rec["id"].decode()] = image_io.decode_png(rec["image"])
    return out


def _folder(root: str, n: int = 8, colour=False) -> dict[str, np.ndarray]:
    pixels = {}
    for split in ("train", "test"):
        for c, cname in enumerate(("cat", "dog")):
            for i in range(n):
                # a fixed seed per file (str hashes change with PYTHONHASHSEED: chance near-duplicates)
                seed = 1000 * (split == "test") + 100 * c + i
                a = _img(seed, shape=(20 + i, 24), colour=colour)
                rel = f"{split}/{cname}/{i:03d}.png"
                os.makedirs(os.path.join(root, split, cname), exist_ok=True)
                PIL.Image.fromarray(a).save(os.path.join(root, rel))
                pixels[rel] = a
    return pixels


def test_round_trip_grey(tmp_path):
    pixels = _folder(str(tmp_path / "raw"))
    out = str(tmp_path / "prep")
    info = build.prepare(
        "folder", str(tmp_path / "raw"), out, val_fraction=0.25, seed=0, progress=False, workers=1
    )
    assert info["channels"] == 1 and info["label_names"] == ["cat", "dog"]
    assert info["splits"]["train"] + info["splits"]["val"] == 16
    assert info["splits"]["val"] == 4 and info["splits"]["test"] == 16
    seen = {}
    for split in ("train", "val", "test"):
        seen.update(_raw(out, split))
    assert set(seen) == set(pixels)
    for k, a in pixels.items():
        assert np.array_equal(seen[k], a), k
    dinfo = ip.read_dataset_info(out)
    assert dinfo.num_classes == 2 and not dinfo.has_masks and dinfo.size == 256
    assert os.path.isfile(os.path.join(out, "audit.json"))


def test_round_trip_colour_and_resize(tmp_path):
    raw = str(tmp_path / "raw")
    pixels = _folder(raw, n=3, colour=True)
    big = _img(7, shape=(90, 60), colour=True)
    PIL.Image.fromarray(big).save(os.path.join(raw, "train", "cat", "big.png"))
    out = str(tmp_path / "prep")
    info = build.prepare("folder", raw, out, size=30, val_fraction=0.0, progress=False, workers=1)
    assert info["channels"] == 3
    seen = {**_raw(out, "train"), **_raw(out, "test")}
    for k, a in pixels.items():
        assert np.array_equal(seen[k], a), k
    assert seen["train/cat/big.png"].shape == (30, 20, 3)  # longer side 30, aspect kept
    src = ip.PreparedSource(out, "train")
    orig = {src[i]["id"].decode(): src[i]["orig_size"] for i in range(len(src))}
    assert list(orig["train/cat/big.png"]) == [90, 60]


def _brain(root: str, n=3) -> None:
    for split in ("Training", "Testing"):
        for k, c in enumerate(layouts.BRAIN_CLASSES):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                a = _img(5000 + 1000 * (split == "Testing") + 100 * k + i, (16, 16))
                PIL.Image.fromarray(a).save(
                    os.path.join(root, split, c, f"{c}_{i}.jpg"), quality=95
                )


@pytest.mark.parametrize(
    "label_map,names",
    [
        ("binary", ["notumor", "tumor"]),
        ("multiclass", ["glioma", "meningioma", "notumor", "pituitary"]),
    ],
)
def test_brain_label_maps(tmp_path, label_map, names):
    _brain(str(tmp_path / "raw"))
    assert layouts.detect_layout(str(tmp_path / "raw")) == "brain_tumor_mri"
    out = str(tmp_path / "prep")
    info = build.prepare(
        "brain_tumor_mri",
        str(tmp_path / "raw"),
        out,
        label_map=label_map,
        val_fraction=0.0,
        progress=False,
        workers=1,
    )
    assert info["label_names"] == names and info["splits"]["test"] == 12
    src = ip.PreparedSource(out, "test")
    for i in range(len(src)):
        rec = src[i]
        cls = rec["source"].decode().split("/")[1]
        want = int(cls != "notumor") if label_map == "binary" else layouts.BRAIN_CLASSES.index(cls)
        assert rec["label"] == want and rec["label_name"].decode() == names[want]


def test_patient_ids():
    assert layouts.patient_id("train/PNEUMONIA/person1000_bacteria_2931.jpeg") == "person1000"
    assert layouts.patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert layouts.patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert layouts.patient_id("Tr-glTr_0000.jpg") == ""


def test_carve_val_is_stratified_grouped_and_seeded():
    idx = list(range(200))
    labels = [i % 2 for i in idx]
    groups = [i // 4 for i in idx]  # patients of 4 images (same label parity mixes)
    tr, va = build.carve_val(idx, labels, groups, 0.2, seed=3)
    assert sorted(tr + va) == idx
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
    assert 36 <= len(va) <= 44
    n1 = sum(labels[i] for i in va)
    assert abs(n1 - len(va) / 2) <= 4
    assert build.carve_val(idx, labels, groups, 0.2, seed=3) == (tr, va)
    assert build.carve_val(idx, labels, groups, 0.2, seed=4) != (tr, va)


def test_chest_patients_never_span_train_and_val(tmp_path):
    raw = tmp_path / "raw"
    k = 0
    for split in ("train", "val", "test"):
        for c in layouts.CHEST_CLASSES:
            os.makedirs(raw / split / c)
            for p in range(6 if split == "train" else 1):
                for m in range(3):
                    a = _img(k, (16, 16))
                    k += 1
                    name = (
                        f"person{p}_bacteria_{m}.jpeg"
                        if c == "PNEUMONIA"
                        else f"IM-{p:04d}-{m:04d}.jpeg"
                    )
                    if split != "train":
                        name = "x" + name
                    PIL.Image.fromarray(a).save(raw / split / c / name, quality=95)
    out = str(tmp_path / "prep")
    info = build.prepare("chest_xray", str(raw), out, val_fraction=0.3, progress=False, workers=1)
    assert info["official_val_merged_into_train"]
    pids = {}
    for split in ("train", "val"):
        src = ip.PreparedSource(out, split)
        pids[split] = {src[i]["patient_id"].decode() for i in range(len(src))} - {""}
    assert pids["val"] and pids["train"].isdisjoint(pids["val"])
    assert info["splits"]["train"] + info["splits"]["val"] == 42


def test_bad_file_stops_build_unless_skip_bad(tmp_path):
    raw = str(tmp_path / "raw")
    _folder(raw, n=3)
    buf = io.BytesIO()
    PIL.Image.fromarray(_img(1, (64, 64))).save(buf, format="JPEG")
    with open(os.path.join(raw, "train", "cat", "broken.jpg"), "wb") as f:
        f.write(buf.getvalue()[:200])
    with pytest.raises(build.BuildError, match="train/cat/broken.jpg"):
        build.prepare("folder", raw, str(tmp_path / "p1"), progress=False, workers=1)
    info = build.prepare(
        "folder",
        raw,
        str(tmp_path / "p2"),
        skip_bad=True,
        val_fraction=0.0,
        progress=False,
        workers=1,
    )
    assert info["skipped_bad_files"] == ["train/cat/broken.jpg"]
    assert info["splits"]["train"] == 6


def test_dedup_test_drops_leaked_copies(tmp_path):
    raw = str(tmp_path / "raw")
    _folder(raw, n=4)
    shutil.copy(
        os.path.join(raw, "train", "cat", "000.png"), os.path.join(raw, "test", "cat", "leak.png")
    )
    PIL.Image.fromarray(_img(9001)).save(os.path.join(raw, "train", "dog", "person5_a.png"))
    PIL.Image.fromarray(_img(9002)).save(os.path.join(raw, "test", "dog", "person5_b.png"))
    out = str(tmp_path / "prep")
    info = build.prepare(
        "folder", raw, out, dedup_test=True, val_fraction=0.0, progress=False, workers=1
    )
    assert info["splits"]["test"] == 10 and info["splits"]["test_dedup"] == 8
    ids = set(_raw(out, "test_dedup"))
    assert "test/cat/leak.png" not in ids and "test/dog/person5_b.png" not in ids
    with open(os.path.join(out, "xmedjax_dataset.json")) as f:
        meta = json.load(f)
    assert meta["test_dedup_dropped"] == 2
    assert meta["test_dedup_dropped_by_reason"] == {
        "exact_duplicate": 1,
        "near_duplicate": 0,
        "patient_overlap": 1,
    }


def test_jpeg_storage_is_close(tmp_path):
    raw = str(tmp_path / "raw")
    pixels = _folder(raw, n=2)
    out = str(tmp_path / "prep")
    info = build.prepare(
        "folder",
        raw,
        out,
        val_fraction=0.0,
        progress=False,
        workers=1,
        image_format="jpeg",
        jpeg_quality=95,
    )
    assert info["image_format"] == "jpeg"
    assert not os.path.exists(os.path.join(out, "downloads"))
    seen = {**_raw(out, "train"), **_raw(out, "test")}
    for k, a in pixels.items():
        assert seen[k].shape == a.shape
        assert np.abs(seen[k].astype(int) - a).mean() < 3, k
