"""Heatmap export: npz round trip, greyscale overlays, grid case selection, report HTML."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xmedjax.explain import export


def test_overlay_handles_greyscale_and_rgb():
    grey = np.linspace(-2, 2, 16, dtype=np.float32).reshape(4, 4)  # any normalisation
    heat = np.zeros((4, 4))
    for image in (grey, grey[..., None], np.repeat(grey[..., None], 3, axis=-1)):
        out = export.overlay(image, heat, alpha=0.0)
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8
        # alpha 0: the image alone, min-max scaled and replicated over RGB
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
        assert out.min() == 0 and out.max() == 255
    full = export.overlay(grey, np.ones((4, 4)), alpha=1.0)
    from matplotlib import colormaps

    np.testing.assert_array_equal(
        full[0, 0], np.round(255 * np.array(colormaps["jet"](1.0)[:3])).astype(np.uint8)
    )
    with pytest.raises(ValueError):
        export.overlay(grey, np.ones((2, 2)))


def test_save_overlay_png(tmp_path):
    from PIL import Image

    path = export.save_overlay_png(str(tmp_path / "a" / "b.png"), np.zeros((5, 6, 1)), np.eye(5, 6))
    assert Image.open(path).size == (6, 5) and Image.open(path).mode == "RGB"


def test_heatmap_npz_round_trip(tmp_path):
    arrays = dict(
        ids=np.array(["a", "b"]),
        labels=np.array([0, 1]),
        predictions=np.array([0, 0]),
        probabilities=np.eye(2),
        targets=np.array([0, 0]),
        raw=np.ones((2, 2, 2)),
        maps=np.zeros((2, 8, 8), np.float16),
        index=np.array([0, 1]),
    )
    path = export.write_heatmaps(export.heatmap_path(str(tmp_path), "test", "gradcam"), **arrays)
    assert path.endswith(os.path.join("heatmaps", "test_gradcam.npz"))
    back = export.read_heatmaps(path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(ValueError):
        export.write_heatmaps(path, ids=arrays["ids"])


def test_select_grid_cases():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    predictions = np.array([0, 0, 0, 1, 1, 0, 0])
    probs = np.array([0.9, 0.6, 0.8, 0.3, 0.2, 0.7, 0.95])
    probabilities = np.stack([probs, 1 - probs], axis=1)
    cases = export.select_grid_cases(labels, predictions, probabilities, per_group=2)
    # confidence = probability of the predicted class
    assert cases[0] == [[0, 2], [1, 2], [3], [3]]
    assert cases[1] == [[4], [4], [6, 5], [5, 6]]


@pytest.fixture
def workdir_with_grid(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "heatmaps")
    cases = [[[0], [1], [], [2]], [[3], [3], [], []]]
    np.savez_compressed(
        tmp_path / "heatmaps" / "test_grid.npz",
        images=rng.integers(0, 255, (4, 16, 16, 1)).astype(np.uint8),
        labels=np.array([0, 0, 0, 1]),
        predictions=np.array([0, 0, 1, 1]),
        probabilities=np.full((4, 2), 0.5),
        ids=np.array(list("abcd")),
        cases=np.array(json.dumps(cases)),
        methods=np.array(["gradcam", "random"]),
        label_names=np.array(["normal", "lesion"]),
        maps_gradcam=rng.random((4, 16, 16)),
        maps_random=rng.random((4, 16, 16)),
    )
    with open(tmp_path / "explain_quality.json", "w") as f:
        json.dump(
            {
                "gradcam": {"pointing_game": 0.5, "deletion_auc": None},
                "random": {"pointing_game": 0.1},
                "_meta": {"split": "test", "n_images": 4},
            },
            f,
        )
    return str(tmp_path)


def test_report_section_html(workdir_with_grid):
    html = export.report_section_html(workdir_with_grid)
    assert html.count("<img") == 2 and "data:image/png;base64," in html
    assert "gradcam" in html and "<table" in html and "0.500" in html
    only = export.report_section_html(workdir_with_grid, methods=("random",))
    assert only.count("<img") == 1
    assert export.report_section_html(os.path.join(workdir_with_grid, "heatmaps")) == ""


def test_heatmap_grid_figure_layout():
    images = np.zeros((2, 8, 8))
    fig = export.heatmap_grid_figure(
        images,
        np.zeros((2, 8, 8)),
        np.array([0, 1]),
        np.array([0, 0]),
        np.full((2, 2), 0.5),
        [[[0], [], [], []], [[], [], [1], []]],
        label_names=["a", "b"],
        title="t",
    )
    assert len(fig.axes) == 2 * 4  # 2 classes x 4 groups x 1 per group
    import matplotlib.pyplot as plt

    plt.close(fig)
