"""The audit on a planted corpus of bad, odd and leaked files; decoding of unusual images."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from data_prep import audit, image_io


def _img(seed: int, size=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth random images so that perceptual hashes are meaningful.
    small = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize(size[::-1], PIL.Image.BICUBIC))


def _save(path: str, arr: np.ndarray, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr).save(path, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("corpus"))
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    for i in range(6):
        _save(j("train", "a", f"a{i}.png"), _img(i))
        _save(j("train", "b", f"b{i}.png"), _img(100 + i))
        _save(j("test", "a", f"ta{i}.png"), _img(200 + i))
        _save(j("test", "b", f"tb{i}.png"), _img(300 + i))
    # Byte-identical cross-split copy.
    shutil.copy(j("train", "a", "a0.png"), j("test", "a", "leak_bytes.png"))
    # Same pixels, different bytes (other PNG compression + a text chunk).
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("note", "re-encoded")
    _save(j("val", "a", "leak_pixels.png"), _img(1), compress_level=0, pnginfo=meta)
    # Near duplicate: brightness shift + a little noise.
    near = np.clip(
        _img(2).astype(int) + 3 + np.random.default_rng(9).integers(-2, 3, (40, 48)), 0, 255
    ).astype(np.uint8)
    _save(j("test", "a", "leak_near.png"), near)
    # Conflicting label: identical pixels under another class.
    shutil.copy(j("train", "b", "b1.png"), j("train", "a", "conflict.png"))
    # Patient overlap (names carry a patient id).
    _save(j("train", "b", "person7_bacteria_1.png"), _img(400))
    _save(j("test", "b", "person7_bacteria_2.png"), _img(401))
    # Bad files.
    buf = io.BytesIO()
    PIL.Image.fromarray(_img(500, (64, 64))).save(buf, format="JPEG")
    with open(j("train", "a", "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    open(j("train", "a", "empty.jpg"), "wb").close()
    with open(j("train", "b", "notes.jpg"), "w") as f:
        f.write("this is not an image\n")
    os.makedirs(j("val", "b"))  # empty class
    # Valid but unusual images.
    grad16 = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60
    PIL.Image.fromarray(grad16).save(j("train", "b", "sixteen.png"))
    rgba = np.zeros((33, 33, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:5, :, 3] = 0
    PIL.Image.fromarray(rgba).save(j("train", "b", "rgba.png"))
    cmyk = PIL.Image.new("CMYK", (34, 34), (0, 255, 255, 0))  # red
    cmyk.save(j("train", "b", "cmyk.jpg"), format="JPEG", quality=95)
    _save(j("train", "b", "tiny.png"), _img(600, (8, 8)))
    _save(j("train", "b", "png_named.jpg"), _img(601), format="PNG")
    os.makedirs(j("holdout"))  # empty split folder
    return root


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    res = audit.run_audit(corpus, workers=1, progress=False)
    out = str(tmp_path_factory.mktemp("audit_out"))
    audit.write_report(res, out)
    with open(os.path.join(out, "audit.json")) as f:
        data = json.load(f)
    with open(os.path.join(out, "audit.md")) as f:
        md = f.read()
    return data, md


def _kinds(data) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for p in data["problems"]:
        out.setdefault(p["kind"], []).append(sorted(p["files"]))
    return out


def test_bad_files_found(result):
    k = _kinds(result[0])
    assert k["undecodable"] == [["train/a/truncated.jpg"]]
    assert k["empty_file"] == [["train/a/empty.jpg"]]
    assert k["not_an_image"] == [["train/b/notes.jpg"]]
    assert any("val/b" in p["detail"] for p in result[0]["problems"] if p["kind"] == "empty_class")
    assert [p["folder"] for p in result[0]["problems"] if p["kind"] == "empty_split"] == ["holdout"]


def test_cross_split_duplicates(result):
    data = result[0]
    k = _kinds(data)
    assert ["test/a/leak_bytes.png", "train/a/a0.png"] in k["cross_split_exact_duplicate"]
    assert ["train/a/a1.png", "val/a/leak_pixels.png"] in k["cross_split_pixel_duplicate"]
    assert any(
        "test/a/leak_near.png" in g and "train/a/a2.png" in g
        for g in k["cross_split_near_duplicate"]
    )
    s = data["summary"]
    assert s["test_with_train_byte_duplicate"] == 1
    assert s["val_with_train_pixel_duplicate"] == 1
    assert s["test_with_train_near_duplicate"] == 1
    # Unrelated smooth images are not called duplicates.
    flagged = {f for p in data["problems"] if "duplicate" in p["kind"] for f in p["files"]}
    assert "test/b/tb3.png" not in flagged


def test_conflicting_label_and_patient_overlap(result):
    k = _kinds(result[0])
    assert ["train/a/conflict.png", "train/b/b1.png"] in k["conflicting_label"]
    assert k["patient_overlap"] == [
        ["test/b/person7_bacteria_2.png", "train/b/person7_bacteria_1.png"]
    ]


def test_unusual_images_decoded_not_broken(result):
    data, md = result
    bad = {
        f
        for p in data["problems"]
        if p["kind"] in ("undecodable", "not_an_image")
        for f in p["files"]
    }
    for name in ("sixteen.png", "rgba.png", "cmyk.jpg", "tiny.png", "png_named.jpg"):
        assert f"train/b/{name}" not in bad
        assert name in md
    modes = data["image_stats"]["modes"]
    assert modes.get("I;16") == 1 and modes.get("RGBA") == 1 and modes.get("CMYK") == 1
    assert data["counts"]["train"]["b"] == 6 + 1 + 5  # 6 + person7 + 5 unusual
    assert "a PNG file named .jpg" in md


def test_decode_unusual_modes(corpus):
    d16 = image_io.decode_file(os.path.join(corpus, "train/b/sixteen.png")).pixels
    assert d16.dtype == np.uint8 and d16.shape == (32, 32)
    assert d16[0, 0] == 0 and d16[-1, -1] == 255 and np.all(np.diff(d16.ravel()) >= 0)
    rgba = image_io.decode_file(os.path.join(corpus, "train/b/rgba.png")).pixels
    assert rgba.shape == (33, 33, 3)
    assert np.all(rgba[:5] == 0) and np.all(rgba[5:, :, 0] == 200)
    cmyk = image_io.decode_file(os.path.join(corpus, "train/b/cmyk.jpg")).pixels
    assert cmyk.shape == (34, 34, 3)
    r, g, b = cmyk[..., 0].mean(), cmyk[..., 1].mean(), cmyk[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_grey_rgb_collapses_to_one_channel(tmp_path):
    a = _img(1)
    p = str(tmp_path / "grey_rgb.png")
    PIL.Image.fromarray(np.stack([a] * 3, -1)).save(p)
    d = image_io.decode_file(p)
    assert d.pixels.shape == a.shape and np.array_equal(d.pixels, a)


def test_dicom_decode(tmp_path):
    import pydicom  # noqa: F401 (a declared dependency)
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path, arr, photometric, **tags):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.PixelData = arr.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)

    arr = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))  # 0..990
    p1 = str(tmp_path / "mono2.dcm")
    # slope 2, intercept -500 -> values -500..1480; window [0, 1000] -> 0..255
    write(
        p1,
        arr,
        "MONOCHROME2",
        RescaleSlope=2,
        RescaleIntercept=-500,
        WindowCenter=500,
        WindowWidth=1000,
    )
    d = image_io.decode_file(p1).pixels
    v = arr[0].astype(float) * 2 - 500
    expect = np.clip(((v - 499.5) / 999 + 0.5), 0, 1) * 255
    assert np.abs(d[0].astype(float) - expect).max() <= 1
    p2 = str(tmp_path / "mono1.dcm")
    write(p2, arr, "MONOCHROME1")
    d2 = image_io.decode_file(p2).pixels
    assert d2[0, 0] == 255 and d2[0, -1] == 0  # inverted, min-max scaled


@pytest.mark.parametrize(
    "name, frames", [("SC_rgb_rle_2frame.dcm", 2), ("examples_ybr_color.dcm", 30)]
)
def test_multiframe_colour_dicom_gives_its_middle_frame_in_rgb(name, frames):
    import pydicom
    from pydicom.pixels import pixel_array

    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    decoded = image_io.decode_file(path)
    every = pixel_array(path)  # all frames, YBR converted to RGB
    assert every.shape[0] == frames and decoded.pixels.shape == every.shape[1:]
    np.testing.assert_array_equal(decoded.pixels, every[frames // 2])
    assert decoded.mode == f"DICOM:{pydicom.dcmread(path).PhotometricInterpretation}"
