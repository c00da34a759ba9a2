"""Lesion annotations (YOLO, VIA, COCO, mask images) -> masks in prepared datasets."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import PIL.Image
import pytest

from data_prep import annotations as ann
from data_prep import build, layouts
from xmedjax import input_pipeline as ip

H, W = 20, 24  # source images: height 20, width 24


def _img(seed: int, shape=(H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize(shape[::-1], PIL.Image.BICUBIC))


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path)


def _folder(root: str) -> list[str]:
    """train/{neg,pos}/{0,1,2}.png and test/pos/{0,1}.png; returns the relpaths."""
    rels = []
    seed = 0
    for split, classes, n in (("train", ("neg", "pos"), 3), ("test", ("pos",), 2)):
        for c in classes:
            for i in range(n):
                rel = f"{split}/{c}/{i}.png"
                _save(os.path.join(root, rel), _img(1000 + seed))
                seed += 1
                rels.append(rel)
    return rels


def _refs(root: str, rels: list[str]) -> list[ann.ImageRef]:
    out = []
    for r in rels:
        p = os.path.join(root, r)
        h, w = np.asarray(PIL.Image.open(p)).shape[:2]
        out.append(ann.ImageRef(r, p, w, h, os.path.getsize(p)))
    return out


def _load(fmt: str, path: str, root: str, rels: list[str], dataset="folder") -> ann.AnnotationSet:
    return ann.source_for(fmt, path, root, dataset).load(_refs(root, rels))


def _mask(a: ann.AnnotationSet, rel: str) -> np.ndarray:
    return ann.rasterise(a.by_image[rel], H, W)


def _rect(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- geometry
def test_shapes_take_the_pixels_whose_centre_is_inside():
    rect = ann.via_region({"name": "rect", "x": 2, "y": 3, "width": 4, "height": 2})
    assert np.array_equal(ann.draw_region(rect, H, W), _rect(2, 3, 6, 5))
    square = {"name": "polygon", "all_points_x": [2, 6, 6, 2], "all_points_y": [3, 3, 5, 5]}
    assert np.array_equal(ann.draw_region(ann.via_region(square), H, W), _rect(2, 3, 6, 5))
    circle = ann.draw_region(ann.via_region({"name": "circle", "cx": 12, "cy": 10, "r": 6}), H, W)
    assert abs(circle.sum() - math.pi * 36) < 8
    point = ann.draw_region(ann.via_region({"name": "point", "cx": 7.5, "cy": 4.2}), H, W)
    assert np.argwhere(point).tolist() == [[4, 7]]
    tiny = {"name": "rect", "x": 5.1, "y": 5.1, "width": 0.2, "height": 0.2}
    assert np.argwhere(ann.draw_region(ann.via_region(tiny), H, W)).tolist() == [[5, 5]]


def test_ellipse_theta_rotates_clockwise_on_screen():
    def ellipse(rx, ry, theta):
        shape = {"name": "ellipse", "cx": 10, "cy": 10, "rx": rx, "ry": ry, "theta": theta}
        return ann.draw_region(ann.via_region(shape), 20, 20)

    assert np.array_equal(ellipse(8, 3, math.pi / 2), ellipse(3, 8, 0))
    diag = ellipse(8, 2, math.pi / 4)  # long axis along +x+y, i.e. down-right on screen
    assert np.array_equal(diag, diag.T) and diag[14, 14] and diag[6, 6] and not diag[4, 16]
    assert not ellipse(8, 3, 0)[10, 1] and ellipse(8, 3, 0)[10, 3]


def test_polyline_open_is_a_line_closed_is_filled():
    open_line = {"name": "polyline", "all_points_x": [2.5, 19.5], "all_points_y": [10.5, 10.5]}
    m = ann.draw_region(ann.via_region(open_line), H, W)
    assert 17 <= m.sum() <= 20 and m[10].sum() == m.sum()
    closed = {"name": "polyline", "all_points_x": [2, 6, 6, 2, 2], "all_points_y": [3, 3, 5, 5, 3]}
    assert np.array_equal(ann.draw_region(ann.via_region(closed), H, W), _rect(2, 3, 6, 5))


def test_resize_mask_by_area_keeps_a_tiny_lesion():
    m = np.zeros((100, 100), bool)
    m[40:60, 20:30] = True
    small = ann.resize_mask(m, (10, 10))
    assert np.array_equal(np.argwhere(small)[[0, -1]], [[4, 2], [5, 2]])
    dot = np.zeros((100, 100), bool)
    dot[51, 77] = True
    assert np.argwhere(ann.resize_mask(dot, (10, 10))).tolist() == [[5, 7]]


# ----------------------------------------------------------------------------- formats
def _via(root: str, entries: dict, name="via.json") -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def _via_entry(root: str, rel: str, regions) -> tuple[str, dict]:
    size = os.path.getsize(os.path.join(root, rel))
    return f"{rel}{size}", {"filename": rel, "size": size, "regions": regions}


def _sa(**shape) -> dict:
    return {"shape_attributes": shape, "region_attributes": {}}


def test_via_list_and_dict_regions_united_empty_and_unknown(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    entries = dict(
        [
            _via_entry(
                root,
                "train/pos/0.png",
                [  # a list: a rect and an ellipse with theta, united
                    _sa(name="rect", x=1, y=1, width=3, height=2),
                    _sa(name="ellipse", cx=15, cy=10, rx=5, ry=2, theta=math.pi / 2),
                ],
            ),
            _via_entry(  # VIA 1.x: regions as a dict
                root,
                "train/pos/1.png",
                {"0": _sa(name="polygon", all_points_x=[2, 6, 6, 2], all_points_y=[3, 3, 5, 5])},
            ),
            _via_entry(root, "train/neg/0.png", []),  # annotated, no lesion
        ]
    )
    a = _load("via", _via(root, {"_via_img_metadata": entries}), root, rels)  # a project file
    assert not a.errors
    m = _mask(a, "train/pos/0.png")
    assert m[1:3, 1:4].all() and m[5:15, 15].all() and not m[10, 19] and m.sum() > 6 + 20
    assert np.array_equal(_mask(a, "train/pos/1.png"), _rect(2, 3, 6, 5))
    assert a.by_image["train/neg/0.png"].n_regions == 0
    assert not _mask(a, "train/neg/0.png").any()
    assert "train/neg/1.png" not in a.by_image  # unknown
    s = ann.summarise(a, {"train": rels[:6], "test": rels[6:]})
    assert (s["annotated"], s["empty"], s["unknown"]) == (2, 1, 5)
    assert s["regions_per_image"] == {"0": 1, "1": 1, "2": 1}
    assert ann.detect_format(os.path.join(root, "via.json")) == "via"


def _rle_counts(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: column-major run lengths, starting with background."""
    flat = m.T.ravel().astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    return runs + [n]


