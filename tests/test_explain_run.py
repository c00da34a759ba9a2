"""The explain and predict modes end to end on a tiny prepared phantom split and a user folder."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_prep import phantoms
from xmedjax.explain import export, predictions_io, run
from xmedjax.input_pipeline import Preprocess
from xmedjax.models import create_model

SIZE = 32
PRE = Preprocess(SIZE, 1, "unit")
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
        preprocess=PRE,
        methods=("gradcam", "hirescam"),
        batch_size=8,
        quality=run.QualitySettings(n_images=8, steps=4),
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
        preprocess=PRE,
        methods=("gradcam",),
        batch_size=8,
        quality=None,
        predictions=given,
        progress=False,
    )
    data = export.read_heatmaps(out["heatmaps"]["gradcam"])
    np.testing.assert_array_equal(data["predictions"], given[data["index"]])
    np.testing.assert_array_equal(data["targets"], given[data["index"]])


def test_predictions_io_csv_and_json(tmp_path):
    rows = predictions_io.prediction_rows(
        ["a.png", "b.dcm"], np.array([1, 0]), np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    )
    paths = predictions_io.write_predictions(str(tmp_path), "predictions_x", rows, ["no", "yes"])
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == ["a.png", "b.dcm"]
    assert table[0] == {
        "id": "a.png",
        "prediction": "1",
        "prediction_name": "yes",
        "confidence": "0.750000",
        "p_no": "0.250000",
        "p_yes": "0.750000",
    }
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved["label_names"] == ["no", "yes"]
    assert saved["predictions"][1] == {
        "id": "b.dcm",
        "prediction": 0,
        "probabilities": [0.5, 0.5],
        "prediction_name": "no",
    }
    unnamed = predictions_io.write_predictions(str(tmp_path), "p", rows, None)
    assert json.load(open(unnamed["json"]))["label_names"] == ["0", "1"]


def predict_folder(model, folder, workdir, **kwargs) -> tuple[dict, list[dict], dict]:
    """`run.predict_folder` at the test's preprocessing: (result, CSV rows, JSON content)."""
    graphdef, state = model
    out = run.predict_folder(
        graphdef,
        state,
        folder=str(folder),
        workdir=str(workdir),
        preprocess=PRE,
        progress=False,
        **kwargs,
    )
    with open(out["predictions"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    with open(out["predictions"]["json"]) as f:
        return out, rows, json.load(f)


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
        preprocess=PRE,
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
    only, rows, _ = predict_folder(model, folder, tmp_path / "p", batch_size=2, threshold=0.0)
    assert len(rows) == 3 and all(r["prediction"] == "1" for r in rows)  # p1 >= 0 always
    assert {"id", "prediction", "prediction_name", "confidence", "p_0", "p_1"} <= set(rows[0])
    assert only["heatmaps"] == {} and not os.path.exists(str(tmp_path / "p" / "overlays"))


def test_folder_explains_the_reported_thresholded_class(model, tmp_path):
    """With a (val-chosen) threshold, every explained target is the reported prediction.

    The threshold is placed so that argmax and the thresholded decision differ on some
    images: an explain loop that explained the argmax would fail here.
    """
    folder = str(tmp_path / "user")
    names = write_user_folder(folder)
    rng = np.random.default_rng(1)
    for i in range(4):  # 7 images over batches of 3: the last batch is padded
        image = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"n{i}.png"))
    _, _, probe = predict_folder(model, folder, tmp_path / "probe", batch_size=3)
    p1 = np.array([r["probabilities"][1] for r in probe["predictions"]])
    threshold = float(p1.min()) if p1.min() < 0.5 else float(p1.max()) + 1e-3
    out, rows, saved = predict_folder(
        model,
        folder,
        tmp_path / "work",
        methods=("gradcam", "hirescam", "scorecam"),
        method_opts=FAST,
        batch_size=3,
        threshold=threshold,
        label_names=["normal", "tumor"],
    )
    by_csv = {r["id"]: int(r["prediction"]) for r in rows}
    by_json = {r["id"]: r["prediction"] for r in saved["predictions"]}
    assert by_csv == by_json and len(by_csv) == len(names) + 4
    for method in ("gradcam", "hirescam", "scorecam"):
        data = export.read_heatmaps(out["heatmaps"][method])
        ids = data["ids"].tolist()
        assert sorted(ids) == sorted(by_csv)
        np.testing.assert_array_equal(data["targets"], data["predictions"])
        np.testing.assert_array_equal(data["predictions"], [by_csv[i] for i in ids])
        p = data["probabilities"]
        np.testing.assert_array_equal(data["predictions"], p[:, 1] >= np.float32(threshold))
        assert np.any(np.argmax(p, axis=1) != data["predictions"])  # the case that matters


def test_compare_models_markdown_table(model, dataset):
    from xmedjax.explain import compare

    graphdef, state = model
    entry = dict(
        graphdef=graphdef,
        state=state,
        data_dir=dataset,
        image_size=SIZE,
        channels=1,
        normalization="unit",
    )
    other_state = jax.tree.map(lambda v: v * 0.9, state)
    results = compare.compare_models(
        [dict(entry, label="resnet50 a"), dict(entry, label="resnet50 b", state=other_state)],
        n_images=8,
        methods=("gradcam", "scorecam", "random"),
        method_opts=FAST,
        steps=4,
    )
    assert results["resnet50 a"]["meta"]["cam_layer"] == "layer1"
    text = compare.markdown_table(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].count("resnet50 a") == len(compare.COLUMNS) and rows[0].count(
        "resnet50 b"
    ) == len(compare.COLUMNS)
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["gradcam", "scorecam", "random"]
    assert "best pointing game" in text
