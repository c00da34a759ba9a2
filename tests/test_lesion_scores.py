"""Issue 12 parts 4-6: localisation with intervals and paired comparisons, lesion reliance's
parts, and an annotated user folder scored end to end (explain_quality_folder.json)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.path import Path as MplPath
from PIL import Image

from data_prep import phantoms
from xmedjax import metrics
from xmedjax.explain import annotated, export, quality, reliance, run
from xmedjax.input_pipeline import Preprocess
from xmedjax.models import create_model

SIZE = 32
PRE = Preprocess(SIZE, 1, "unit")


@pytest.fixture(scope="module")
def model():
    return nnx.split(create_model("resnet50", 2, in_channels=1, width=0.0625))


# ----------------------------------------------------------------------------- intervals


def test_bootstrap_mean_ci():
    assert metrics.bootstrap_mean_ci(np.full(10, 0.25)) == [0.25, 0.25]
    values = np.random.default_rng(0).random(200)
    lo, hi = metrics.bootstrap_mean_ci(values, samples=500, seed=1)
    assert lo < values.mean() < hi and hi - lo < 0.2
    assert metrics.bootstrap_mean_ci([1.0, np.nan, 1.0]) == [1.0, 1.0]  # NaN dropped
    assert all(np.isnan(metrics.bootstrap_mean_ci([])))
    assert metrics.bootstrap_mean_ci(values, seed=3) == metrics.bootstrap_mean_ci(values, seed=3)


def test_localisation_summary_and_paired_comparisons_by_hand():
    masks = np.zeros((4, 4, 4), bool)
    masks[:, :2, :2] = True
    masks[3] = False  # a known empty mask: a negative, not a localisation target
    good = np.zeros((4, 4, 4))
    good[:, 0, 0] = 1.0  # peak and all energy inside
    bad = np.zeros((4, 4, 4))
    bad[:, 3, 3] = 1.0
    bad[0, 0, 0] = 0.5  # image 0: a third of the energy inside
    scores = quality.score_localisation({"gradcam": good, "random": bad}, masks, samples=200)
    assert scores["gradcam"]["n_localisation"] == 3
    assert scores["gradcam"]["pointing_game"] == 1.0 and scores["random"]["pointing_game"] == 0.0
    assert scores["gradcam"]["ci95"]["pointing_game"] == [1.0, 1.0]
    np.testing.assert_allclose(scores["random"]["energy_in_mask"], (1 / 3) / 3)
    diff = scores["gradcam"]["paired"]["random"]
    assert diff["n"] == 3 and diff["pointing_game"]["difference"] == 1.0
    np.testing.assert_allclose(diff["energy_in_mask"]["difference"], 1 - 1 / 9)
    lo, hi = diff["energy_in_mask"]["ci95"]
    assert 2 / 3 <= lo <= hi <= 1.0
    assert "gradcam" in scores["random"]["paired"] and scores["gradcam"]["paired"].keys() == {
        "random"
    }


def test_peak_positions_map_back_to_the_source_image():
    maps = np.zeros((2, 4, 4), np.float16)
    maps[0, 1, 2] = 1.0  # row 1, col 2
    maps[1] = 0.5  # a tie everywhere: the first pixel
    xs, ys = quality.peak_positions(maps, np.array([[40, 80], [8, 8]]))
    np.testing.assert_allclose(xs, [2.5 * 80 / 4, 0.5 * 8 / 4])
    np.testing.assert_allclose(ys, [1.5 * 40 / 4, 0.5 * 8 / 4])
    mask = np.zeros((40, 80), bool)
    mask[15, 50] = True
    assert quality.points_in_masks(xs[:1], ys[:1], [mask]).tolist() == [1.0]


def test_quality_subset_takes_only_known_masks():
    masks = np.zeros((3, 2, 2), np.float32)
    masks[:, 0, 0] = 1.0
    masks[2] = 0.0
    batch = {
        "image": np.zeros((3, 2, 2, 1), np.float32),
        "label": np.array([1, 1, 0]),
        "mask": masks,
        "mask_known": np.array([True, False, True]),
    }
    subset = quality.QualitySubset(n_images=4)
    subset.add(batch, np.ones(3, bool))
    assert len(subset.arrays()["images"]) == 1
    assert subset.mask_counts == {"annotated": 1, "empty": 1, "unknown": 1}


# ----------------------------------------------------------------------------- reliance parts


def test_fill_from_surroundings_uses_only_the_outside():
    images = np.full((1, 16, 16, 1), 0.3, np.float32)
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 5:11, 5:11] = True
    images[0, 5:11, 5:11] = 1.0  # a bright lesion on a flat background
    filled = np.asarray(reliance.fill_from_surroundings(jnp.asarray(images), jnp.asarray(masks)))
    np.testing.assert_allclose(filled, 0.3, atol=1e-5)


def test_control_region_has_the_lesion_shape_inside_the_anatomy():
    size = 48
    data = phantoms.generate("brain", 6, size, seed=5)
    pos = np.flatnonzero(data["labels"] == 1)
    images = data["images"][pos][..., None].astype(np.float32) / 255.0
    regions = reliance.removal_regions(images, data["masks"][pos], pos, seed=0)
    margin = reliance.margin_px(size)
    assert regions["placed"].sum() >= len(pos) - 1  # a large lesion may find no room
    for i in range(len(pos)):
        lesion, control = regions["lesion"][i], regions["control"][i]
        assert control.sum() == lesion.sum()  # the same shape, translated
        if not regions["placed"][i]:
            continue
        anatomy = reliance.anatomy_mask(images[i], regions["background"][i])
        assert not (control & ~anatomy).any()
        assert not (control & reliance.ndimage.binary_dilation(lesion, iterations=margin)).any()
    again = reliance.removal_regions(images[::-1], data["masks"][pos][::-1], pos[::-1], seed=0)
    np.testing.assert_array_equal(again["control"][::-1], regions["control"])  # keyed, not batched


def test_reliance_summary_by_hand():
    # 4 images, 2 classes, target 1: lesion removal flips images 0 and 1, the control none.
    p1 = np.array(
        [
            [0.9, 0.8, 0.7, 0.4],  # original (image 3 decided class 0)
            [0.2, 0.3, 0.6, 0.4],  # lesion removed
            [0.9, 0.8, 0.6, 0.3],  # control removed
            [0.8, 0.8, 0.8, 0.8],  # lesion only
        ]
    )
    probs = np.stack([1 - p1, p1], axis=-1)
    out = reliance.summarise(probs, np.ones(4, int), np.ones(4, bool), samples=100)
    assert out["n_images"] == 4 and out["n_predicted_target"] == 3
    np.testing.assert_allclose(out["lesion_removed"]["mean_drop"], np.mean([0.7, 0.5, 0.1, 0]))
    np.testing.assert_allclose(out["lesion_removed"]["flip_rate"], 2 / 3)
    assert out["control_removed"]["flip_rate"] == 0.0
    np.testing.assert_allclose(
        out["lesion_vs_control"]["mean_drop_difference"], np.mean([0.7, 0.5, 0.0, -0.1])
    )
    np.testing.assert_allclose(out["lesion_vs_control"]["flip_rate_difference"], 2 / 3)
    strict = reliance.summarise(probs, np.ones(4, int), np.ones(4, bool), threshold=0.75)
    assert strict["n_predicted_target"] == 2 and "0.75" in strict["decision"]


# ----------------------------------------------------------------------------- a prepared split


def test_explain_split_scores_localisation_with_intervals_and_reliance(model, tmp_path):
    data_dir = phantoms.build_phantom_dataset(
        str(tmp_path / "ph"), "brain", {"train": 4, "test": 12}, size=SIZE, seed=3
    )
    out = run.explain_split(
        *model,
        data_dir=data_dir,
        split="test",
        workdir=str(tmp_path),
        preprocess=PRE,
        methods=("gradcam",),
        batch_size=8,
        quality=run.QualitySettings(
            n_images=4, steps=2, methods=("gradcam", "random"), bootstrap_samples=50
        ),
        progress=False,
    )
    q = out["quality"]
    for method in ("gradcam", "random"):
        assert set(q[method]["ci95"]) == {"pointing_game", "energy_in_mask", "iou"}
    assert q["gradcam"]["paired"]["random"]["n"] == q["gradcam"]["n_localisation"] == 4
    section = q["lesion_reliance"]
    assert section["n_images"] == 4 and section["targets"] == "true label"
    for key in ("lesion_removed", "control_removed", "lesion_only"):
        assert {"mean_drop", "mean_drop_ci95", "flip_rate", "flip_rate_ci95"} <= set(section[key])
    assert sum(q["_meta"]["mask_counts"].values()) == 12
    grid = export.read_heatmaps(out["grid"])
    assert grid["masks"].shape == grid["maps_gradcam"].shape and grid["mask_known"].all()
    html = export.report_section_html(str(tmp_path))
    assert "Lesion reliance" in html and "Paired differences" in html and "class=ci>[" in html


# ----------------------------------------------------------------------------- an annotated folder


def _via_regions() -> dict[str, list[dict]]:
    """VIA shape_attributes per image name (source pixel coordinates)."""
    return {
        "a.png": [
            {"name": "polygon", "all_points_x": [10, 40, 35, 12], "all_points_y": [8, 10, 30, 28]}
        ],
        "sub/b.png": [
            {"name": "ellipse", "cx": 30, "cy": 20, "rx": 12, "ry": 6, "theta": 0.5},
            {"name": "circle", "cx": 10, "cy": 40, "r": 5},
        ],
        "c.png": [],  # annotated without a lesion: a negative
    }


def _own_mask(regions: list[dict], height: int, width: int) -> np.ndarray:
    """The test's own rasterisation: pixel centres inside each outline."""
    px, py = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    mask = np.zeros((height, width), bool)
    for r in regions:
        if r["name"] == "polygon":
            path = MplPath(np.stack([r["all_points_x"], r["all_points_y"]], axis=1))
            inside = path.contains_points(np.stack([px.ravel(), py.ravel()], axis=1))
            mask |= inside.reshape(height, width)
        else:
            rx, ry = (r["r"], r["r"]) if r["name"] == "circle" else (r["rx"], r["ry"])
            t = r.get("theta", 0.0)
            dx, dy = px - r["cx"], py - r["cy"]
            u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
            mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask


