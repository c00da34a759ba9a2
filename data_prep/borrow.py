"""Borrowing lesion annotations from the dataset an image was copied from.

Public sets are compilations: the Kaggle brain MRI set holds the figshare set of Cheng et
al., most of it mirrored. ``data_prep.build ... --annotations_from=DIR_OR_PREPARED`` finds,
for every image being built, an annotated image of another dataset that it is a copy of,
plain, mirrored or rotated (the eight ``hashing.TRANSFORMS``), and carries that image's
mask over through the same transform.

The other dataset is a prepared dataset with masks (its images and masks as stored) or a
raw folder whose layout carries its annotations (the yolo layout); to borrow from any other
format, build that dataset first with ``--annotations`` and borrow from the prepared one.

A match needs dHash and pHash within 8 bits of the transformed donor, a high-pass structure
similarity of at least ``STRUCTURE_THRESHOLD`` (near-identical copies, not adjacent slices)
and the same aspect ratio after the transform (within ``ASPECT_TOLERANCE``): a cropped copy
would misplace the mask. Each image takes its most similar donor; the report counts the
matches by transform and split and lists label disagreements (the class folder of the image
against the donor's class).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from data_prep import annotations as annotations_lib
from data_prep import audit as audit_lib
from data_prep import dataset_format, hashing, image_io, layouts

STRUCTURE_THRESHOLD = 0.9
ASPECT_TOLERANCE = 0.03
_SIDEWAYS = ("rot90", "rot270", "transpose", "antitranspose")


@dataclass
class Donor:
    """One annotated image of the other dataset."""

    id: str
    label: str  # its class name
    height: int
    width: int
    hashes: dict[str, list]  # hashing.transform_hashes of the image
    thumb: np.ndarray
    load_mask: Callable[[], np.ndarray]  # bool (height, width)


def load_donors(path: str, *, workers: int = 0, progress: bool = True) -> list[Donor]:
    """The annotated images of a prepared dataset (with masks) or a yolo-layout folder."""
    path = os.path.abspath(path)
    try:
        info = dataset_format.read_dataset_info(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not info.has_masks:
            raise ValueError(f"--annotations_from={path}: this prepared dataset has no masks")
        return _prepared_donors(path, info)
    if os.path.isdir(path) and layouts.detect_layout(path) == "yolo":
        return _yolo_donors(path, workers, progress)
    raise ValueError(
        f"--annotations_from={path}: neither a prepared dataset with masks nor a yolo layout "
        "(images/ + labels/); build the annotated dataset first with --annotations"
    )


def _prepared_donors(path: str, info) -> list[Donor]:
    donors = []
    for split in info.splits:
        if split == "test_dedup":  # a subset of test
            continue
        src = dataset_format.PreparedSource(path, split)
        for k in range(len(src)):
            rec = src[k]
            if dataset_format.MASK_KNOWN_KEY in rec and not bool(
                rec[dataset_format.MASK_KNOWN_KEY]
            ):
                continue
            px = image_io.decode_png(rec["image"])
            px = px[..., 0] if px.ndim == 3 and px.shape[2] == 1 else image_io.collapse_grey(px)
            donors.append(
                Donor(
                    id=f"{split}:{_text(rec['id'])}",
                    label=_text(rec["label_name"]),
                    height=px.shape[0],
                    width=px.shape[1],
                    hashes=hashing.transform_hashes(px),
                    thumb=hashing.thumbnail(px),
                    load_mask=functools.partial(_stored_mask, rec["mask"]),
                )
            )
    return donors


def _stored_mask(png: bytes) -> np.ndarray:
    m = image_io.decode_png(png)
    return (m[..., 0] if m.ndim == 3 else m) > 127


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _yolo_donors(path: str, workers: int, progress: bool) -> list[Donor]:
    source = annotations_lib.source_for("yolo", "", path, "yolo")
    files, _ = layouts.scan_dataset(path, "yolo")
    files = [f for f in files if not source.excludes(f) and image_io.is_image_name(f.path)]
    recs = audit_lib.analyse_files([f.path for f in files], workers, progress, desc="donors")
    ok = [i for i, r in enumerate(recs) if "error" not in r]
    refs = [
        annotations_lib.ImageRef(f.relpath, f.path, recs[i]["width"], recs[i]["height"])
        for i, f in ((i, files[i]) for i in ok)
    ]
    anns = source.load(refs)
    for e in anns.errors:
        print(f"--annotations_from: skipping a bad donor annotation: {e}", file=sys.stderr)
    donors = []
    for i in ok:
        a = anns.by_image.get(files[i].relpath)
        if a is None:
            continue
        r = recs[i]
        donors.append(
            Donor(
                id=files[i].relpath,
                label=files[i].class_name,
                height=r["height"],
                width=r["width"],
                hashes=r["transform_hashes"],
                thumb=r["thumb"],
                load_mask=functools.partial(annotations_lib.rasterise, a, r["height"], r["width"]),
            )
        )
    return donors


# ----------------------------------------------------------------------------- matching
def match(
    donors: Sequence[Donor], targets: Sequence[dict[str, Any]], threshold: float
) -> dict[int, tuple[int, str, float]]:
    """Per target position, the best donor ``(donor index, t, similarity)``, t(donor) ~
    target. ``targets``: audit records (plain hashes, thumb, width, height)."""
    if not donors or not targets:
        return {}
    found = hashing.transformed_matches(
        np.array([d.hashes["dhash"] for d in donors], np.uint64),
        np.array([d.hashes["phash"] for d in donors], np.uint64),
        np.array([r["dhash"] for r in targets], np.uint64),
        np.array([r["phash"] for r in targets], np.uint64),
        [d.thumb for d in donors],
        [r["thumb"] for r in targets],
        structure_threshold=threshold,
    )
    best: dict[int, tuple[int, str, float]] = {}
    for i, j, t, sim in found:
        d, r = donors[i], targets[j]
        h, w = (d.width, d.height) if t in _SIDEWAYS else (d.height, d.width)
        if abs(math.log((h / w) / (r["height"] / r["width"]))) > ASPECT_TOLERANCE:
            continue
        if j not in best or sim > best[j][2] + 1e-9 or (sim >= best[j][2] and t == "identity"):
            best[j] = (i, t, sim)
    return best


def _carry(donor: Donor, transform: str) -> np.ndarray:
    return np.ascontiguousarray(hashing.apply_transform(donor.load_mask(), transform))


def borrow(
    path: str,
    files: Sequence[layouts.RawFile],
    recs: Sequence[dict[str, Any]],
    indices: Sequence[int],
    splits: dict[str, Sequence[int]],
    *,
    threshold: float = STRUCTURE_THRESHOLD,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, annotations_lib.Annotation], dict[str, Any]]:
    """Borrowed annotations of the images ``indices`` (relpath -> Annotation) and a report."""
    donors = load_donors(path, workers=workers, progress=progress)
    best = match(donors, [recs[i] for i in indices], threshold)
    out: dict[str, annotations_lib.Annotation] = {}
    by_t: collections.Counter = collections.Counter()
    disagree: collections.Counter = collections.Counter()
    used: collections.Counter = collections.Counter()
    for j, (k, t, sim) in sorted(best.items()):
        f, d = files[indices[j]], donors[k]
        mask = _carry(d, t)
        out[f.relpath] = annotations_lib.Annotation(
            source=f"{path}: {d.id} ({t}, similarity {sim:.3f})",
            mask_loader=functools.partial(_carry, d, t),
            mask_regions=int(ndimage.label(mask)[1]),
        )
        by_t[t] += 1
        used[k] += 1
        if f.class_name != d.label:
            disagree[f"{f.class_name} <- {d.label}"] += 1
    matched = {files[indices[j]].relpath for j in best}
    report = {
        "from": os.path.abspath(path),
        "donors": len(donors),
        "matched": len(best),
        "by_transform": dict(by_t.most_common()),
        "by_split": {
            s: sum(files[i].relpath in matched for i in v) for s, v in splits.items() if v
        },
        "label_disagreements": dict(disagree.most_common()),
        "donors_used_more_than_once": sum(1 for n in used.values() if n > 1),
        "structure_threshold": threshold,
    }
    return out, report


def markdown(report: dict[str, Any]) -> str:
    """The borrowed-annotations part of audit.md."""
    return (
        f"Borrowed from `{report['from']}` ({report['donors']} annotated images): "
        f"{report['matched']} images matched (structure similarity >= "
        f"{report['structure_threshold']}), by transform {report['by_transform']}, by split "
        f"{report['by_split']}; label disagreements (image <- donor) "
        f"{report['label_disagreements'] or 'none'}; donors matched by several images: "
        f"{report['donors_used_more_than_once']}.\n"
    )
