"""Builds a prepared dataset from a raw folder.

  python -m data_prep.build --dataset=brain_tumor_mri|chest_xray|folder|yolo --src=DIR --out=DIR
      [--size=256] [--label_map=binary|multiclass] [--val_fraction=0.15] [--seed=0]
      [--skip_bad] [--dedup_test] [--channels=auto|1|3] [--keep_val]
      [--image_format=png|jpeg] [--jpeg_quality=95]
      [--annotations=PATH --annotation_format=auto|yolo|via|coco|masks]
      [--annotations_from=PREPARED_OR_YOLO_DIR]

The audit runs first (its report lands in ``OUT/audit.json`` / ``OUT/audit.md``); an
undecodable file stops the build unless ``--skip_bad``. A validation split is carved from
train (seeded, stratified by label, grouped so that one patient, one set of identical
pixels or one near-duplicate cluster never spans train and val). The official val split
(16 images in chest_xray) is merged into train first unless ``--keep_val``.
``--dedup_test`` adds a ``test_dedup`` split without the test images that duplicate (exactly
or nearly, mirrored and rotated copies included) a train or val image or belong to a patient
seen in train or val. ``--annotations`` rasterises lesion annotations into the dataset's
``mask`` with a per-image ``mask_known`` flag (``data_prep.annotations``); a bad annotation
stops the build with one line naming its file and entry unless ``--skip_bad``, and the counts
land in ``audit.md`` and ``xmedjax_dataset.json`` (``annotations``).
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

import numpy as np

from data_prep import annotations as annotations_lib
from data_prep import audit as audit_lib
from data_prep import borrow as borrow_lib
from data_prep import builder, cli_errors, dataset_format, hashing, image_io, layouts

BAD_KINDS = ("undecodable", "not_an_image", "empty_file")
_NAMED = ("brain_tumor_mri", "chest_xray")  # layouts whose prepared dataset keeps their name


class BuildError(RuntimeError):
    """A build stopped on bad input; the message names the file or flag."""


def _item_to_example(item: tuple) -> builder.Example:
    f, rec, label, size, ann = item
    img = image_io.decode_file(f.path)
    px = image_io.resize_longer_side(img.pixels, size)
    mask = None
    if ann is not None:  # rasterised at the source resolution, then resized as the image
        full = annotations_lib.rasterise(ann, img.pixels.shape[0], img.pixels.shape[1])
        mask = annotations_lib.resize_mask(full, px.shape[:2])
    return builder.Example(
        mask=mask,
        mask_known=ann is not None,
        image=px,
        label=label,
        id=f.relpath,
        source=f.relpath,
        patient_id=layouts.patient_id(f.relpath),
        pixel_hash=rec["pixel_hash"],
        bytes_hash=rec["bytes_hash"],
        phash=rec["phash"],
        orig_size=(rec["height"], rec["width"]),
        orig_mode=rec["mode"],
        file_format=rec["format"],
        file_size=rec["file_size"],
    )


def carve_val(
    indices: list[int], labels: list[int], groups: list[Any], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Splits indices into (train, val): stratified by label, never splitting a group.

    ``labels[k]`` and ``groups[k]`` belong to ``indices[k]``.
    """
    if fraction <= 0 or not indices:
        return list(indices), []
    by_group: dict[Any, list[int]] = collections.defaultdict(list)
    for k, g in enumerate(groups):
        by_group[g].append(k)
    keys = sorted(by_group, key=str)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    totals = collections.Counter(labels)
    target = {c: fraction * n for c, n in totals.items()}
    got: collections.Counter = collections.Counter()
    val_k: set[int] = set()
    for key in keys:
        ks = by_group[key]
        lab = collections.Counter(labels[k] for k in ks).most_common(1)[0][0]
        if got[lab] + len(ks) <= target[lab] + 0.5:
            val_k.update(ks)
            for k in ks:
                got[labels[k]] += 1
    train = [indices[k] for k in range(len(indices)) if k not in val_k]
    val = [indices[k] for k in range(len(indices)) if k in val_k]
    return train, val


def _group_ids(files, recs, idx: list[int], near_pairs) -> list[int]:
    """Union of same patient, same pixels and near-duplicate clusters, per index."""
    pos = {i: k for k, i in enumerate(idx)}
    pairs = []
    first: dict[str, int] = {}
    for k, i in enumerate(idx):
        for key in (
            ("p:" + layouts.patient_id(files[i].relpath))
            if layouts.patient_id(files[i].relpath)
            else None,
            "h:" + recs[i].get("copy_hash", recs[i]["pixel_hash"]),
        ):
            if key is None:
                continue
            if key in first:
                pairs.append((first[key], k))
            else:
                first[key] = k
    pairs += [(pos[a], pos[b]) for a, b in near_pairs if a in pos and b in pos]
    comp = list(range(len(idx)))
    for g in hashing.groups_from_pairs(len(idx), pairs):
        for k in g:
            comp[k] = g[0]
    return comp