@pytest.fixture(scope="module")
def annotated_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotated")
    sizes = {"a.png": (40, 50), "sub/b.png": (60, 48), "c.png": (32, 32), "d.png": (36, 30)}
    rng = np.random.default_rng(0)
    via = {}
    for name, (h, w) in sizes.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(root / name)
        if name in _via_regions():  # d.png: not annotated (unknown)
            regions = [
                {"shape_attributes": s, "region_attributes": {}} for s in _via_regions()[name]
            ]
            size = os.path.getsize(root / name)
            via[f"{os.path.basename(name)}{size}"] = {
                "filename": os.path.basename(name),
                "size": size,
                "regions": regions,
                "file_attributes": {},
            }
    via["gone.png123"] = {"filename": "gone.png", "size": 123, "regions": []}  # not in the folder
    with open(root / "outlines.json", "w") as f:
        json.dump(via, f)
    return str(root), sizes


def test_annotated_folder_scores_match_a_recomputation_from_the_npz(
    model, annotated_folder, tmp_path
):
    folder, sizes = annotated_folder
    settings = annotated.FolderAnnotations(
        os.path.join(folder, "outlines.json"), "via", bootstrap_samples=50
    )
    out = run.predict_folder(
        *model,
        folder=folder,
        workdir=str(tmp_path),
        preprocess=PRE,
        methods=("gradcam",),
        batch_size=3,
        annotations=settings,
        progress=False,
    )
    with open(os.path.join(str(tmp_path), "explain_quality_folder.json")) as f:
        q = json.load(f)
    assert set(out["heatmaps"]) == {"gradcam", "random"}  # the baseline is always scored
    assert q["_meta"]["mask_counts"] == {"annotated": 2, "empty": 1, "unknown": 1}
    assert q["_meta"]["annotations"]["entries_without_image"] == 1
    assert q["_meta"]["annotation_error_count"] == 0
    assert not os.path.isdir(os.path.join(str(tmp_path), "overlays", "random"))
    for method in ("gradcam", "random"):
        npz = export.read_heatmaps(os.path.join(str(tmp_path), "heatmaps", f"folder_{method}.npz"))
        assert sorted(npz["ids"].tolist()) == sorted(sizes)  # relative to the folder
        assert (npz["targets"] == 1).all() and npz["maps"].shape[1:] == (SIZE, SIZE)
        hits = []
        for i, rel in enumerate(npz["ids"].tolist()):
            h, w = sizes[rel]
            assert (npz["image_height"][i], npz["image_width"][i]) == (h, w)
            regions = _via_regions().get(rel)
            if not regions:
                assert np.isnan(npz["pointing_game"][i])
                continue
            row, col = np.unravel_index(np.argmax(npz["maps"][i]), (SIZE, SIZE))
            x, y = (col + 0.5) * w / SIZE, (row + 0.5) * h / SIZE
            hits.append(float(_own_mask(regions, h, w)[int(y), int(x)]))
            assert npz["pointing_game"][i] == hits[-1]
        assert q[method]["pointing_game"] == np.mean(hits) and q[method]["n_localisation"] == 2
        energy = quality.energy_in_mask(npz["maps"][npz["lesion"]], npz["masks"][npz["lesion"]])
        np.testing.assert_allclose(q[method]["energy_in_mask"], energy.mean())
    assert q["gradcam"]["paired"]["random"]["n"] == 2
    assert q["lesion_reliance"]["n_images"] == 2 and q["lesion_reliance"]["targets"].endswith("1")
    assert np.isfinite(npz["p_lesion_removed"][npz["lesion"]]).all()
    assert np.isnan(npz["p_lesion_removed"][~npz["lesion"]]).all()
    # detection: the annotated lesion images decided as the positive class, from the npz rows
    decided = npz["predictions"][npz["lesion"]] == 1
    det = q["detection"]
    assert (det["n_images"], det["n_predicted_positive"]) == (2, int(decided.sum()))
    assert det["sensitivity"] == decided.mean()
    lo, hi = det["sensitivity_ci95"]
    assert 0 <= lo <= det["sensitivity"] <= hi <= 1 and hi - lo > 0.3  # n = 2: wide


