"""Borrowing masks from the annotated dataset an image was copied from, through a mirror."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image

from data_prep import build, image_io
from xmedjax import input_pipeline as ip

H, W = 40, 48


def _img(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((W, H), PIL.Image.BICUBIC))


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.ascontiguousarray(arr)).save(path)


def _donor(root: str) -> None:
    """A yolo-layout set: images/{glioma,pituitary}/d<k>.png, one box each, left half."""
    for k in range(6):
        c = ("glioma", "pituitary")[k % 2]
        _save(os.path.join(root, "images", c, f"d{k}.png"), _img(k))
        os.makedirs(os.path.join(root, "labels", c), exist_ok=True)
        with open(os.path.join(root, "labels", c, f"d{k}.txt"), "w") as f:
            f.write("0 0.25 0.25 0.25 0.25\n")  # x 6..18, y 5..15


def _target(root: str) -> None:
    """A train/test folder holding copies of donor images, plain, mirrored and rotated."""
    noise = np.random.default_rng(9).integers(-2, 3, (H, W))
    _save(os.path.join(root, "train", "glioma", "a.png"), _img(0))  # plain copy
    _save(os.path.join(root, "train", "pituitary", "b.png"), _img(1)[:, ::-1])  # mirror
    _save(os.path.join(root, "train", "glioma", "c.png"), np.rot90(_img(2)))  # rotated
    _save(os.path.join(root, "train", "pituitary", "unrelated.png"), _img(100))
    noisy = np.clip(_img(3)[:, ::-1].astype(int) + noise, 0, 255).astype(np.uint8)
    _save(os.path.join(root, "test", "pituitary", "d.png"), noisy)  # noisy mirror of d3
    _save(os.path.join(root, "test", "glioma", "e.png"), _img(5)[:, ::-1])  # label differs
    _save(os.path.join(root, "test", "glioma", "f.png"), _img(101))


def _masks(out: str) -> dict[str, np.ndarray | None]:
    """id -> stored mask (None when unknown)."""
    masks = {}
    for split in ("train", "test"):
        src = ip.PreparedSource(out, split)
        for k in range(len(src)):
            rec = src[k]
            m = image_io.decode_png(rec["mask"]) > 127
            masks[rec["id"].decode()] = m if rec["mask_known"] else None
    return masks


def _box(x0, y0, x1, y1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _check(out: str, info: dict, donor: str) -> None:
    b = info["annotations"]["borrowed"]
    assert b["from"] == os.path.abspath(donor) and b["matched"] == 5
    assert b["by_transform"] == {"fliplr": 3, "identity": 1, "rot90": 1}
    assert b["by_split"] == {"train": 3, "test": 2}
    assert b["label_disagreements"] == {"glioma <- pituitary": 1}
    masks = _masks(out)
    left, right = _box(6, 5, 18, 15), _box(30, 5, 42, 15)
    assert np.array_equal(masks["train/glioma/a.png"], left)
    assert np.array_equal(masks["train/pituitary/b.png"], right)  # carried through the mirror
    assert np.array_equal(masks["test/pituitary/d.png"], right)
    # np.rot90 (counter-clockwise): the box's x 6..18 becomes rows 48-18..48-6, y 5..15 x
    assert np.array_equal(masks["train/glioma/c.png"], _box(5, 30, 15, 42, shape=(W, H)))
    assert masks["train/pituitary/unrelated.png"] is None and masks["test/glioma/f.png"] is None
    a = info["annotations"]
    assert (a["annotated"], a["empty"], a["unknown"]) == (5, 0, 2)


def test_borrow_through_a_mirror_from_a_yolo_folder_and_a_prepared_dataset(tmp_path):
    donor, target = str(tmp_path / "donor"), str(tmp_path / "target")
    _donor(donor)
    _target(target)
    kw = dict(val_fraction=0.0, progress=False, workers=1)
    out = str(tmp_path / "prep")
    info = build.prepare("folder", target, out, annotations_from=donor, **kw)
    _check(out, info, donor)
    with open(os.path.join(out, "audit.md")) as f:
        assert "Borrowed from" in f.read()
    prepared_donor = str(tmp_path / "donor_prep")
    build.prepare("yolo", donor, prepared_donor, **kw)
    out2 = str(tmp_path / "prep2")
    info2 = build.prepare("folder", target, out2, annotations_from=prepared_donor, **kw)
    _check(out2, info2, prepared_donor)
