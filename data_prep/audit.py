"""Data audit of a raw ``split/class/image`` folder.

``python -m data_prep.audit --src=DIR --out=OUTDIR [--dataset=auto] [--shortcut]`` writes
``OUTDIR/audit.json`` and ``OUTDIR/audit.md``.

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
Valid but unusual images (16-bit, RGBA, CMYK, palette, tiny, a format that does not match
the file extension) are decoded and listed under ``image_stats.unusual``, not as problems.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from data_prep import cli_errors, hashing, image_io, layouts

SMALL_SIDE = 32  # images with a side below this are noted as tiny
STRICT_SIMILARITY = 0.9  # structure similarity of near-identical copies
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
    rec.update(
        mode=img.mode,
        format=img.file_format,
        width=img.width,
        height=img.height,
        channels=img.channels,
        pixel_hash=hashing.pixel_hash(px),
        dhash=hashing.dhash64(px),
        phash=hashing.phash64(px),
        thumb=hashing.thumbnail(px),
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
) -> dict[str, Any]:
    """Audits a raw folder; returns the audit.json dict plus a private ``_records`` list.

    ``_records[i]`` holds the RawFile and analyse_file() result of every file, so the
    builder does not hash twice.
    """
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src} is not a directory")
    if dataset == "auto":
        dataset = layouts.detect_layout(src)
    files, class_dirs = layouts.scan(src)
    recs = analyse_files([f.path for f in files], workers=workers, progress=progress)
    problems: list[dict[str, Any]] = []

    def add(kind: str, idx: Iterable[int], detail: str) -> None:
        problems.append({"kind": kind, "files": [files[i].relpath for i in idx], "detail": detail})

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

    summary: dict[str, Any] = {}
    # Exact duplicates: byte groups, then pixel groups holding different bytes.
    byte_groups = _group_by(ok, lambda i: recs[i]["bytes_hash"])
    for g in byte_groups:
        splits = sorted({files[i].split for i in g})
        kind = "cross_split_exact_duplicate" if len(splits) > 1 else "exact_duplicate"
        add(
            kind,
            g,
            f"{len(g)} byte-identical files (same sha256 of file bytes) in "
            f"split(s) {', '.join(splits)}",
        )
    pixel_groups = _group_by(ok, lambda i: recs[i]["pixel_hash"])
    for g in pixel_groups:
        nbytes = len({recs[i]["bytes_hash"] for i in g})
        classes = sorted({files[i].class_name for i in g})
        splits = sorted({files[i].split for i in g})
        if len(classes) > 1:
            add(
                "conflicting_label", g, f"identical pixels filed under classes {', '.join(classes)}"
            )
        if nbytes > 1:
            kind = "cross_split_pixel_duplicate" if len(splits) > 1 else "pixel_duplicate"
            add(
                kind,
                g,
                f"{len(g)} files with identical decoded pixels but {nbytes} different "
                f"byte contents (re-encoded copies) in split(s) {', '.join(splits)}",
            )
    # Near duplicates (pairs that are not pixel-identical).
    thumbs = [recs[i]["thumb"] for i in ok]
    if structure_threshold is None:
        structure_threshold = round(hashing.adaptive_structure_threshold(thumbs), 3)
    summary["near_duplicate_structure_threshold"] = structure_threshold
    dh = np.array([recs[i]["dhash"] for i in ok], dtype=np.uint64)
    ph = np.array([recs[i]["phash"] for i in ok], dtype=np.uint64)
    pairs = [
        (ok[a], ok[b])
        for a, b in hashing.near_duplicate_pairs(
            dh,
            ph,
            dhash_threshold=dhash_threshold,
            phash_threshold=phash_threshold,
            thumbs=thumbs,
            structure_threshold=structure_threshold,
        )
    ]
    pairs = [(a, b) for a, b in pairs if recs[a]["pixel_hash"] != recs[b]["pixel_hash"]]
    local = {i: k for k, i in enumerate(ok)}
    for comp in hashing.groups_from_pairs(len(ok), [(local[a], local[b]) for a, b in pairs]):
        g = [ok[k] for k in comp]
        splits = sorted({files[i].split for i in g})
        classes = sorted({files[i].class_name for i in g})
        kind = "cross_split_near_duplicate" if len(splits) > 1 else "near_duplicate"
        extra = f"; classes {', '.join(classes)}" if len(classes) > 1 else ""
        add(
            kind,
            g,
            f"{len(g)} near-duplicate images (copies, re-windowed or resized "
            f"versions, adjacent slices: dHash<={dhash_threshold}, pHash<={phash_threshold} "
            f"bits and high-pass thumbnail correlation >= {structure_threshold}) in split(s) "
            f"{', '.join(splits)}{extra}",
        )
    # Patient overlap across splits.
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

    summary.update(_leak_summary(files, recs, ok, pairs))
    # The same count for near-identical copies only (re-encoded, re-windowed, resized),
    # leaving out merely similar images such as adjacent slices.
    strict = [
        (a, b)
        for a, b in pairs
        if hashing.structure_similarity(recs[a]["thumb"], recs[b]["thumb"]) >= STRICT_SIMILARITY
    ]
    for k, v in _leak_summary(files, recs, ok, strict).items():
        if k.endswith("_with_train_near_duplicate"):
            summary[k + "_strict"] = v
    summary["patients"] = len(by_patient)
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
    result["_near_pairs"] = pairs
    return result


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


def _leak_summary(files, recs, ok, near_pairs) -> dict[str, int]:
    """Per evaluation split: how many of its images have a copy in train (or val)."""
    out: dict[str, int] = {}
    near: dict[int, set[str]] = collections.defaultdict(set)
    for a, b in near_pairs:
        near[a].add(files[b].split)
        near[b].add(files[a].split)
    bytes_splits: dict[str, set[str]] = collections.defaultdict(set)
    pixel_splits: dict[str, set[str]] = collections.defaultdict(set)
    for i in ok:
        bytes_splits[recs[i]["bytes_hash"]].add(files[i].split)
        pixel_splits[recs[i]["pixel_hash"]].add(files[i].split)
    splits = sorted({files[i].split for i in ok})
    for s in splits:
        if s == "train":
            continue
        others = {"train"} if s == "val" else {"train", "val"}
        nb = npx = nn = nany = nb_trainval = 0
        for i in ok:
            if files[i].split != s:
                continue
            b = "train" in bytes_splits[recs[i]["bytes_hash"]]
            p = "train" in pixel_splits[recs[i]["pixel_hash"]]
            n = "train" in near[i]
            nb += b
            npx += p
            nn += n
            anyleak = bool(
                (
                    bytes_splits[recs[i]["bytes_hash"]]
                    | pixel_splits[recs[i]["pixel_hash"]]
                    | near[i]
                )
                & others
            )
            nany += anyleak
            nb_trainval += bool(bytes_splits[recs[i]["bytes_hash"]] & others)
        out[f"{s}_with_train_byte_duplicate"] = nb
        out[f"{s}_with_train_pixel_duplicate"] = npx  # includes the byte-identical ones
        out[f"{s}_with_train_near_duplicate"] = nn  # near only (not pixel-identical)
        out[f"{s}_with_any_{'_or_'.join(sorted(others))}_copy"] = nany
        if s != "val":
            out[f"{s}_with_train_or_val_byte_duplicate"] = nb_trainval
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
        f.src, dataset=f.dataset, workers=f.workers, shortcut=f.shortcut, label_map=f.label_map
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