def test_any_lesion_scores_of_a_four_class_model(annotated_folder, tmp_path):
    # A 4-class model on a folder of lesions of unknown type: "any lesion" collapses the
    # classes to lesion-free ("none") vs the rest; the maps explain the most probable other
    # class; detection counts p(not none) > p(none), recomputed from the predictions.
    folder, _ = annotated_folder
    four = nnx.split(create_model("resnet50", 4, in_channels=1, width=0.0625))
    names = ("glioma", "none", "pituitary", "meningioma")
    settings = annotated.FolderAnnotations(
        os.path.join(folder, "outlines.json"), "via", negative_class="none", bootstrap_samples=50
    )
    run.predict_folder(
        *four,
        folder=folder,
        workdir=str(tmp_path),
        preprocess=PRE,
        methods=("gradcam",),
        batch_size=3,
        label_names=names,
        annotations=settings,
        progress=False,
    )
    with open(os.path.join(str(tmp_path), "explain_quality_folder.json")) as f:
        q = json.load(f)
    with open(os.path.join(str(tmp_path), "predictions_folder.json")) as f:
        rows = {r["id"]: np.array(r["probabilities"]) for r in json.load(f)["predictions"]}
    npz = export.read_heatmaps(os.path.join(str(tmp_path), "heatmaps", "folder_gradcam.npz"))
    probs = np.stack([rows[i] for i in npz["ids"].tolist()])
    lesion = npz["lesion"]
    expected_targets = np.argmax(np.where(np.arange(4) == 1, -np.inf, probs), axis=1)
    np.testing.assert_array_equal(npz["targets"], expected_targets)
    assert (npz["targets"] != 1).all()
    anyl = q["any_lesion"]
    p_lesion = 1 - probs[lesion, 1]
    assert anyl["detection"]["n_images"] == 2
    assert anyl["detection"]["n_predicted_positive"] == int((p_lesion > 0.5).sum())
    np.testing.assert_allclose(
        anyl["lesion_reliance"]["original"]["probability"], p_lesion.mean(), rtol=1e-4
    )
    assert anyl["lesion_reliance"]["negative_class"] == "none"
    assert "none" in anyl["lesion_reliance"]["decision"]
    assert q["detection"]["n_images"] == 2  # the positive class's own section stays