def test_coco_polygon_bbox_rle_compressed_and_not(tmp_path):
    from pycocotools import mask as mask_utils

    root = str(tmp_path / "raw")
    rels = _folder(root)
    blob = _rect(10, 4, 14, 9)
    blob[12:15, 3:5] = True
    compressed = mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # as JSON holds it
    images = [{"id": k, "file_name": r, "width": W, "height": H} for k, r in enumerate(rels[:5])]
    del images[3]["width"], images[3]["height"]  # optional
    images[4].update(width=2 * W, height=2 * H)  # coordinates for a 2x larger image: scaled
    data = {
        "images": images,
        "annotations": [
            {"image_id": 0, "segmentation": compressed},
            {"image_id": 1, "segmentation": {"size": [H, W], "counts": _rle_counts(blob)}},
            {"image_id": 3, "bbox": [2, 3, 4, 2], "segmentation": []},
            {"image_id": 3, "segmentation": [[16, 2, 20, 2, 20, 6, 16, 6]]},
            {"image_id": 4, "bbox": [4, 6, 8, 4]},
        ],
    }
    path = _via(root, data, "coco.json")
    assert ann.detect_format(path) == "coco"
    a = _load("coco", path, root, rels)
    assert not a.errors
    assert np.array_equal(_mask(a, "train/neg/0.png"), blob)  # compressed RLE
    assert np.array_equal(_mask(a, "train/neg/1.png"), blob)  # uncompressed RLE
    assert a.by_image["train/neg/2.png"].n_regions == 0  # listed, no annotation
    m = _mask(a, "train/pos/0.png")  # bbox and polygon united
    assert m[3:5, 2:6].all() and m[2:6, 16:20].all() and m.sum() <= 8 + 25
    assert np.array_equal(_mask(a, "train/pos/1.png"), _rect(2, 3, 6, 5))
    s = ann.summarise(a, {"train": rels[:6], "test": rels[6:]})
    assert (s["annotated"], s["empty"], s["unknown"]) == (4, 1, 3)


