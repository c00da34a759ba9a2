"""Synthetic phantoms: shapes, determinism, lesion masks, variety, shortcut options."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import phantoms
from data_prep.dataset_format import FEATURE_KEYS, MASK_KEY, MASK_KNOWN_KEY
from xmedjax import input_pipeline as ip


@pytest.mark.parametrize("kind", phantoms.KINDS)
def test_generate_shapes_and_masks(kind):
    d = phantoms.generate(kind, 40, 48, seed=3)
    assert d["images"].shape == (40, 48, 48) and d["images"].dtype == np.uint8
    assert d["labels"].shape == (40,) and d["masks"].shape == (40, 48, 48)
    assert d["labels"].sum() == 20
    area = d["masks"].reshape(40, -1).sum(1)
    assert np.all(area[d["labels"] == 0] == 0) and np.all(area[d["labels"] == 1] > 0)
    # The lesion is brighter than the tissue around it (it is what the label is about).
    from scipy import ndimage

    for i in np.nonzero(d["labels"])[0]:
        img, m = d["images"][i].astype(float), d["masks"][i]
        ring = ndimage.binary_dilation(m, iterations=3) & ~m
        assert img[m].mean() > img[ring].mean() + 15
    # Lesions vary in size and position.
    pos = d["labels"] == 1
    assert area[pos].max() > 2 * area[pos].min()
    centres = [np.argwhere(m).mean(0) for m in d["masks"][pos]]
    assert np.std([c[0] for c in centres]) > 3 and np.std([c[1] for c in centres]) > 3


def test_generate_is_seeded():
    a = phantoms.generate("brain", 6, 32, seed=1)
    b = phantoms.generate("brain", 6, 32, seed=1)
    c = phantoms.generate("brain", 6, 32, seed=2)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
    assert not np.array_equal(a["images"], c["images"])


@pytest.mark.parametrize("shortcut", ["corner_marker", "intensity", "border"])
def test_pixel_shortcuts_follow_the_label(shortcut):
    clean = phantoms.generate("chest", 30, 32, seed=0)
    d = phantoms.generate("chest", 30, 32, seed=0, shortcut=shortcut, shortcut_strength=1.0)
    assert np.array_equal(d["nuisance"], d["labels"] == 1)
    assert np.array_equal(d["masks"], clean["masks"])  # the lesion is still there
    on = d["nuisance"]
    assert not np.array_equal(d["images"][on], clean["images"][on])
    assert np.array_equal(d["images"][~on], clean["images"][~on])
    half = phantoms.generate("chest", 400, 16, seed=0, shortcut=shortcut, shortcut_strength=0.0)
    agree = (half["nuisance"] == (half["labels"] == 1)).mean()
    assert 0.4 < agree < 0.6


def test_phantom_dataset_with_geometry_shortcut(tmp_path):
    out = phantoms.build_phantom_dataset(
        str(tmp_path / "ph"), "brain", {"train": 8, "test": 4}, size=24, seed=0, shortcut="aspect"
    )
    info = ip.read_dataset_info(out)
    assert info.has_masks and info.splits == {"train": 8, "test": 4}
    src = ip.PreparedSource(out, "train")
    assert set(src[0]) == {*FEATURE_KEYS, MASK_KEY, MASK_KNOWN_KEY}  # what the format says
    for i in range(len(src)):
        rec = src[i]
        want = [24, 32] if rec["label"] == 1 else [24, 24]
        assert list(rec["orig_size"]) == want
    ex = ip.load_examples(out, "train", range(8), preprocess=ip.Preprocess(24, 1, "unit"))
    assert ex["image"].shape == (8, 24, 24, 1) and ex["mask"].shape == (8, 24, 24)
    assert np.all((ex["mask"].reshape(8, -1).max(1) > 0.5) == (ex["label"] == 1))


def test_write_phantom_folder(tmp_path):
    root = phantoms.write_phantom_folder(
        str(tmp_path / "raw"), "chest", {"train": 6, "test": 4}, size=20, seed=1, shortcut="size"
    )
    import os

    names = sorted(os.listdir(os.path.join(root, "train")))
    assert names == ["NORMAL", "PNEUMONIA"]
    import PIL.Image

    for f in os.listdir(os.path.join(root, "train", "PNEUMONIA")):
        assert PIL.Image.open(os.path.join(root, "train", "PNEUMONIA", f)).size == (30, 30)