def test_any_lesion_of_a_binary_model_keeps_its_threshold():
    p1 = np.array([[0.9, 0.6, 0.3]] * 4)
    probs = np.stack([1 - p1, p1], axis=-1)
    out = annotated.any_lesion(
        probs, np.ones(3, bool), negative_class=0, negative_name="notumor",
        threshold=0.5, samples=20, seed=0,
    )  # fmt: skip
    assert out["detection"]["n_predicted_positive"] == 2 and "0.5" in out["detection"]["decision"]
    np.testing.assert_allclose(annotated.any_lesion_probs(probs, 0), probs)


def test_unknown_negative_class_is_a_one_line_error():
    settings = annotated.FolderAnnotations("x.json", negative_class="healthy")
    with pytest.raises(ValueError, match="config.predict.negative_class='healthy' is not a"):
        settings.resolve_negative(("notumor", "tumor"), 2)
    named = annotated.FolderAnnotations("x.json", negative_class="tumor")
    assert named.resolve_negative(("notumor", "tumor"), 2) == (1, "tumor")
    by_index = annotated.FolderAnnotations("x.json", negative_class="0")
    assert by_index.resolve_negative(("notumor", "tumor"), 2) == (0, "notumor")
    assert annotated.FolderAnnotations("x.json").resolve_negative(("a", "b"), 2) is None


