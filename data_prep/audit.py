"""Data audit of a raw ``split/class/image`` folder.

``python -m data_prep.audit --src=DIR --out=OUTDIR [--dataset=auto] [--shortcut] [--nomirrors]``
writes ``OUTDIR/audit.json`` and ``OUTDIR/audit.md``.

``audit.json``::

  {"src": ..., "dataset": ..., "counts": {split: {class: n}},
   "problems": [{"kind": K, "files": [relpaths], "detail": "..."}],
   "summary": {"problems_by_kind": {K: groups}, "test_with_train_byte_duplicate": N, ...},
   "image_stats": {"modes": {...}, "formats": {...}, "unusual": [...]},
   "shortcut": {...}  # only with --shortcut}

Problem kinds (one problem per group of files):
  empty_file, not_an_image, undecodable, empty_class, empty_split, unlabelled_file,
  exact_duplicate / cross_split_exact_duplicate        byte-identical files,
  pixel_duplicate / cross_split_pixel_duplicate        same decoded pixels, different bytes,
  near_duplicate / cross_split_near_duplicate          perceptual hashes within a threshold,
  conflicting_label                                    identical pixels, different classes,
  patient_overlap                                      one patient id in several splits.
Mirrored and rotated copies count as copies: the pixel and near-duplicate searches compare
every image with the left-right and up-down mirrors, the 90-degree rotations and the
diagonal mirrors of every other (``hashing.TRANSFORMS``; ``--nomirrors`` compares plain
images only). Every duplicate problem carries ``transforms``, one per file: the transform
that maps the group's first file onto that file ("identity" for a plain copy). The summary
adds, per evaluation split, ``<split>_with_train_transformed_copy`` (images with a copy in
train that is mirrored or rotated), ``..._transformed_copy_only`` (those with no plain copy
in train: the leaks a plain search misses) and ``<split>_with_train_copy_by_transform``
(images per transform that maps the image onto its train copy);
``..._strict`` keys repeat them for near-identical copies only (structure similarity >= 0.9,
leaving out merely similar images such as adjacent slices).
Valid but unusual images (16-bit, RGBA, CMYK, palette, tiny, a format that does not match
the file extension) are decoded and listed under ``image_stats.unusual``, not as problems.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from data_prep import cli_errors, hashing, image_io, layouts

SMALL_SIDE = 32  # images with a side below this are noted as tiny
STRICT_SIMILARITY = 0.9  # structure similarity of near-identical copies
# Leak counts repeated with near-identical copies only (the "_strict" summary keys).
_STRICT_KEYS = (
    "_with_train_near_duplicate",
    "_with_train_transformed_copy",
    "_with_train_transformed_copy_only",
    "_with_train_copy_by_transform",
)
_EXT_FORMAT = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "jpe": "JPEG",
    "jfif": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "gif": "GIF",
    "tif": "TIFF",
    "tiff": "TIFF",
    "webp": "WEBP",
    "dcm": "DICOM",
    "dicom": "DICOM",
}


# ----------------------------------------------------------------------------- per file
def analyse_file(path: str) -> dict[str, Any]:
    """Decodes one file and returns its hashes and statistics (or its error)."""
    rec: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"error": "undecodable", "error_detail": f"unreadable file ({e})", "file_size": 0}
    rec["file_size"] = len(data)
    rec["bytes_hash"] = hashing.bytes_hash(data)
    try:
        img = image_io.decode_bytes(data, path)
    except image_io.DecodeError as e:
        rec["error"] = e.kind
        rec["error_detail"] = str(e)
        return rec
    px = img.pixels
    th = hashing.transform_hashes(px)  # column 0 is the identity
    rec.update(
        mode=img.mode,
        format=img.file_format,
        width=img.width,
        height=img.height,
        channels=img.channels,
        pixel_hash=th["pixel"][0],
        dhash=th["dhash"][0],
        phash=th["phash"][0],
        thumb=hashing.thumbnail(px),
        transform_hashes=th,  # per hashing.TRANSFORMS: mirrored and rotated copies
    )
    rec["stats"] = intensity_stats(px)
    return rec


def intensity_stats(px: np.ndarray) -> dict[str, float]:
    """Cheap whole-image and border intensity statistics (used by the shortcut audit)."""
    g = px.astype(np.float32)
    if g.ndim == 3:
        colourfulness = float(np.abs(g - g.mean(-1, keepdims=True)).mean())
        g = g.mean(-1)
    else:
        colourfulness = 0.0
    h, w = g.shape
    bh, bw = max(1, h // 20), max(1, w // 20)
    border = np.concatenate(
        [g[:bh].ravel(), g[-bh:].ravel(), g[:, :bw].ravel(), g[:, -bw:].ravel()]
    )
    corners = np.concatenate(
        [g[:bh, :bw].ravel(), g[:bh, -bw:].ravel(), g[-bh:, :bw].ravel(), g[-bh:, -bw:].ravel()]
    )
    return {
        "mean": float(g.mean()),
        "std": float(g.std()),
        "near_black": float((g < 10).mean()),
        "near_white": float((g > 245).mean()),
        "border_mean": float(border.mean()),
        "border_std": float(border.std()),
        "corner_mean": float(corners.mean()),
        "colourfulness": colourfulness,
    }


def analyse_files(
    paths: list[str], workers: int = 0, progress: bool = True, desc: str = "audit"
) -> list[dict[str, Any]]:
    """analyse_file over many paths, in a process pool when workers > 1."""
    workers = workers or min(os.cpu_count() or 1, 8)
    bar = _progress(len(paths), desc, progress)
    out: list[dict[str, Any]] = []
    if workers <= 1 or len(paths) < 64:
        for p in paths:
            out.append(analyse_file(p))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(workers) as pool:
            for r in pool.imap(analyse_file, paths, chunksize=32):
                out.append(r)
                bar.update(1)
    bar.close()
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="img", file=sys.stderr)


# ----------------------------------------------------------------------------- the audit
def run_audit(
    src: str,
    *,
    dataset: str = "auto",
    workers: int = 0,
    progress: bool = True,
    dhash_threshold: int = 8,
    phash_threshold: int = 8,
    structure_threshold: float | None = None,
    shortcut: bool = False,
    label_map: str = "binary",
    transforms: tuple[str, ...] = hashing.TRANSFORMS,
    exclude: Callable[[layouts.RawFile], bool] | None = None,
) -> dict[str, Any]:
    """Audits a raw folder; returns the audit.json dict plus a private ``_records`` list.

    ``_records[i]`` holds the RawFile and analyse_file() result of every file, so the
    builder does not hash twice; each result gains ``copy_hash``, the pixel hash shared by
    an image and its copies under ``transforms`` (``hashing.IDENTITY_ONLY``: plain copies
    only). ``exclude``: files that are not images of the dataset (annotation files).
    """
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src} is not a directory")
    if dataset == "auto":
        dataset = layouts.detect_layout(src)
    files, class_dirs = layouts.scan_dataset(src, dataset)
    if exclude is not None:
        files = [f for f in files if not exclude(f)]
    recs = analyse_files([f.path for f in files], workers=workers, progress=progress)
    problems: list[dict[str, Any]] = []

    def add(kind: str, idx: Iterable[int], detail: str, **extra: Any) -> None:
        problems.append(
            {"kind": kind, "files": [files[i].relpath for i in idx], "detail": detail, **extra}
        )

    counts, ok = _file_problems(files, recs, class_dirs, src, add, problems)
    summary: dict[str, Any] = {"duplicate_search_transforms": list(transforms)}
    _exact_problems(files, recs, ok, add, transforms)
    # Near duplicates (pairs that are not pixel-identical, even after a transform).
    thumbs = [recs[i]["thumb"] for i in ok]
    if structure_threshold is None:
        structure_threshold = round(hashing.adaptive_structure_threshold(thumbs), 3)
    summary["near_duplicate_structure_threshold"] = structure_threshold
    near = _near_pairs(recs, ok, transforms, dhash_threshold, phash_threshold, structure_threshold)
    _near_problems(files, ok, near, add, dhash_threshold, phash_threshold, structure_threshold)
    n_patients, n_overlap = _patient_problems(files, ok, add)
    summary.update(_leak_summary(files, recs, ok, near))
    # The same count for near-identical copies only (re-encoded, re-windowed, resized),
    # leaving out merely similar images such as adjacent slices.
    strict = [p for p in near if p[3] >= STRICT_SIMILARITY]
    for k, v in _leak_summary(files, recs, ok, strict).items():
        if k.endswith(_STRICT_KEYS):
            summary[k + "_strict"] = v
    summary["patients"] = n_patients
    summary["patients_in_several_splits"] = n_overlap
    summary["files"] = len(files)
    summary["decodable_images"] = len(ok)
    summary["problems_by_kind"] = dict(collections.Counter(p["kind"] for p in problems))
    result: dict[str, Any] = {
        "src": src,
        "dataset": dataset,
        "counts": counts,
        "problems": problems,
        "summary": summary,
        "image_stats": _image_stats(files, recs, ok),
    }
    if shortcut:
        from data_prep import shortcut as shortcut_lib

        result["shortcut"] = shortcut_lib.audit_section(
            [files[i] for i in ok], [recs[i] for i in ok], dataset=dataset, label_map=label_map
        )
    result["_records"] = list(zip(files, recs))
    result["_near_pairs"] = [(a, b) for a, b, _, _ in near]
    result["_near_transforms"] = {(a, b): t for a, b, t, _ in near}  # t(image a) ~ image b
    return result


def _file_problems(files, recs, class_dirs, src, add, problems):
    """Unlabelled and undecodable files, empty splits and classes; (counts, decodable)."""
    counts: dict[str, dict[str, int]] = {}
    for split, classes in class_dirs.items():
        counts[split] = {c: 0 for c in classes}
    ok: list[int] = []
    for i, (f, r) in enumerate(zip(files, recs)):
        if not f.class_name:
            add(
                "unlabelled_file",
                [i],
                "file lies directly in a split folder, not in a class folder",
            )
            continue
        if "error" in r:
            add(r["error"], [i], r["error_detail"])
            continue
        counts.setdefault(f.split, {}).setdefault(f.class_name, 0)
        counts[f.split][f.class_name] += 1
        ok.append(i)
    for split, classes in class_dirs.items():
        if not classes and not any(f.split == split for f in files):
            problems.append(
                {
                    "kind": "empty_split",
                    "files": [],
                    "detail": f"split folder {split} holds no class folder",
                    "folder": split,
                }
            )
        for c in classes:
            if counts.get(split, {}).get(c, 0) == 0:
                nfiles = sum(1 for f in files if f.split == split and f.class_name == c)
                problems.append(
                    {
                        "kind": "empty_class",
                        "files": [],
                        "detail": f"class folder {split}/{c} holds no decodable image "
                        f"({nfiles} files)",
                        "folder": _split_dir(files, src, split, c),
                    }
                )

    return counts, ok


def _near_pairs(recs, ok, transforms, dhash_threshold, phash_threshold, structure_threshold):
    """Near-duplicate pairs ``(a, b, t, similarity)`` of the records ``ok``, t(a) ~ b,
    leaving out copies whose pixels are identical (after a transform)."""
    thumbs = [recs[i]["thumb"] for i in ok]
    cols = [hashing.TRANSFORMS.index(t) for t in transforms]
    th = [recs[i]["transform_hashes"] for i in ok]
    shape = (-1, len(cols))
    dh = np.array([[h["dhash"][c] for c in cols] for h in th], np.uint64).reshape(shape)
    ph = np.array([[h["phash"][c] for c in cols] for h in th], np.uint64).reshape(shape)
    found = hashing.near_duplicate_pairs_transformed(
        dh,
        ph,
        tuple(transforms),
        dhash_threshold=dhash_threshold,
        phash_threshold=phash_threshold,
        thumbs=thumbs,
        structure_threshold=structure_threshold,
    )
    return [
        (ok[a], ok[b], t, sim)
        for a, b, t, sim in found
        if recs[ok[a]]["copy_hash"] != recs[ok[b]]["copy_hash"]
    ]


def _patient_problems(files, ok, add) -> tuple[int, int]:
    """One problem per patient id seen in several splits; (patients, such patients)."""
    by_patient: dict[str, list[int]] = collections.defaultdict(list)
    for i in ok:
        pid = layouts.patient_id(files[i].relpath)
        if pid:
            by_patient[pid].append(i)
    n_overlap = 0
    for pid in sorted(by_patient):
        g = by_patient[pid]
        splits = sorted({files[i].split for i in g})
        if len(splits) > 1:
            n_overlap += 1
            add("patient_overlap", g, f"patient {pid} appears in splits {', '.join(splits)}")

    return len(by_patient), n_overlap


def _split_dir(files, src, split, cname) -> str:
    del files
    for d in os.listdir(src):
        if layouts.normalise_split(d) == split and os.path.isdir(os.path.join(src, d, cname)):
            return f"{d}/{cname}"
    return cname


def _group_by(indices: list[int], key) -> list[list[int]]:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i in indices:
        groups[key(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _copy_hash(rec: dict[str, Any], transforms: tuple[str, ...]) -> str:
    """The pixel hash shared by an image and its copies under ``transforms`` (the least)."""
    hashes = rec["transform_hashes"]["pixel"]
    return min(hashes[hashing.TRANSFORMS.index(t)] for t in transforms)


def _exact_transform(ra: dict[str, Any], rb: dict[str, Any]) -> str:
    """A transform t with t(pixels a) == pixels b, the identity when it is one."""
    for t, h in zip(hashing.TRANSFORMS, ra["transform_hashes"]["pixel"]):
        if h == rb["pixel_hash"]:
            return t
    raise ValueError("the two images are not copies of each other")


def _transform_note(transforms: list[str]) -> str:
    moved = [t for t in transforms if t != "identity"]
    if not moved:
        return ""
    return f" ({len(moved)} mirrored or rotated: {', '.join(sorted(set(moved)))})"


def _exact_problems(files, recs, ok, add, transforms) -> None:
    """Byte-identical groups, then groups of the same pixels up to a transform (the
    records' ``copy_hash``, set here)."""
    for i in ok:
        recs[i]["copy_hash"] = _copy_hash(recs[i], transforms)
    for g in _group_by(ok, lambda i: recs[i]["bytes_hash"]):
        splits = sorted({files[i].split for i in g})
        kind = "cross_split_exact_duplicate" if len(splits) > 1 else "exact_duplicate"
        add(
            kind,
            g,
            f"{len(g)} byte-identical files (same sha256 of file bytes) in "
            f"split(s) {', '.join(splits)}",
            transforms=["identity"] * len(g),
        )
    for g in _group_by(ok, lambda i: recs[i]["copy_hash"]):
        ts = [_exact_transform(recs[g[0]], recs[i]) for i in g]
        nbytes = len({recs[i]["bytes_hash"] for i in g})
        classes = sorted({files[i].class_name for i in g})
        splits = sorted({files[i].split for i in g})
        note = _transform_note(ts)
        if len(classes) > 1:
            add(
                "conflicting_label",
                g,
                f"identical pixels{note} filed under classes {', '.join(classes)}",
                transforms=ts,
            )
        if nbytes > 1:
            kind = "cross_split_pixel_duplicate" if len(splits) > 1 else "pixel_duplicate"
            add(
                kind,
                g,
                f"{len(g)} files with identical decoded pixels{note} but {nbytes} different "
                f"byte contents (re-encoded copies) in split(s) {', '.join(splits)}",
                transforms=ts,
            )


def _near_problems(files, ok, near, add, dhash_threshold, phash_threshold, structure_threshold):
    """One problem per connected group of near-duplicate pairs ``(a, b, t, similarity)``."""
    adj: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for a, b, t, _ in near:
        adj[a].append((b, t))
        adj[b].append((a, hashing.inverse(t)))
    local = {i: k for k, i in enumerate(ok)}
    for comp in hashing.groups_from_pairs(len(ok), [(local[a], local[b]) for a, b, _, _ in near]):
        g = [ok[k] for k in comp]
        ts = _group_transforms(g, adj)
        splits = sorted({files[i].split for i in g})
        classes = sorted({files[i].class_name for i in g})
        kind = "cross_split_near_duplicate" if len(splits) > 1 else "near_duplicate"
        extra = f"; classes {', '.join(classes)}" if len(classes) > 1 else ""
        add(
            kind,
            g,
            f"{len(g)} near-duplicate images{_transform_note(ts)} (copies, re-windowed or "
            f"resized versions, adjacent slices: dHash<={dhash_threshold}, "
            f"pHash<={phash_threshold} bits and high-pass thumbnail correlation >= "
            f"{structure_threshold}) in split(s) {', '.join(splits)}{extra}",
            transforms=ts,
        )


def _group_transforms(group: list[int], adj) -> list[str]:
    """Per member, the transform mapping group[0] onto it along the pairs (breadth first)."""
    found = {group[0]: "identity"}
    queue = collections.deque([group[0]])
    while queue:
        a = queue.popleft()
        for b, t in adj[a]:
            if b not in found:
                found[b] = hashing.compose(found[a], t)
                queue.append(b)
    return [found.get(i, "identity") for i in group]


def _copies(files, recs, ok, near) -> dict[int, set[tuple[str, str, str]]]:
    """Per image: {(split of a copy, transform from the image to it, "pixel" or "near")}."""
    out: dict[int, set[tuple[str, str, str]]] = collections.defaultdict(set)
    for g in _group_by(ok, lambda i: recs[i]["copy_hash"]):
        t0 = {i: _exact_transform(recs[g[0]], recs[i]) for i in g}
        keys = collections.Counter((files[i].split, recs[i]["pixel_hash"], t0[i]) for i in g)
        for i in g:
            own = (files[i].split, recs[i]["pixel_hash"], t0[i])
            for key, n in keys.items():
                if n <= (key == own):
                    continue
                split, ph, tj = key
                t = "identity" if ph == recs[i]["pixel_hash"] else None
                out[i].add((split, t or hashing.compose(hashing.inverse(t0[i]), tj), "pixel"))
    for a, b, t, _ in near:
        out[a].add((files[b].split, t, "near"))
        out[b].add((files[a].split, hashing.inverse(t), "near"))
    return out


def _leak_summary(files, recs, ok, near) -> dict[str, Any]:
    """Per evaluation split: how many of its images have a copy in train (or val).

    ``near``: near-duplicate pairs ``(a, b, t, similarity)``; pixel copies come from the
    records' ``copy_hash``. Mirrored and rotated copies count as copies.
    """
    out: dict[str, Any] = {}
    copies = _copies(files, recs, ok, near)
    bytes_splits: dict[str, set[str]] = collections.defaultdict(set)
    for i in ok:
        bytes_splits[recs[i]["bytes_hash"]].add(files[i].split)
    for s in sorted({files[i].split for i in ok} - {"train"}):
        others = {"train"} if s == "val" else {"train", "val"}
        n = collections.Counter()
        by_t: collections.Counter = collections.Counter()
        for i in ok:
            if files[i].split != s:
                continue
            c = copies.get(i, set())
            in_train = {(t, k) for sp, t, k in c if sp == "train"}
            moved = {t for t, _ in in_train if t != "identity"}
            byte_splits = bytes_splits[recs[i]["bytes_hash"]]
            n["bytes"] += "train" in byte_splits
            n["pixel"] += any(k == "pixel" for _, k in in_train)
            n["near"] += any(k == "near" for _, k in in_train)
            n["any"] += bool(byte_splits & others or {sp for sp, _, _ in c} & others)
            n["bytes_trainval"] += bool(byte_splits & others)
            n["moved"] += bool(moved)
            n["moved_only"] += bool(moved) and not any(t == "identity" for t, _ in in_train)
            by_t.update(moved)
        out[f"{s}_with_train_byte_duplicate"] = n["bytes"]
        out[f"{s}_with_train_pixel_duplicate"] = n["pixel"]  # includes the byte-identical ones
        out[f"{s}_with_train_near_duplicate"] = n["near"]  # near only (not pixel-identical)
        out[f"{s}_with_any_{'_or_'.join(sorted(others))}_copy"] = n["any"]
        if s != "val":
            out[f"{s}_with_train_or_val_byte_duplicate"] = n["bytes_trainval"]
        out[f"{s}_with_train_transformed_copy"] = n["moved"]
        out[f"{s}_with_train_transformed_copy_only"] = n["moved_only"]
        out[f"{s}_with_train_copy_by_transform"] = dict(sorted(by_t.items()))
    return out


def _image_stats(files, recs, ok) -> dict[str, Any]:
    modes = collections.Counter(recs[i]["mode"] for i in ok)
    formats = collections.Counter(recs[i]["format"] for i in ok)
    ws = np.array([recs[i]["width"] for i in ok] or [0])
    hs = np.array([recs[i]["height"] for i in ok] or [0])
    unusual = []
    for i in ok:
        r = recs[i]
        notes = []
        if r["mode"] not in ("L", "RGB"):
            notes.append(f"mode {r['mode']}")
        if min(r["width"], r["height"]) < SMALL_SIDE:
            notes.append("tiny")
        ext = os.path.splitext(files[i].relpath)[1].lower().lstrip(".")
        if ext and _EXT_FORMAT.get(ext, r["format"]) != r["format"]:
            notes.append(f"a {r['format']} file named .{ext}")
        if notes:
            unusual.append(
                {
                    "file": files[i].relpath,
                    "mode": r["mode"],
                    "format": r["format"],
                    "size": [r["width"], r["height"]],
                    "note": ", ".join(notes),
                }
            )
    sizes = collections.Counter((recs[i]["width"], recs[i]["height"]) for i in ok)
    return {
        "modes": dict(modes),
        "formats": dict(formats),
        "channels": dict(collections.Counter(recs[i]["channels"] for i in ok)),
        "width": {"min": int(ws.min()), "max": int(ws.max()), "median": float(np.median(ws))},
        "height": {"min": int(hs.min()), "max": int(hs.max()), "median": float(np.median(hs))},
        "distinct_sizes": len(sizes),
        "most_common_sizes": [[w, h, n] for (w, h), n in sizes.most_common(5)],
        "unusual": unusual,
    }


# ----------------------------------------------------------------------------- writing
def public(result: dict[str, Any]) -> dict[str, Any]:
    """The audit dict without private keys."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_report(result: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Writes audit.json and audit.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "audit.json")
    mpath = os.path.join(out_dir, "audit.md")
    with open(jpath, "w") as f:
        json.dump(public(result), f, indent=1)
    with open(mpath, "w") as f:
        f.write(markdown(result))
    return jpath, mpath


def markdown(result: dict[str, Any], max_listed: int = 20) -> str:
    """A human-readable audit report."""
    s = result["summary"]
    lines = [
        f"# Data audit of `{result['src']}`",
        "",
        f"Layout: `{result['dataset']}`; {s['files']} files, "
        f"{s['decodable_images']} decodable images.",
        "",
        "## Counts",
        "",
    ]
    splits = list(result["counts"])
    classes = sorted({c for v in result["counts"].values() for c in v})
    lines.append("| split | " + " | ".join(classes) + " |")
    lines.append("| --- |" + " --- |" * len(classes))
    for sp in splits:
        lines.append(
            f"| {sp} | " + " | ".join(str(result["counts"][sp].get(c, "-")) for c in classes) + " |"
        )
    lines += ["", "## Problems", ""]
    if not result["problems"]:
        lines.append("No problems found.")
    else:
        lines.append("| kind | groups | files |")
        lines.append("| --- | --- | --- |")
        by_kind: dict[str, list] = collections.defaultdict(list)
        for p in result["problems"]:
            by_kind[p["kind"]].append(p)
        for k, ps in by_kind.items():
            lines.append(f"| {k} | {len(ps)} | {sum(len(p['files']) for p in ps)} |")
    lines += ["", "## Leakage summary", ""]
    for k, v in s.items():
        if k != "problems_by_kind":
            lines.append(f"- {k}: {v}")
    st = result["image_stats"]
    lines += [
        "",
        "## Images",
        "",
        f"- modes: {st['modes']}",
        f"- formats: {st['formats']}",
        f"- channels: {st['channels']}",
        f"- width {st['width']}, height {st['height']}, "
        f"{st['distinct_sizes']} distinct sizes; most common (w, h, n): "
        f"{st['most_common_sizes']}",
    ]
    if st["unusual"]:
        lines += ["", "Valid but unusual images (decoded and converted, not errors):", ""]
        for u in st["unusual"][:max_listed]:
            lines.append(
                f"- `{u['file']}`: {u['format']} {u['mode']} "
                f"{u['size'][0]}x{u['size'][1]} ({u['note']})"
            )
        if len(st["unusual"]) > max_listed:
            lines.append(f"- ... and {len(st['unusual']) - max_listed} more")
    if "annotations" in result:  # added by data_prep.build --annotations
        from data_prep import annotations as annotations_lib

        lines += ["", annotations_lib.markdown(result["annotations"])]
    if "shortcut" in result:
        from data_prep import shortcut as shortcut_lib

        lines += ["", shortcut_lib.markdown(result["shortcut"])]
    if result["problems"]:
        lines += ["", "## Problem details", ""]
        by_kind = collections.defaultdict(list)
        for p in result["problems"]:
            by_kind[p["kind"]].append(p)
        for k, ps in by_kind.items():
            lines += [f"### {k} ({len(ps)})", ""]
            for p in ps[:max_listed]:
                files = ", ".join(f"`{x}`" for x in p["files"][:6])
                more = f" (+{len(p['files']) - 6})" if len(p["files"]) > 6 else ""
                where = files or f"`{p.get('folder', '')}`"
                lines.append(f"- {where}{more}: {p['detail']}")
            if len(ps) > max_listed:
                lines.append(f"- ... and {len(ps) - max_listed} more (see audit.json)")
            lines.append("")
    return "\n".join(lines) + "\n"


CONSOLE_KINDS = ("empty_class", "empty_split")  # said on the console, not only in audit.md


def console_notes(result: dict[str, Any]) -> list[str]:
    """One line per problem of ``CONSOLE_KINDS`` (an empty class or split folder)."""
    return [
        f"note: {p['kind'].replace('_', ' ')}: {p['detail']}"
        for p in result["problems"]
        if p["kind"] in CONSOLE_KINDS
    ]


@cli_errors.one_line_errors("data_prep.audit", expected=(ValueError,))
def main(argv: list[str]) -> None:
    """The command: one line per failure (the traceback under --verbosity=1)."""
    del argv
    from absl import flags

    f = flags.FLAGS
    result = run_audit(
        f.src,
        dataset=f.dataset,
        workers=f.workers,
        shortcut=f.shortcut,
        label_map=f.label_map,
        transforms=hashing.TRANSFORMS if f.mirrors else hashing.IDENTITY_ONLY,
    )
    jpath, mpath = write_report(result, f.out)
    s = result["summary"]
    for line in console_notes(result):
        print(line, file=sys.stderr)
    print(f"wrote {jpath} and {mpath}")
    print(f"problems by kind: {s['problems_by_kind']}")
    for k, v in s.items():
        if "_with_" in k:
            print(f"{k}: {v}")
    if "shortcut" in result and "groups" in result["shortcut"]:
        sc = result["shortcut"]
        print(
            f"shortcut ({sc['protocol']}, majority {sc['majority_baseline']:.3f}): "
            + ", ".join(
                f"{g} acc {v['accuracy']:.3f} auc {v['auc_roc']:.3f}{' RISK' if v['risk'] else ''}"
                for g, v in sc["groups"].items()
            )
        )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("src", None, "raw folder (split/class/image layout)", required=True)
    flags.DEFINE_string("out", None, "output folder for audit.json and audit.md", required=True)
    flags.DEFINE_enum("dataset", "auto", ("auto",) + layouts.DATASETS, "layout")
    flags.DEFINE_integer("workers", 0, "decode processes (0 = number of CPUs)")
    flags.DEFINE_bool("shortcut", False, "add the metadata shortcut audit")
    flags.DEFINE_bool(
        "mirrors", True, "count mirrored and rotated copies as duplicates (--nomirrors: plain only)"
    )
    flags.DEFINE_enum(
        "label_map",
        "binary",
        ("binary", "multiclass"),
        "labels of the shortcut audit (brain: tumor vs notumor, or 4 classes)",
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
