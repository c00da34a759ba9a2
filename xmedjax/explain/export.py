"""Writing saliency maps out: npz files, PNG overlays, and the report's heatmap grids.

- `write_heatmaps` / `read_heatmaps`: `WORKDIR/heatmaps/<split>_<method>.npz` with ids,
  labels, predictions, probabilities, targets, raw and maps (upsampled, [0, 1]).
- `overlay` / `save_overlay_png`: a map alpha-blended in the 'jet' colormap over an image;
  greyscale images (H, W), (H, W, 1) are replicated to RGB; any normalisation is undone by
  min-max scaling the image for display.
- `select_grid_cases`: per class, the most and least confident correct and wrong cases.
- `heatmap_grid_figure`: one matplotlib figure of those cases for one method.
- `report_section_html(workdir)`: an HTML fragment (figures inlined as base64 PNG) with one
  grid per method for each `WORKDIR/heatmaps/<split>_grid.npz` that `run.explain_split`
  wrote (known lesion outlines drawn in white), plus the tables of `explain_quality.json`
  and `explain_quality_folder.json` when present (`quality_table_html` with bootstrap
  intervals, `paired_table_html`, `reliance_table_html`); report.py embeds it.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import os
from collections.abc import Sequence

import numpy as np

HEATMAP_KEYS = ("ids", "labels", "predictions", "probabilities", "targets", "raw", "maps")
GRID_GROUPS = (
    "correct, most confident",
    "correct, least confident",
    "wrong, most confident",
    "wrong, least confident",
)


def heatmap_path(workdir: str, split: str, method: str) -> str:
    """WORKDIR/heatmaps/<split>_<method>.npz."""
    return os.path.join(workdir, "heatmaps", f"{split}_{method}.npz")


def write_heatmaps(path: str, **arrays) -> str:
    """Writes one method's maps (HEATMAP_KEYS plus any extras) to an npz, atomically."""
    missing = [k for k in HEATMAP_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"heatmap npz needs {missing}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    return path


def read_heatmaps(path: str) -> dict[str, np.ndarray]:
    """Reads a heatmap npz back into a dict of arrays."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- overlays


def display_image(image: np.ndarray) -> np.ndarray:
    """Any float/uint8 image (H, W), (H, W, 1) or (H, W, 3) -> float (H, W, 3) in [0, 1]."""
    image = np.asarray(image, np.float64)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """uint8 (H, W, 3): (1 - alpha) * image + alpha * cmap(heatmap), heatmap in [0, 1] at the image size."""
    from matplotlib import colormaps

    base = display_image(image)
    heat = np.clip(np.asarray(heatmap, np.float64), 0.0, 1.0)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} does not match image {base.shape[:2]}")
    colour = colormaps[cmap](heat)[..., :3]
    return np.round(255.0 * ((1.0 - alpha) * base + alpha * colour)).astype(np.uint8)


def save_overlay_png(
    path: str, image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> str:
    """Writes `overlay(image, heatmap)` as a PNG (parent folders created)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(overlay(image, heatmap, alpha, cmap)).save(path)
    return path


# ----------------------------------------------------------------------------- grids


def select_grid_cases(
    labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray, per_group: int = 2
) -> list[list[list[int]]]:
    """Row indices per class c and group g (GRID_GROUPS order), at most `per_group` each.

    Confidence is the probability of the predicted class; correct/wrong by true label c.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    conf = (
        np.asarray(probabilities)[np.arange(len(labels)), predictions]
        if len(labels)
        else np.zeros(0)
    )
    num_classes = np.asarray(probabilities).shape[1] if np.asarray(probabilities).ndim == 2 else 0
    out = []
    for c in range(num_classes):
        rows = []
        for correct in (True, False):
            idx = np.flatnonzero((labels == c) & ((predictions == c) == correct))
            order = idx[np.argsort(-conf[idx], kind="stable")]
            rows.append(order[:per_group].tolist())
            rows.append(order[::-1][:per_group].tolist())
        out.append(rows)
    return out


def heatmap_grid_figure(
    images: np.ndarray,
    maps: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    cases: list[list[list[int]]],
    *,
    label_names: Sequence[str] | None = None,
    title: str = "",
    alpha: float = 0.5,
    masks: np.ndarray | None = None,
    mask_known: np.ndarray | None = None,
):
    """A matplotlib Figure: one row per class, per group `per_group` overlays (blank when none).

    `cases` comes from `select_grid_cases` (row indices into the arrays). `masks` (N, H, W),
    when given, draws each known (`mask_known`, default all) lesion's outline in white.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    num_classes = len(cases)
    per_group = max([len(g) for row in cases for g in row] + [1])
    cols = len(GRID_GROUPS) * per_group
    fig, axes = plt.subplots(
        max(num_classes, 1), cols, figsize=(1.6 * cols, 1.9 * max(num_classes, 1)), squeeze=False
    )
    names = list(label_names) if label_names is not None else [str(c) for c in range(num_classes)]
    for c, row in enumerate(cases):
        for g, group in enumerate(row):
            for k in range(per_group):
                ax = axes[c, g * per_group + k]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if k == 0 and c == 0:
                    ax.set_title(GRID_GROUPS[g], fontsize=7, loc="left")
                if g == 0 and k == 0:
                    ax.set_ylabel(f"true {names[c]}", fontsize=8)
                if k >= len(group):
                    continue
                i = group[k]
                ax.imshow(overlay(images[i], maps[i], alpha))
                if masks is not None and (mask_known is None or bool(mask_known[i])):
                    _outline(ax, masks[i])
                pred = int(predictions[i])
                ax.set_xlabel(
                    f"pred {names[pred]} p={float(probabilities[i][pred]):.2f}", fontsize=6
                )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _outline(ax, mask: np.ndarray) -> None:
    """Draws a lesion mask's outline (white) on an axes showing an image of its size."""
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.max() > 0.5 and mask.min() < 0.5:
        ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)


