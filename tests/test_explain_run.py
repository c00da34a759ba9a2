"""The explain and predict modes end to end on a tiny prepared phantom split and a user folder."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from flax import nnx

from data_prep import phantoms
from xmedjax.explain import export, run
from xmedjax.models import create_model

SIZE = 32
FAST = {
    "scorecam": {"chunk": 64},
    "integrated_gradients": {"steps": 2},
    "smoothgrad": {"samples": 2},
}


@pytest.fixture(scope="module")
def model():
    graphdef, state = nnx.split(create_model("resnet50", 2, in_channels=1, width=0.0625))
    return graphdef, state


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("phantoms"))
    return phantoms.build_phantom_dataset(out, "brain", {"train": 4, "test": 21}, size=SIZE, seed=3)


def test_explain_split_writes_heatmaps_grid_and_quality(model, dataset, tmp_path):
    graphdef, state = model
    workdir = str(tmp_path)
    out = run.explain_split(
        graphdef,
        state,
        data_dir=dataset,
        split="test",
        workdir=workdir,
        image_size=SIZE,
        channels=1,
        normalization="unit",
        methods=("gradcam", "hirescam"),
        batch_size=8,
        quality_images=8,
        quality_steps=4,
        method_opts=FAST,
        progress=False,
    )
    assert out["cam_layer"] == "layer1"  # 32 px: layer4 1x1, layer1 8x8
    for method in ("gradcam", "hirescam"):
        data = export.read_heatmaps(out["heatmaps"][method])
        assert set(export.HEATMAP_KEYS) <= set(data)
        assert len(data["ids"]) == 21 and len(set(data["ids"].tolist())) == 21  # padding dropped
        np.testing.assert_array_equal(np.sort(data["index"]), np.arange(21))
        assert data["maps"].shape == (21, SIZE, SIZE) and data["raw"].shape == (21, 8, 8)
        np.testing.assert_array_equal(data["targets"], data["predictions"])
        np.testing.assert_allclose(data["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    with open(os.path.join(workdir, "explain_quality.json")) as f:
        quality = json.load(f)
    assert set(run.QUALITY_METHODS) <= set(quality)
    for method in run.QUALITY_METHODS:
        for key in (
            "pointing_game",
            "energy_in_mask",
            "iou",
            "deletion_auc",
            "insertion_auc",
            "sanity_randomization_spearman",
            "sanity_randomization_ssim",
            "sanity_label_spearman",
        ):
            assert key in quality[method], (method, key)
    assert quality["_meta"]["n_images"] == 8 and quality["_meta"]["cam_layer"] == "layer1"
    html = export.report_section_html(workdir)
    assert html.count("<img") == 2 and "<table" in html


def test_explain_split_with_given_predictions(model, dataset, tmp_path):
    graphdef, state = model
    given = np.arange(21) % 2
    out = run.explain_split(
        graphdef,
        state,
        data_dir=dataset,
        split="test",
        workdir=str(tmp_path),
        image_size=SIZE,
        channels=1,
        normalization="unit",
        methods=("gradcam",),
        batch_size=8,
        quality=False,
        predictions=given,
        progress=False,
    )
    data = export.read_heatmaps(out["heatmaps"]["gradcam"])
    np.testing.assert_array_equal(data["predictions"], given[data["index"]])
    np.testing.assert_array_equal(data["targets"], given[data["index"]])


def test_predict_split(model, dataset, tmp_path):
    graphdef, state = model
    paths = run.predict_split(
        graphdef,
        state,
        data_dir=dataset,
        split="test",
        workdir=str(tmp_path),
        image_size=SIZE,
        channels=1,
        normalization="unit",
        batch_size=8,
        progress=False,
    )
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21 and {"id", "prediction", "confidence"} <= set(rows[0])


def write_user_folder(folder: str) -> list[str]:
    """A PNG, a JPEG and a MONOCHROME1 DICOM with rescale and window."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(
        os.path.join(folder, "a.png")
    )
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(
        os.path.join(folder, "sub", "b.jpg")
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(os.path.join(folder, "c.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = 24, 24
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.PixelData = rng.integers(0, 1000, (24, 24), dtype=np.uint16).tobytes()
    ds.save_as(os.path.join(folder, "c.dcm"), enforce_file_format=True)
    return ["a.png", "c.dcm", os.path.join("sub", "b.jpg")]


def test_explain_and_predict_folder(model, tmp_path):
    graphdef, state = model
    folder = str(tmp_path / "user")
    names = write_user_folder(folder)
    workdir = str(tmp_path / "work")
    out = run.explain_folder(
        graphdef,
        state,
        folder=folder,
        workdir=workdir,
        image_size=SIZE,
        channels=1,
        normalization="unit",
        methods=("gradcam",),
        batch_size=2,
        label_names=["normal", "tumor"],
        progress=False,
    )
    data = export.read_heatmaps(out["heatmaps"]["gradcam"])
    assert sorted(data["ids"].tolist()) == sorted(names)
    assert data["maps"].shape == (3, SIZE, SIZE)
    for name in names:
        assert os.path.isfile(
            os.path.join(workdir, "overlays", "gradcam", os.path.splitext(name)[0] + ".png")
        )
    with open(out["predictions"]["json"]) as f:
        preds = json.load(f)
    assert preds["label_names"] == ["normal", "tumor"] and len(preds["predictions"]) == 3
    only = run.predict_folder(
        graphdef,
        state,
        folder=folder,
        workdir=str(tmp_path / "p"),
        image_size=SIZE,
        channels=1,
        normalization="unit",
        batch_size=2,
        threshold=0.0,
        progress=False,
    )
    with open(only["predictions"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["prediction"] == "1" for r in rows)  # p1 >= 0 always