def prepare(
    dataset: str,
    src: str,
    out: str,
    *,
    size: int = 256,
    label_map: str | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    skip_bad: bool = False,
    dedup_test: bool = False,
    channels: str = "auto",
    keep_val: bool = False,
    workers: int = 0,
    progress: bool = True,
    image_format: str = "png",
    jpeg_quality: int = 95,
    annotations: str = "",
    annotation_format: str = "auto",
    annotations_from: str = "",
) -> dict:
    """Audits ``src`` and writes the prepared dataset to ``out``; returns its info dict.

    ``annotations``/``annotation_format``: lesion annotations (see ``data_prep.annotations``)
    rasterised into the dataset's ``mask`` and ``mask_known`` (the yolo layout reads
    ``src/labels`` by default); ``annotations_from``: borrow masks from the annotated
    dataset the images were copied from (``data_prep.borrow``).
    """
    if dataset not in layouts.DATASETS:
        raise BuildError(f"--dataset must be one of {layouts.DATASETS}, got {dataset!r}")
    label_map = label_map or "binary"
    ann_source = annotations_lib.source_for(annotation_format, annotations, src, dataset)
    res = audit_lib.run_audit(
        src,
        dataset=dataset,
        workers=workers,
        progress=progress,
        exclude=ann_source.excludes if ann_source else None,
    )
    audit_lib.write_report(res, out)
    for line in audit_lib.console_notes(res):
        print(line, file=sys.stderr)
    files, recs = _unzip(res)
    skipped = _bad_files(res, src, out, skip_bad)
    ok = [i for i, r in enumerate(recs) if "error" not in r and files[i].class_name]
    class_names = sorted({files[i].class_name for i in ok})
    lmap = layouts.label_map_for(dataset, label_map, class_names)
    labels = {i: lmap.label_of(files[i].class_name) for i in ok}
    splits, official_val = _splits(res, src, ok, labels, keep_val, val_fraction, seed)
    _check_two_classes(splits["train"] + splits.get("val", []), labels, lmap.label_names, src, out)
    dedup_meta = _add_test_dedup(files, recs, splits, res) if dedup_test else _NO_DEDUP
    borrowed = (annotations_from, workers, progress)
    anns, ann_meta = _annotate(res, out, ann_source, borrowed, ok, splits, skip_bad)
    n_colour = sum(1 for i in ok if recs[i]["channels"] == 3)
    nch = int(channels) if channels != "auto" else 3 if n_colour > 0.5 * max(1, len(ok)) else 1
    items = _items(files, recs, labels, splits, size, anns)
    spec = builder.DatasetSpec(
        name=dataset if dataset in _NAMED else os.path.basename(os.path.abspath(src)),
        label_names=lmap.label_names,
        channels=nch,
        has_masks=anns is not None,
        size=size,
        splits=items,
        to_example=_item_to_example,
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        metadata={
            "dataset": dataset,
            "src": os.path.abspath(src),
            "label_map": label_map,
            "val_fraction": val_fraction,
            "seed": seed,
            "official_val_merged_into_train": bool(official_val) and not keep_val,
            "skipped_bad_files": skipped,
            "colour_images": n_colour,
            **dedup_meta,
            "audit_summary": res["summary"],
            **({"annotations": ann_meta} if ann_meta else {}),
        },
    )
    builder.write_prepared(spec, out, progress=progress)
    return _info(out)


def _unzip(res) -> tuple[list, list]:
    """The audit's (RawFile, record) pairs as two lists."""
    return [f for f, _ in res["_records"]], [r for _, r in res["_records"]]


def _items(files, recs, labels, splits, size, anns) -> dict[str, list[tuple]]:
    """Per split, the items ``_item_to_example`` converts, in path order."""
    by_image = anns.by_image if anns is not None else {}
    return {
        s: [
            (files[i], recs[i], labels[i], size, by_image.get(files[i].relpath))
            for i in sorted(v, key=lambda i: files[i].relpath)
        ]
        for s, v in splits.items()
    }


_NO_DEDUP = {
    "test_dedup_dropped": 0,
    "test_dedup_dropped_by_reason": {},
    "test_dedup_dropped_mirrored_or_rotated_only": 0,
}


def _add_test_dedup(files, recs, splits, res) -> dict[str, Any]:
    """Adds splits["test_dedup"]; returns what it dropped, for the metadata."""
    splits["test_dedup"], reasons = _dedup(files, recs, splits, _near_pairs(res))
    return {
        "test_dedup_dropped": len(splits["test"]) - len(splits["test_dedup"]),
        "test_dedup_dropped_by_reason": reasons,
        "test_dedup_dropped_mirrored_or_rotated_only": _transformed_only(recs, splits, res),
    }


