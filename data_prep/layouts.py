"""Raw folder layouts: which files belong to which split and class, label maps, patient ids.

Supported layouts (all ``split/class/file``):
- ``brain_tumor_mri``: ``Training|Testing/{glioma,meningioma,notumor,pituitary}/*``
- ``chest_xray``: ``train|val|test/{NORMAL,PNEUMONIA}/*``
- ``folder``: any ``split/class/file`` tree; a ``class/file`` tree (no split level) is read
  as a single ``train`` split.
- ``yolo``: ``ROOT/images/[split/]class/file`` with YOLO boxes in ``ROOT/labels/`` (same
  tree, ``.txt``) or beside each image; relative paths keep the ``images/`` prefix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DATASETS = ("brain_tumor_mri", "chest_xray", "folder", "yolo")
YOLO_IMAGES = "images"  # the image tree of the yolo layout
YOLO_LABELS = "labels"  # its label tree

SPLIT_ALIASES = {
    "training": "train",
    "train": "train",
    "testing": "test",
    "test": "test",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
}

BRAIN_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CHEST_CLASSES = ("NORMAL", "PNEUMONIA")

# Files that are never data.
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class RawFile:
    """One file of a raw folder."""

    split: str  # normalised split name: train / val / test / other names kept lowercase
    class_name: str  # folder name as found
    relpath: str  # path relative to src, with '/'
    path: str  # absolute path


@dataclass(frozen=True)
class LabelMap:
    """Maps raw class folder names to integer labels."""

    label_names: tuple[str, ...]
    mapping: dict  # raw class name -> label index

    def label_of(self, class_name: str) -> int:
        try:
            return self.mapping[class_name]
        except KeyError:
            raise ValueError(
                f"class folder {class_name!r} is not in the label map {sorted(self.mapping)}"
            ) from None


def normalise_split(name: str) -> str:
    return SPLIT_ALIASES.get(name.lower(), name.lower())


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _IGNORED_NAMES


def detect_layout(src: str) -> str:
    """Guesses the dataset layout of a raw folder (falls back to 'folder')."""
    top = {d.lower() for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))}
    if {YOLO_IMAGES, YOLO_LABELS} <= top:
        return "yolo"
    if {"training", "testing"} <= top:
        return "brain_tumor_mri"
    if {"train", "test"} <= top:
        classes = set()
        for d in os.listdir(src):
            p = os.path.join(src, d)
            if os.path.isdir(p):
                classes |= {c for c in os.listdir(p) if os.path.isdir(os.path.join(p, c))}
        if classes and classes <= set(CHEST_CLASSES):
            return "chest_xray"
    return "folder"


def scan(src: str) -> tuple[list[RawFile], dict[str, list[str]]]:
    """Lists every file under ``split/class/``; returns (files, {split: [class dirs]}).

    Empty class folders appear in the second value with no files in the first. Files lying
    directly in a split folder (not in a class folder) get class_name ''.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src} is not a directory")
    src = os.path.abspath(src)
    entries = sorted(e for e in os.listdir(src) if _visible(e))
    dirs = [e for e in entries if os.path.isdir(os.path.join(src, e))]
    # A class/file tree (no split level): its subfolders hold files, not folders.
    has_split_level = any(
        os.path.isdir(os.path.join(src, d, c))
        for d in dirs
        for c in os.listdir(os.path.join(src, d))
        if _visible(c)
    )
    files: list[RawFile] = []
    classes: dict[str, list[str]] = {}
    if not has_split_level:
        split_dirs = [("train", "")]
    else:
        split_dirs = [(normalise_split(d), d) for d in dirs]
    for split, sdir in split_dirs:
        sroot = os.path.join(src, sdir) if sdir else src
        classes.setdefault(split, [])  # an empty split folder still shows up
        for cname in sorted(e for e in os.listdir(sroot) if _visible(e)):
            cpath = os.path.join(sroot, cname)
            if not os.path.isdir(cpath):
                rel = os.path.relpath(cpath, src).replace(os.sep, "/")
                files.append(RawFile(split, "", rel, cpath))
                continue
            classes.setdefault(split, []).append(cname)
            for root, subdirs, names in os.walk(cpath):
                subdirs[:] = sorted(d for d in subdirs if _visible(d))
                for name in sorted(names):
                    if not _visible(name):
                        continue
                    p = os.path.join(root, name)
                    rel = os.path.relpath(p, src).replace(os.sep, "/")
                    files.append(RawFile(split, cname, rel, p))
    return files, classes


def scan_dataset(src: str, dataset: str) -> tuple[list[RawFile], dict[str, list[str]]]:
    """``scan`` for a layout: the yolo layout scans ``src/images`` (paths keep the prefix)."""
    if dataset != "yolo":
        return scan(src)
    root = os.path.join(src, YOLO_IMAGES)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset=yolo expects {root} (and {YOLO_LABELS}/ beside it)")
    files, classes = scan(root)
    prefix = YOLO_IMAGES + "/"
    return [RawFile(f.split, f.class_name, prefix + f.relpath, f.path) for f in files], classes


def label_map_for(dataset: str, label_map: str, class_names: list[str]) -> LabelMap:
    """The label map of a dataset: 'binary' or 'multiclass' (folder: sorted class names)."""
    if dataset == "brain_tumor_mri":
        if label_map == "binary":
            return LabelMap(
                ("notumor", "tumor"), {"notumor": 0, "glioma": 1, "meningioma": 1, "pituitary": 1}
            )
        if label_map == "multiclass":
            return LabelMap(BRAIN_CLASSES, {c: i for i, c in enumerate(BRAIN_CLASSES)})
        raise ValueError(f"--label_map must be binary or multiclass, got {label_map!r}")
    if dataset == "chest_xray":
        return LabelMap(CHEST_CLASSES, {c: i for i, c in enumerate(CHEST_CLASSES)})
    names = tuple(sorted(set(class_names)))
    if not names:
        raise ValueError("no class folders found")
    return LabelMap(names, {c: i for i, c in enumerate(names)})


_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # chest: person123_bacteria_45
    re.compile(r"^((?:[A-Za-z0-9]+-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0115-0001, NORMAL2-IM-..
    re.compile(r"^(patient[_-]?\d+)", re.IGNORECASE),  # generic
)


def patient_id(filename: str) -> str:
    """The patient id carried by a file name, or '' when it carries none."""
    base = os.path.basename(filename)
    for pat in _PATIENT_PATTERNS:
        m = pat.match(base)
        if m:
            return m.group(1)
    return ""