def figure_to_base64_png(fig, dpi: int = 80) -> str:
    """A figure as a base64 PNG string (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


QUALITY_COLUMNS = (
    ("pointing_game", "pointing game"),
    ("energy_in_mask", "energy in mask"),
    ("iou", "IoU@0.5"),
    ("deletion_auc", "deletion AUC (lower better)"),
    ("insertion_auc", "insertion AUC"),
    ("sanity_randomization_spearman", "rand. weights Spearman"),
    ("sanity_randomization_ssim", "rand. weights SSIM"),
    ("sanity_label_spearman", "rand. labels Spearman"),
)
LOCALISATION_COLUMNS = QUALITY_COLUMNS[:3]
# explain_quality.json's keys that are not saliency methods
SUMMARY_KEYS = ("lesion_reliance",)
RELIANCE_ROWS = (
    ("lesion_removed", "lesion removed"),
    ("control_removed", "control region removed"),
    ("lesion_only", "everything but the lesion removed"),
)


def _methods(quality: dict) -> list[tuple[str, dict]]:
    """(name, scores) of the saliency methods in an explain_quality*.json."""
    return [
        (name, scores)
        for name, scores in quality.items()
        if isinstance(scores, dict) and not name.startswith("_") and name not in SUMMARY_KEYS
    ]


def quality_table_html(quality: dict[str, dict]) -> str:
    """An HTML table of explain_quality.json (methods x scores; localisation with its
    bootstrap 95% interval when present)."""
    methods = _methods(quality)
    cols = [(k, name) for k, name in QUALITY_COLUMNS if any(k in v for _, v in methods)]
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name in cols)
    rows = []
    for method, scores in methods:
        ci = scores.get("ci95") or {}
        cells = "".join(f"<td>{_fmt(scores.get(k))}{_ci(ci.get(k))}</td>" for k, _ in cols)
        rows.append(f"<tr><td>{html.escape(method)}</td>{cells}</tr>")
    return f"<table class='xai-quality'><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def paired_table_html(quality: dict[str, dict]) -> str:
    """Each method minus each reference (random, gradcam) on the same images: the mean
    difference of each localisation score and its paired bootstrap 95% interval."""
    methods = [(m, v) for m, v in _methods(quality) if v.get("paired")]
    refs = sorted({r for _, v in methods for r in v["paired"]}, key=lambda r: r != "random")
    if not methods or not refs:
        return ""
    head = "".join(
        f"<th>{html.escape(name)} &minus; {html.escape(ref)}</th>"
        for ref in refs
        for _, name in LOCALISATION_COLUMNS
    )
    rows = []
    for method, scores in methods:
        cells = []
        for ref in refs:
            entry = scores["paired"].get(ref, {})
            for key, _ in LOCALISATION_COLUMNS:
                d = entry.get(key) or {}
                cells.append(f"<td>{_fmt(d.get('difference'))}{_ci(d.get('ci95'))}</td>")
        rows.append(f"<tr><td>{html.escape(method)}</td>{''.join(cells)}</tr>")
    return f"<table class='xai-paired'><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def reliance_table_html(section: dict | None) -> str:
    """The lesion_reliance section as a table: probability of the true class, mean drop and
    flip rate with 95% intervals per condition, and lesion minus control."""
    if not section:
        return ""
    orig = section.get("original", {})
    rows = [
        "<tr><th>image</th><th>p(true class)</th><th>mean drop</th><th>flip rate</th></tr>",
        f"<tr><td>original</td><td>{_fmt(orig.get('probability'))}"
        f"{_ci(orig.get('probability_ci95'))}</td><td></td><td></td></tr>",
    ]
    for key, name in RELIANCE_ROWS:
        e = section.get(key, {})
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_fmt(e.get('probability'))}</td>"
            f"<td>{_fmt(e.get('mean_drop'))}{_ci(e.get('mean_drop_ci95'))}</td>"
            f"<td>{_fmt(e.get('flip_rate'))}{_ci(e.get('flip_rate_ci95'))}</td></tr>"
        )
    vs = section.get("lesion_vs_control", {})
    rows.append(
        "<tr><td><b>lesion &minus; control</b></td><td></td>"
        f"<td>{_fmt(vs.get('mean_drop_difference'))}{_ci(vs.get('mean_drop_difference_ci95'))}"
        f"</td><td>{_fmt(vs.get('flip_rate_difference'))}"
        f"{_ci(vs.get('flip_rate_difference_ci95'))}</td></tr>"
    )
    control = section.get("control", {})
    note = html.escape(
        f"{section.get('n_images', '?')} annotated positive images "
        f"({section.get('n_predicted_target', '?')} decided as the true class: the flip-rate "
        f"denominator; decision: {section.get('decision', '?')}); control regions placed "
        f"inside the anatomy and off the lesion: {control.get('placed', '?')} (fallback "
        f"{control.get('fallback', '?')}). Fill: {section.get('fill', '?')}."
    )
    return f"<table class='xai-reliance'>{''.join(rows)}</table><p class=ci>{note}</p>"


def _ci(interval) -> str:
    if not interval or len(interval) != 2 or any(v is None for v in interval):
        return ""
    lo, hi = (float(v) for v in interval)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f" <span class=ci>[{lo:.3f}, {hi:.3f}]</span>"


def _fmt(value) -> str:
    if value is None:
        return ""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def _quality_html(path: str, title: str) -> str:
    """One explain_quality*.json as HTML: the method table, paired differences, reliance."""
    with open(path) as f:
        quality = json.load(f)
    meta = quality.get("_meta", {})
    where = (
        f"folder {meta['folder']}, explaining {meta.get('targets', '?')}"
        if "folder" in meta
        else f"split {meta.get('split', '?')}, explaining the true class; "
        f"label check: {meta.get('label_model', 'n/a')}"
    )
    counts = meta.get("mask_counts")
    masks = (
        f"; masks: {counts['annotated']} with a lesion (scored), {counts['empty']} known "
        f"empty (negatives, not scored), {counts['unknown']} not annotated"
        if counts
        else ""
    )
    note = html.escape(f"{meta.get('n_images', '?')} images of {where}{masks}")
    caveat = meta.get("cam_layer_caveat")
    warn = f"<p><b>Note</b>: {html.escape(caveat)}.</p>" if caveat else ""
    parts = [f"<h3>{html.escape(title)}</h3><p>{note}</p>{warn}{quality_table_html(quality)}"]
    paired = paired_table_html(quality)
    if paired:
        parts.append(
            "<h4>Paired differences (same images; bracketed: 95% bootstrap interval)</h4>" + paired
        )
    reliance = reliance_table_html(quality.get("lesion_reliance"))
    if reliance:
        parts.append("<h4>Lesion reliance: does the model need the lesion?</h4>" + reliance)
    return "".join(parts)


def report_section_html(
    workdir: str, *, methods: Sequence[str] | None = None, dpi: int = 80
) -> str:
    """HTML fragment for the run report: quality tables plus per-method heatmap grids.

    Reads `WORKDIR/explain_quality.json` (and `explain_quality_folder.json`, an annotated
    folder's, when present) and every `WORKDIR/heatmaps/<split>_grid.npz` (written by
    `xmedjax.explain.run.explain_split`; lesion outlines drawn where its masks are known).
    Returns "" when there is nothing.
    """
    parts = []
    for name, title in (
        ("explain_quality.json", "Saliency quality"),
        ("explain_quality_folder.json", "Saliency quality on the annotated folder"),
    ):
        if os.path.isfile(os.path.join(workdir, name)):
            parts.append(_quality_html(os.path.join(workdir, name), title))
    for grid_path in sorted(glob.glob(os.path.join(workdir, "heatmaps", "*_grid.npz"))):
        grid = read_heatmaps(grid_path)
        split = os.path.basename(grid_path)[: -len("_grid.npz")]
        names = [str(n) for n in grid.get("label_names", [])] or None
        cases = json.loads(str(grid["cases"]))
        available = [str(m) for m in grid["methods"]]
        for method in [m for m in (methods or available) if m in available]:
            fig = heatmap_grid_figure(
                grid["images"],
                grid[f"maps_{method}"],
                grid["labels"],
                grid["predictions"],
                grid["probabilities"],
                cases,
                label_names=names,
                title=f"{method} on {split}"
                + (" (white: lesion outline)" if "masks" in grid else ""),
                masks=grid.get("masks"),
                mask_known=grid.get("mask_known"),
            )
            parts.append(
                f"<h4>{html.escape(method)} ({html.escape(split)})</h4>"
                f"<img alt='{html.escape(method)} heatmaps' src='data:image/png;base64,{figure_to_base64_png(fig, dpi)}'/>"
            )
    return "\n".join(parts)


__all__ = [
    "GRID_GROUPS",
    "HEATMAP_KEYS",
    "display_image",
    "figure_to_base64_png",
    "heatmap_grid_figure",
    "heatmap_path",
    "overlay",
    "paired_table_html",
    "quality_table_html",
    "reliance_table_html",
    "read_heatmaps",
    "report_section_html",
    "save_overlay_png",
    "select_grid_cases",
    "write_heatmaps",
]