def test_yolo_label_tree_beside_files_and_empty(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    labels = str(tmp_path / "labels")
    os.makedirs(os.path.join(labels, "train", "pos"))
    with open(os.path.join(labels, "train", "pos", "0.txt"), "w") as f:
        f.write("0 0.25 0.25 0.25 0.2\n1 0.75 0.5 0.25 0.4\n")  # two boxes
    open(os.path.join(labels, "train", "pos", "1.txt"), "w").close()  # no lesion
    with open(os.path.join(labels, "classes.txt"), "w") as f:
        f.write("tumour\n")  # labelImg's class list: not a label file
    with open(os.path.join(root, "train", "pos", "2.txt"), "w") as f:  # beside the image
        f.write("0 0.25 0.25 0.75 0.25 0.5 0.75\n")  # a YOLO polygon: (6, 5) (18, 5) (12, 15)
    a = _load("yolo", labels, root, rels)
    assert not a.errors
    assert np.array_equal(_mask(a, "train/pos/0.png"), _rect(3, 3, 9, 7) | _rect(15, 6, 21, 14))
    assert a.by_image["train/pos/1.png"].n_regions == 0
    tri = _mask(a, "train/pos/2.png")
    assert tri[8, 12] and not tri[14, 7] and 50 <= tri.sum() <= 70
    assert set(a.by_image) == {"train/pos/0.png", "train/pos/1.png", "train/pos/2.png"}
    src = ann.source_for("yolo", labels, root, "folder")
    assert src.excludes(layouts.RawFile("train", "pos", "train/pos/2.txt", f"{root}/x/2.txt"))


def test_mask_images_beside_and_in_a_tree(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    m = (_rect(4, 4, 8, 8) * 255).astype(np.uint8)
    _save(os.path.join(root, "train", "pos", "0_mask.png"), m)  # beside (LGG style)
    a = _load("masks", "", root, rels)
    assert not a.errors and set(a.by_image) == {"train/pos/0.png"}
    assert np.array_equal(_mask(a, "train/pos/0.png"), _rect(4, 4, 8, 8))
    tree = str(tmp_path / "masks")
    two = _rect(1, 1, 3, 3) | _rect(10, 10, 12, 12)
    _save(
        os.path.join(tree, "train", "pos", "1.png"), np.stack([two * 200] * 3, -1).astype(np.uint8)
    )
    _save(os.path.join(tree, "test", "pos", "0.png"), np.zeros((H, W), np.uint8))
    a = _load("masks", tree, root, rels)
    assert not a.errors
    assert a.by_image["train/pos/1.png"].n_regions == 2
    assert np.array_equal(_mask(a, "train/pos/1.png"), two)
    assert a.by_image["test/pos/0.png"].n_regions == 0  # an all-zero mask: a negative


def test_file_names_match_by_path_then_name_then_size(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    refs = _refs(root, rels)
    index = ann._ImageIndex(refs, ann.source_for("via", _via(root, {}), root, "folder"))
    by_rel = {r.relpath: r for r in refs}
    assert index.find("f", "e", "train/pos/1.png") is by_rel["train/pos/1.png"]
    assert index.find("f", "e", "http://host/x/neg/2.png") is by_rel["train/neg/2.png"]
    sizes = {r.relpath: r.file_size for r in refs}
    one = [r for r in rels if r.endswith("/1.png")]
    assert len(set(sizes[r] for r in one)) == len(one)  # PNGs of noise differ in size
    for r in one:
        assert index.find("f", "e", "1.png", sizes[r]) is by_rel[r]
    with pytest.raises(ann.AnnotationError, match="matches several images"):
        index.find("f", "e", "1.png")


# ----------------------------------------------------------------------------- errors
def _one_error(a: ann.AnnotationSet) -> str:
    assert len(a.errors) == 1, [str(e) for e in a.errors]
    line = str(a.errors[0])
    assert "\n" not in line
    return line


def test_bad_annotations_name_the_file_and_the_entry(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    key, entry = _via_entry(
        root, "train/pos/0.png", [_sa(name="rect", x=1, y=1, width=2, height=2)]
    )
    cases = {
        "outside": (
            _sa(name="polygon", all_points_x=[30, 40, 35], all_points_y=[2, 2, 8]),
            "region 0: polygon lies outside the 24x20 image",
        ),
        "far": (
            _sa(name="rect", x=0, y=0, width=100, height=10),
            "region 0: rect reaches 317% of the image side beyond the 24x20 image",
        ),
        "shape": (_sa(name="hexagon", cx=3, cy=3), "region 0: unknown shape 'hexagon'"),
        "missing": (_sa(name="ellipse", cx=3, cy=3, rx=2), "region 0: ellipse without ry"),
    }
    for name, (region, expected) in cases.items():
        path = _via(root, {key: {**entry, "regions": [region]}}, f"{name}.json")
        line = _one_error(_load("via", path, root, rels))
        assert line.startswith(f"{path}: entry '{key}' {expected}"), line
    path = _via(root, {"nope.png1": {"filename": "nope.png", "size": 1, "regions": []}}, "m.json")
    line = _one_error(_load("via", path, root, rels))
    assert line.startswith(f"{path}: entry 'nope.png1': names 'nope.png', which is not an image")
    with open(os.path.join(root, "broken.json"), "w") as f:
        f.write('{"a.png1": {"filename": "a.png",\n "regions": [}')
    line = _one_error(_load("via", os.path.join(root, "broken.json"), root, rels))
    assert line.startswith(f"{root}/broken.json: line 2: malformed JSON")


def test_bad_yolo_coco_and_mask_files(tmp_path):
    root = str(tmp_path / "raw")
    rels = _folder(root)
    labels = str(tmp_path / "labels")
    os.makedirs(os.path.join(labels, "train", "pos"))
    bad = os.path.join(labels, "train", "pos", "0.txt")
    with open(bad, "w") as f:
        f.write("0 0.5 0.5 0.2 0.2\n\n0 0.5 0.5\n")
    orphan = os.path.join(labels, "train", "pos", "7.txt")
    with open(orphan, "w") as f:
        f.write("0 0.5 0.5 0.2 0.2\n")
    a = _load("yolo", labels, root, rels)
    lines = sorted(str(e) for e in a.errors)
    assert lines[0].startswith(f"{bad}: line 3: 3 fields; expected 'class x_center")
    assert lines[1] == f"{orphan}: annotates no image of {root}"
    assert "train/pos/0.png" not in a.by_image  # its annotation is bad: unknown
    data = {
        "images": [{"id": 1, "file_name": rels[0], "width": W, "height": H}],
        "annotations": [
            {"image_id": 7, "bbox": [1, 1, 2, 2]},
            {"image_id": 1, "segmentation": {"size": [H + 1, W], "counts": "abc"}},
        ],
    }
    path = _via(root, data, "coco.json")
    lines = [str(e) for e in _load("coco", path, root, rels).errors]
    assert lines == [
        f"{path}: annotations[0]: image_id 7 is not in images",
        f"{path}: annotations[1]: RLE size [21, 24] but the image is 24x20 (h, w expected)",
    ]
    _save(os.path.join(root, "train", "pos", "1_mask.png"), np.zeros((H, W + 1), np.uint8))
    line = _one_error(_load("masks", "", root, rels))
    assert line.endswith("1_mask.png: mask is 25x20 but train/pos/1.png is 24x20")


# ----------------------------------------------------------------------------- builds
def _lesion_folder(root: str) -> dict[str, tuple[int, int, int, int]]:
    """40x48 images, dark with noise; 'pos' ones carry a bright rectangle (the lesion).
    Returns relpath -> lesion (x, y, w, h) for the positives."""
    boxes = {}
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("neg", "pos"):
            for i in range(n):
                a = rng.integers(0, 40, (40, 48)).astype(np.uint8)
                rel = f"{split}/{c}/{i}.png"
                if c == "pos":
                    x, y = int(rng.integers(2, 30)), int(rng.integers(2, 22))
                    a[y : y + 14, x : x + 12] = 230
                    boxes[rel] = (x, y, 12, 14)
                _save(os.path.join(root, rel), a)
    return boxes


def test_build_with_via_masks_follow_resize_and_augmentation(tmp_path):
    root = str(tmp_path / "raw")
    boxes = _lesion_folder(root)
    entries = dict(
        _via_entry(root, rel, [_sa(name="rect", x=x, y=y, width=w, height=h)])
        for rel, (x, y, w, h) in boxes.items()
        if rel != "train/pos/5.png"  # left out: unknown
    )
    entries.update([_via_entry(root, f"train/neg/{i}.png", []) for i in range(3)])  # negatives
    out = str(tmp_path / "prep")
    info = build.prepare(
        "folder",
        root,
        out,
        size=24,
        val_fraction=0.0,
        progress=False,
        workers=1,
        annotations=_via(root, entries),
        annotation_format="auto",
    )
    assert info["has_masks"]
    a = info["annotations"]
    assert (a["annotated"], a["empty"], a["unknown"]) == (8, 3, 7)
    assert a["by_split"]["test"] == {"annotated": 3, "empty": 0, "unknown": 3}
    with open(os.path.join(out, "audit.md")) as f:
        assert "## Annotations" in f.read()
    ev = next(
        iter(
            ip.make_eval_iterator(
                out,
                "train",
                global_batch_size=12,
                preprocess=ip.Preprocess(24, 1, "unit"),
                shard_index=0,
                shard_count=1,
            )
        )
    )
    known = dict(zip(ev["id"], ev["mask_known"]))
    assert (
        not known["train/pos/5.png"] and known["train/neg/0.png"] and not known["train/neg/4.png"]
    )
    _assert_masks_on_lesions(ev["image"][..., 0], ev["mask"])
    it = ip.make_train_iterator(
        out,
        "train",
        global_batch_size=12,
        preprocess=ip.Preprocess(24, 1, "unit"),
        augment={
            "rotation_range": 30,
            "width_shift_range": 0.2,
            "height_shift_range": 0.1,
            "zoom_range": 0.1,
            "horizontal_flip": True,
        },
        shard_index=0,
        shard_count=1,
    )
    for _ in range(2):
        b = next(it)
        _assert_masks_on_lesions(b["image"][..., 0], b["mask"])


def _assert_masks_on_lesions(images: np.ndarray, masks: np.ndarray) -> None:
    has = masks.reshape(len(masks), -1).max(1) > 0.5
    assert has.sum() >= 3
    for im, m in zip(images[has], masks[has]):
        inside, outside = im[m > 0.5].mean(), im[m <= 0.5].mean()
        assert inside > 0.7 and outside < 0.45, (inside, outside)


def test_build_stops_on_a_bad_annotation_unless_skip_bad(tmp_path):
    root = str(tmp_path / "raw")
    boxes = _lesion_folder(root)
    entries = dict(
        _via_entry(root, rel, [_sa(name="rect", x=x, y=y, width=w, height=h)])
        for rel, (x, y, w, h) in boxes.items()
    )
    key = next(k for k in entries if k.startswith("train/pos/1.png"))
    entries[key]["regions"] = [_sa(name="circle", cx=500, cy=500, r=3)]
    path = _via(root, entries)
    kw = dict(val_fraction=0.0, progress=False, workers=1, annotations=path)
    with pytest.raises(build.BuildError) as e:
        build.prepare("folder", root, str(tmp_path / "p1"), **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: entry '{key}' region 0: circle lies")
    info = build.prepare("folder", root, str(tmp_path / "p2"), skip_bad=True, **kw)
    assert len(info["annotations"]["skipped"]) == 1
    assert info["annotations"]["unknown"] == 18 - len(boxes) + 1


def test_yolo_layout_builds_with_masks(tmp_path):
    root = str(tmp_path / "yolo")
    rng = np.random.default_rng(1)
    for c in ("glioma", "pituitary"):
        for i in range(5):
            a = rng.integers(0, 40, (32, 32)).astype(np.uint8)
            a[8:16, 12:24] = 220
            _save(os.path.join(root, "images", c, f"{c}{i}.jpg"), a)
            os.makedirs(os.path.join(root, "labels", c), exist_ok=True)
            with open(os.path.join(root, "labels", c, f"{c}{i}.txt"), "w") as f:
                f.write("2 0.5625 0.375 0.375 0.25\n")
    assert layouts.detect_layout(root) == "yolo"
    out = str(tmp_path / "prep")
    info = build.prepare("yolo", root, out, val_fraction=0.2, progress=False, workers=1)
    assert info["label_names"] == ["glioma", "pituitary"] and info["annotations"]["annotated"] == 10
    ex = ip.load_examples(out, "train", range(4), preprocess=ip.Preprocess(32, 1, "unit"))
    assert all(i.startswith("images/") for i in ex["id"]) and ex["mask_known"].all()
    assert np.array_equal(ex["mask"][0] > 0.5, np.pad(np.ones((8, 12), bool), ((8, 16), (12, 8))))