def test_mask_images_beside_the_folder_images_are_not_predicted(model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(folder / "x_mask.png")
    out = run.predict_folder(
        *model,
        folder=str(folder),
        workdir=str(tmp_path / "w"),
        preprocess=PRE,
        methods=("gradcam",),
        batch_size=4,
        annotations=annotated.FolderAnnotations(str(folder), "masks", bootstrap_samples=10),
        progress=False,
    )
    npz = export.read_heatmaps(out["heatmaps"]["gradcam"])
    assert sorted(npz["ids"].tolist()) == ["x.png", "y.png"]
    assert npz["lesion"].tolist() == [True, False] and npz["mask_known"].tolist() == [True, False]
    assert out["quality"]["gradcam"]["n_localisation"] == 1


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"annotation_format": "labelme"}, "config.predict.annotation_format must be one of"),
        ({"positive_class": -2}, "config.predict.positive_class must be >= -1"),
        ({"annotations": "x.json", "folder": ""}, "needs config.predict.folder"),
        ({"annotations": "/no/such.json"}, "config.predict.annotations must be an existing"),
        ({"annotation_format": "yolo"}, "must be a folder for annotation_format=yolo"),
        (
            {"annotations": "", "negative_class": "notumor"},
            "negative_class needs config.predict.annotations",
        ),
    ],
)
def test_annotation_keys_are_validated(changes, message, tmp_path):
    import configs.demo
    from xmedjax import config_checks

    (tmp_path / "a.json").write_text("{}")
    config = configs.demo.get_config()
    config.mode = "explain"  # explain mode scores an annotated folder as predict mode does
    config.predict.folder = str(tmp_path)
    config.predict.annotations = str(tmp_path / "a.json")
    config_checks.validate(config)  # a folder with a VIA file is fine
    for key, value in changes.items():
        config.predict[key] = value
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.validate(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_annotation_format_names_match_data_prep():
    from data_prep import annotations as annotations_lib
    from xmedjax import names

    assert names.ANNOTATION_FORMATS[0] == "auto"
    assert set(names.ANNOTATION_FORMATS) == {"auto", *annotations_lib.FORMATS}