def _bad_files(res, src: str, out: str, skip_bad: bool) -> list[str]:
    """Undecodable files: a BuildError, or (--skip_bad) listed on stderr and returned."""
    bad = [p for p in res["problems"] if p["kind"] in BAD_KINDS]
    if bad and not skip_bad:
        names = "; ".join(f"{p['files'][0]} ({p['kind']})" for p in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise BuildError(
            f"{len(bad)} bad file(s) in {src}: {names}{more}. Fix or remove them, "
            f"or pass --skip_bad (see {os.path.join(out, 'audit.md')})"
        )
    skipped = [p["files"][0] for p in bad]
    if skipped:
        print(f"--skip_bad: skipping {len(skipped)} bad file(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)
    return skipped


def _splits(res, src, ok, labels, keep_val, val_fraction, seed) -> tuple[dict, list[int]]:
    """train/val(/test) indices: the official val kept, or val carved from train (+ val)."""
    files, recs = _unzip(res)
    by_split: dict[str, list[int]] = collections.defaultdict(list)
    for i in ok:
        by_split[files[i].split].append(i)
    if "train" not in by_split:
        raise BuildError(f"no train split found in {src} (splits: {sorted(by_split)})")
    unknown = sorted(set(by_split) - {"train", "val", "test"})
    if unknown:
        raise BuildError(
            f"unknown split folder(s) {unknown} in {src}: expected train/val/test "
            "(or Training/Testing)"
        )
    pool = list(by_split["train"])
    official_val = by_split.get("val", [])
    if keep_val and official_val:
        splits = {"train": pool, "val": official_val}
    else:
        pool += official_val
        gids = _group_ids(files, recs, pool, _near_pairs(res))
        tr, va = carve_val(pool, [labels[i] for i in pool], gids, val_fraction, seed)
        splits = {"train": tr, "val": va}
    splits["test"] = by_split.get("test", [])
    return splits, official_val


def _annotate(res, out, source, borrowed, ok, splits, skip_bad):
    """Reads the annotations of the images ``ok``: (AnnotationSet, counts for the metadata),
    (None, None) without annotations; the counts also go into the audit report in ``out``.

    Bad annotations stop the build with their first line, or (--skip_bad) are listed on
    stderr and skipped (their images become unknown). ``borrowed``: (--annotations_from,
    workers, progress); borrowed masks fill the images the annotations leave unknown.
    """
    if source is None and not borrowed[0]:
        return None, None
    files, recs = _unzip(res)
    refs = [
        annotations_lib.ImageRef(
            files[i].relpath,
            files[i].path,
            recs[i]["width"],
            recs[i]["height"],
            recs[i]["file_size"],
        )
        for i in ok
    ]
    if source is not None:
        anns = source.load(refs)
    else:
        anns = annotations_lib.AnnotationSet("borrowed", "", {}, [])
    report = None
    if borrowed[0]:
        got, report = borrow_lib.borrow(
            borrowed[0], files, recs, ok, splits, workers=borrowed[1], progress=borrowed[2]
        )
        anns.by_image = {**got, **anns.by_image}
    lines = [str(e) for e in anns.errors]
    if lines and not skip_bad:
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise BuildError(f"{lines[0]}{more}; fix it or pass --skip_bad to list and skip")
    if lines:
        print(f"--skip_bad: skipping {len(lines)} bad annotation(s):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
    rels = {s: [files[i].relpath for i in v] for s, v in splits.items()}
    meta = annotations_lib.summarise(anns, rels, lines)
    if report is not None:
        meta["borrowed"] = report
    res["annotations"] = meta
    audit_lib.write_report(res, out)
    return anns, meta


def _check_two_classes(
    indices: list[int], labels: dict[int, int], label_names, src: str, out: str
) -> None:
    """A BuildError unless the train images hold two classes or more (one class trains to a
    meaningless loss 0 and accuracy 1)."""
    present = collections.Counter(label_names[labels[i]] for i in indices)
    if len(present) >= 2:
        return
    found = ", ".join(f"{name!r} ({n} images)" for name, n in present.items()) or "nothing"
    raise BuildError(
        f"the train split of {src} holds one class only: {found}; a classifier needs two or "
        f"more classes, each with images (empty class folders are listed in "
        f"{os.path.join(out, 'audit.md')})"
    )


def _near_pairs(res) -> list[tuple[int, int]]:
    return res.get("_near_pairs", [])


def _dedup(files, recs, splits, near_pairs) -> tuple[list[int], dict[str, int]]:
    """Test indices without leaks into train/val, and how many were dropped per reason.

    Dropped: exact (same pixels) or near duplicates of a train/val image, mirrored and
    rotated copies included (the audit's ``copy_hash`` and near pairs), and images of a
    patient who also appears in train/val.
    """
    ref = set(splits["train"]) | set(splits.get("val", []))
    ref_pixels = {recs[i].get("copy_hash", recs[i]["pixel_hash"]) for i in ref}
    ref_patients = {layouts.patient_id(files[i].relpath) for i in ref} - {""}
    near_ref: set[int] = set()
    for a, b in near_pairs:
        if a in ref:
            near_ref.add(b)
        if b in ref:
            near_ref.add(a)
    keep, why = [], {"exact_duplicate": 0, "near_duplicate": 0, "patient_overlap": 0}
    for i in splits["test"]:
        if recs[i].get("copy_hash", recs[i]["pixel_hash"]) in ref_pixels:
            why["exact_duplicate"] += 1
        elif i in near_ref:
            why["near_duplicate"] += 1
        elif layouts.patient_id(files[i].relpath) in ref_patients:
            why["patient_overlap"] += 1
        else:
            keep.append(i)
    return keep, why


def _transformed_only(recs, splits, res) -> int:
    """Test images whose only copies in train/val are mirrored or rotated ones."""
    ref = set(splits["train"]) | set(splits.get("val", []))
    plain = {recs[i]["pixel_hash"] for i in ref}
    moved = {recs[i].get("copy_hash", "") for i in ref}
    near: dict[int, set[str]] = {}
    for (a, b), t in res.get("_near_transforms", {}).items():
        for x, y in ((a, b), (b, a)):
            if y in ref:
                near.setdefault(x, set()).add(t)
    n = 0
    for i in splits["test"]:
        ts = near.get(i, set())
        if recs[i]["pixel_hash"] in plain or "identity" in ts:
            continue
        n += bool(ts) or recs[i].get("copy_hash") in moved
    return n


def _info(out: str) -> dict:
    return dataset_format.read_info(out)


@cli_errors.one_line_errors("data_prep.build", expected=(ValueError,))
def main(argv: list[str]) -> None:
    """The command: one line per failure (the traceback under --verbosity=1)."""
    del argv
    from absl import flags

    f = flags.FLAGS
    info = prepare(
        f.dataset,
        f.src,
        f.out,
        size=f.size,
        label_map=f.label_map,
        val_fraction=f.val_fraction,
        seed=f.seed,
        skip_bad=f.skip_bad,
        dedup_test=f.dedup_test,
        channels=f.channels,
        keep_val=f.keep_val,
        workers=f.workers,
        image_format=f.image_format,
        jpeg_quality=f.jpeg_quality,
        annotations=f.annotations,
        annotation_format=f.annotation_format,
        annotations_from=f.annotations_from,
    )
    print(
        f"prepared {info['name']} in {f.out}: splits {info['splits']}, "
        f"{info['num_classes']} classes {info['label_names']}, {info['channels']} channel(s)"
    )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("dataset", None, layouts.DATASETS, "raw layout", required=True)
    flags.DEFINE_string("src", None, "raw folder", required=True)
    flags.DEFINE_string("out", None, "prepared dataset folder", required=True)
    flags.DEFINE_integer("size", 256, "longer side of the stored images (never enlarged)")
    flags.DEFINE_enum(
        "label_map", "binary", ("binary", "multiclass"), "brain: tumor vs notumor, or the 4 classes"
    )
    flags.DEFINE_float("val_fraction", 0.15, "fraction of train carved out as val")
    flags.DEFINE_integer("seed", 0, "seed of the val split")
    flags.DEFINE_bool("skip_bad", False, "skip undecodable files instead of stopping")
    flags.DEFINE_bool("dedup_test", False, "add a test_dedup split without leaked copies")
    flags.DEFINE_enum(
        "channels",
        "auto",
        ("auto", "1", "3"),
        "stored channels (auto: 3 when most images are colour)",
    )
    flags.DEFINE_bool("keep_val", False, "keep the official val split instead of carving")
    flags.DEFINE_integer("workers", 0, "audit decode processes (0 = number of CPUs)")
    flags.DEFINE_enum(
        "image_format",
        "png",
        ("png", "jpeg"),
        "stored encoding: png (lossless) or jpeg (~5x smaller, lossy)",
    )
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality with --image_format=jpeg")
    flags.DEFINE_string(
        "annotations",
        "",
        "lesion annotations: a VIA or COCO JSON file, a YOLO label tree or a mask tree "
        "(yolo/masks: beside the images when empty; the yolo layout reads src/labels)",
    )
    flags.DEFINE_enum(
        "annotation_format",
        "auto",
        ("auto",) + annotations_lib.FORMATS,
        "format of --annotations (auto: COCO or VIA by the JSON keys, yolo or masks by the files)",
    )
    flags.DEFINE_string(
        "annotations_from",
        "",
        "borrow masks from the annotated dataset these images were copied from (a prepared "
        "dataset with masks, or a yolo folder), mirrored and rotated copies included",
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
