"""The explain and predict modes end to end on a tiny prepared phantom split and a user folder."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

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
    # channel-weighted CAMs at an earlier layer than the model's own come with a warning
    assert out["cam_layer_caveat"].startswith("gradcam at layer1")
    assert quality["_meta"]["cam_layer_caveat"].startswith("gradcam, gradcampp, xgradcam")
    html = export.report_section_html(workdir)
    assert html.count("<img") == 2 and "<table" in html
    assert "prefer hirescam" in html


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
        "status": "ok",
        "error": "",
    }
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved["label_names"] == ["no", "yes"] and saved["counts"] == {"ok": 2, "error": 0}
    assert saved["predictions"][1] == {
        "id": "b.dcm",
        "prediction": 0,
        "probabilities": [0.5, 0.5],
        "status": "ok",
        "error": None,
        "prediction_name": "no",
    }
    rows.append(predictions_io.error_row("c.jpg", "DecodeError: truncated"))
    paths = predictions_io.write_predictions(str(tmp_path), "predictions_x", rows, ["no", "yes"])
    with open(paths["csv"]) as f:
        bad = list(csv.DictReader(f))[-1]
    assert bad["status"] == "error" and bad["error"] == "DecodeError: truncated"
    assert bad["prediction"] == bad["prediction_name"] == bad["confidence"] == bad["p_no"] == ""
    saved = json.load(open(paths["json"]))
    assert saved["counts"] == {"ok": 2, "error": 1}
    assert saved["predictions"][-1]["prediction"] is None
    assert saved["predictions"][-1]["prediction_name"] is None
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


def write_dicom(path: str, *, pixels: bool = True) -> None:
    """A MONOCHROME1 DICOM with rescale and window (with no pixel data when `pixels` is False)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = 24, 24
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    if pixels:
        rng = np.random.default_rng(2)
        ds.PixelData = rng.integers(0, 1000, (24, 24), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_user_folder(folder: str) -> list[str]:
    """A PNG, a JPEG and a MONOCHROME1 DICOM with rescale and window."""
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(
        os.path.join(folder, "a.png")
    )
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(
        os.path.join(folder, "sub", "b.jpg")
    )
    write_dicom(os.path.join(folder, "c.dcm"))
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
        assert os.path.isfile(os.path.join(workdir, "overlays", "gradcam", name + ".png"))
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


def _decodes(path: str) -> bool:
    """Whether pydicom has a codec for this file here (JPEG-LS needs an optional plugin)."""
    import pydicom

    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:  # noqa: BLE001 - any failure means no codec
        return False
    return True


def write_bad_files(folder: str) -> dict[str, str]:
    """Files that cannot be read, {name: a word the error message holds}, plus pydicom's
    multi-frame RGB test files, {name: ""} (they must decode)."""
    import pydicom

    expected = {}
    data = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(data, format="JPEG")
    with open(os.path.join(folder, "truncated.jpg"), "wb") as f:
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
    expected["truncated.jpg"] = "truncated"
    with open(os.path.join(folder, "notes.png"), "w") as f:
        f.write("not an image, just a note\n")
    expected["notes.png"] = "not an image"
    write_dicom(os.path.join(folder, "nopixels.dcm"), pixels=False)
    expected["nopixels.dcm"] = "DICOM"
    for name, target in (
        ("MR_small_jpeg_ls_lossless.dcm", "jpegls.dcm"),
        ("SC_rgb_rle_2frame.dcm", "rgb_2frame.dcm"),
        ("examples_ybr_color.dcm", "ybr_30frame.dcm"),
    ):
        source = pydicom.data.get_testdata_file(name, download=False)
        if source is None:
            continue
        shutil.copy(source, os.path.join(folder, target))
        expected[target] = "" if target != "jpegls.dcm" or _decodes(source) else "JPEG-LS"
    return expected


def test_predict_folder_reports_unreadable_files_and_predicts_the_rest(model, tmp_path, capsys):
    folder = str(tmp_path / "user")
    good = write_user_folder(folder)
    expected = write_bad_files(folder)
    assert {"truncated.jpg", "notes.png", "nopixels.dcm"} <= set(expected)
    good += [name for name, word in expected.items() if not word]
    bad = {name: word for name, word in expected.items() if word}
    capsys.readouterr()
    out, rows, saved = predict_folder(
        model,
        folder,
        tmp_path / "work",
        methods=("gradcam",),
        batch_size=2,
        label_names=["normal", "tumor"],
    )
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted(good + list(bad))
    for name in good:
        row = by_id[name]
        assert row["status"] == "ok" and row["error"] == "" and row["prediction"] in ("0", "1")
    for name, word in bad.items():
        row = by_id[name]
        assert row["status"] == "error" and word.lower() in row["error"].lower(), row
        assert row["prediction"] == row["confidence"] == row["p_tumor"] == ""
    assert saved["counts"] == {"ok": len(good), "error": len(bad)}
    json_rows = {r["id"]: r for r in saved["predictions"]}
    assert all(json_rows[name]["prediction"] is None for name in bad)
    assert all(json_rows[name]["error"] for name in bad)
    data = export.read_heatmaps(out["heatmaps"]["gradcam"])
    assert sorted(data["ids"].tolist()) == sorted(good)
    np.testing.assert_array_equal(
        data["targets"], [int(by_id[i]["prediction"]) for i in data["ids"]]
    )
    overlays = os.path.join(str(tmp_path / "work"), "overlays", "gradcam")
    written = {
        os.path.relpath(os.path.join(r, f), overlays) for r, _, fs in os.walk(overlays) for f in fs
    }
    assert written == {name + ".png" for name in good}
    printed = capsys.readouterr().out
    assert f"predicted {len(good)} of {len(good) + len(bad)} files" in printed
    assert f"{len(bad)} could not be read" in printed


def test_a_folder_of_unreadable_files_raises_after_writing_its_rows(model, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "notes.png").write_text("text\n")
    graphdef, state = model
    with pytest.raises(RuntimeError, match="none of the 1 files"):
        run.predict_folder(
            graphdef,
            state,
            folder=str(folder),
            workdir=str(tmp_path / "w"),
            preprocess=PRE,
            methods=("gradcam",),
            progress=False,
        )
    saved = json.load(open(tmp_path / "w" / "predictions_folder.json"))
    assert saved["counts"] == {"ok": 0, "error": 1}
    assert not os.path.exists(tmp_path / "w" / "heatmaps" / "folder_gradcam.npz")


def test_folder_runs_replace_their_outputs_and_keep_overlay_names_apart(
    model, tmp_path, monkeypatch
):
    first = tmp_path / "first"
    first.mkdir()
    image = np.random.default_rng(3).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(image).save(first / "a.jpg")
    Image.fromarray(image).save(first / "a.png")
    write_dicom(str(first / "a.dcm"))
    work = tmp_path / "work"
    predict_folder(model, first, work, methods=("gradcam",), batch_size=2)
    names = sorted(os.listdir(work / "overlays" / "gradcam"))
    assert names == ["a.dcm.png", "a.jpg.png", "a.png.png"]  # one overlay per file

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a run that fails leaves nothing that looks fresh
        patch.setattr(run.export, "write_heatmaps", broken)
        with pytest.raises(OSError, match="disk full"):
            predict_folder(model, first, work, methods=("gradcam",), batch_size=2)
    left = sorted(os.listdir(work))
    assert left == ["heatmaps"] and os.listdir(work / "heatmaps") == [], left

    second = tmp_path / "second"
    write_user_folder(str(second))
    out, rows, _ = predict_folder(model, second, work, methods=("hirescam",), batch_size=2)
    assert sorted(os.listdir(work / "overlays")) == ["hirescam"]  # no gradcam of run 1
    overlays = work / "overlays" / "hirescam"
    written = {
        os.path.relpath(os.path.join(r, f), overlays) for r, _, fs in os.walk(overlays) for f in fs
    }
    assert written == {r["id"] + ".png" for r in rows}
    assert os.listdir(work / "heatmaps") == ["folder_hirescam.npz"]
    predict_folder(model, second, work, batch_size=2)  # predictions only: old maps go too
    assert not os.path.exists(work / "overlays") and os.listdir(work / "heatmaps") == []
