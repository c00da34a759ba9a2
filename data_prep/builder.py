"""The prepared-dataset writer: a TFDS ``GeneratorBasedBuilder`` writing array_record files,
plus a small ``xmedjax_dataset.json`` beside it (the format: ``data_prep.dataset_format``).

Layout of a prepared dataset directory ``DIR``::

  DIR/xmedjax_dataset.json                 name, classes, channels, split counts, records_dir
  DIR/records-<stamp>-<id>/xmedjax_prepared/1.0.0/*.array_record  (+ TFDS metadata files)

A (re)build writes into a hidden staging folder ``DIR/.building-<pid>-<id>``, renames it to
a new ``records-...`` folder, then replaces ``xmedjax_dataset.json`` atomically: that
replacement is the commit. Only then are the previous records deleted. Killed at any moment,
``DIR`` holds the previous dataset or the new one, whole; the next build removes what an
interrupted one left behind.

Read it back without TensorFlow with ``dataset_format.PreparedSource`` (which calls
``tfds.data_source(TFDS_NAME, data_dir=DIR, decoders=...)``).
Images and masks are PNG bytes encoded by us with PIL (TFDS would call TensorFlow to encode
numpy arrays); TFDS does not check shapes, so ``encode_example`` does.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_prep import image_io
from data_prep.dataset_format import (
    FEATURE_KEYS,
    MASK_KEY,
    MASK_KNOWN_KEY,
    RECORDS_KEY,
    SPLIT_ORDER,
    TFDS_NAME,
    VERSION,
    write_info,
)

RECORDS_PREFIX = "records-"  # DIR/records-<stamp>-<id>: one complete build's records
STAGING_PREFIX = ".building-"  # DIR/.building-<pid>-<id>: a build in progress
# Only folders named exactly as a build names them are ever deleted.
_OURS = re.compile(r"(records-\d{8}T\d{6}|\.building-\d+)-[0-9a-f]{6}")


@dataclass
class Example:
    """One prepared example before encoding."""

    image: np.ndarray  # uint8 (H, W) or (H, W, 3), already resized
    label: int
    id: str
    source: str = ""
    patient_id: str = ""
    pixel_hash: str = ""
    bytes_hash: str = ""
    phash: int = 0
    orig_size: tuple[int, int] = (0, 0)  # (height, width) of the source image
    orig_mode: str = ""
    file_format: str = ""
    file_size: int = 0
    mask: np.ndarray | None = None  # uint8/bool (H, W), same size as image
    # True: the mask is the truth (empty = no lesion); False: unknown, never scored.
    # None: known when a mask is given.
    mask_known: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """What to write: a name, classes, and per split a list of items + a converter."""

    name: str
    label_names: Sequence[str]
    channels: int
    has_masks: bool
    size: int
    splits: dict[str, Sequence[Any]]
    to_example: Callable[[Any], Example]  # item -> Example (may decode lazily)
    metadata: dict[str, Any] = field(default_factory=dict)
    image_format: str = "png"  # or "jpeg" (lossy, ~5x smaller: for carrying data around)
    jpeg_quality: int = 95


class XmedPrepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a DatasetSpec as array_record files; not registered (read from files)."""

    VERSION = tfds.core.Version(VERSION)
    name = TFDS_NAME

    def __init__(self, spec: DatasetSpec, progress: bool = True, **kwargs):
        self._spec = spec
        self._progress = progress
        self._num_classes = len(spec.label_names)
        self.class_counts: dict[str, list[int]] = {}  # split -> examples per class, as written
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        feats = {
            "image": tfds.features.Image(
                shape=(None, None, self._spec.channels), encoding_format=self._spec.image_format
            ),
            "label": tfds.features.ClassLabel(names=list(self._spec.label_names)),
            "label_name": tfds.features.Text(),
            "id": tfds.features.Text(),
            "source": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "pixel_hash": tfds.features.Text(),
            "bytes_hash": tfds.features.Text(),
            "phash": tfds.features.Tensor(shape=(), dtype=np.uint64),
            "orig_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "orig_mode": tfds.features.Text(),
            "file_format": tfds.features.Text(),
            "file_size": tfds.features.Tensor(shape=(), dtype=np.int64),
        }
        if tuple(feats) != FEATURE_KEYS:  # the format lists what every record holds
            raise AssertionError(f"features {tuple(feats)} != dataset_format.FEATURE_KEYS")
        if self._spec.has_masks:
            feats[MASK_KEY] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
            feats[MASK_KNOWN_KEY] = tfds.features.Tensor(shape=(), dtype=np.bool_)
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"xmedjax prepared dataset {self._spec.name}",
            features=tfds.features.FeaturesDict(feats),
            supervised_keys=("image", "label"),
            # Keep the generation order: index i of a split is the i-th generated example.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in self._spec.splits}

    def _generate_examples(self, split: str) -> Iterable[tuple[int, dict[str, Any]]]:
        items = self._spec.splits[split]
        counts = self.class_counts.setdefault(split, [0] * self._num_classes)
        from tqdm import tqdm

        for i, item in enumerate(
            tqdm(items, desc=f"encode {split}", unit="img", disable=not self._progress, leave=False)
        ):
            ex = self._spec.to_example(item)
            encoded = self._encode(ex)
            counts[ex.label] += 1
            yield i, encoded

    def _encode(self, ex: Example) -> dict[str, Any]:
        img = image_io.to_channels(ex.image, self._spec.channels)
        if img.dtype != np.uint8:
            raise ValueError(f"{ex.id}: image dtype {img.dtype}, expected uint8")
        if not 0 <= ex.label < self._num_classes:
            raise ValueError(f"{ex.id}: label {ex.label} outside [0, {self._num_classes})")
        out = {
            "image": (
                image_io.encode_png(img)
                if self._spec.image_format == "png"
                else image_io.encode_jpeg(img, self._spec.jpeg_quality)
            ),
            "label": int(ex.label),
            "label_name": self._spec.label_names[ex.label],
            "id": ex.id,
            "source": ex.source,
            "patient_id": ex.patient_id,
            "pixel_hash": ex.pixel_hash,
            "bytes_hash": ex.bytes_hash,
            "phash": np.uint64(ex.phash),
            "orig_size": np.asarray(ex.orig_size, np.int32),
            "orig_mode": ex.orig_mode,
            "file_format": ex.file_format,
            "file_size": np.int64(ex.file_size),
        }
        if self._spec.has_masks:
            if ex.mask is None:
                m = np.zeros(img.shape[:2], np.uint8)
            else:
                m = np.asarray(ex.mask)
                if m.shape != img.shape[:2]:
                    raise ValueError(
                        f"{ex.id}: mask shape {m.shape} != image shape {img.shape[:2]}"
                    )
                m = (
                    (m > 0).astype(np.uint8) * 255
                    if m.dtype == bool or m.max() <= 1
                    else (m.astype(np.uint8))
                )
            out[MASK_KEY] = image_io.encode_png(m)
            known = ex.mask is not None if ex.mask_known is None else ex.mask_known
            out[MASK_KNOWN_KEY] = np.bool_(known)
        return out


def write_prepared(spec: DatasetSpec, out_dir: str, progress: bool = True) -> str:
    """Builds the TFDS array_record files and xmedjax_dataset.json into out_dir.

    Atomic: the previous dataset in ``out_dir`` stays whole until the new one is complete
    (see the module docstring).
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    empty = [s for s, items in spec.splits.items() if not items]
    if empty:  # TFDS cannot write an empty split: leave it out of the dataset.
        print(f"note: split(s) {empty} are empty and are left out", flush=True)
        spec.splits = {s: items for s, items in spec.splits.items() if items}
    if not spec.splits:
        raise ValueError(f"nothing to write into {out_dir}: every split is empty")
    if not progress:
        tfds.disable_progress_bar()
    token = secrets.token_hex(3)
    staging = os.path.join(out_dir, f"{STAGING_PREFIX}{os.getpid()}-{token}")
    try:
        builder = XmedPrepared(spec, progress=progress, data_dir=staging)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
        downloads = os.path.join(staging, "downloads")  # TFDS leaves an empty one behind
        if os.path.isdir(downloads) and not any(fs for _, _, fs in os.walk(downloads)):
            shutil.rmtree(downloads)
        records = f"{RECORDS_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{token}"
        os.rename(staging, os.path.join(out_dir, records))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours, incomplete; the error propagates
        raise
    write_info(out_dir, _info_dict(spec, records, builder.class_counts))  # the commit
    remove_stale_records(out_dir, keep=records)
    return out_dir


def _info_dict(spec: DatasetSpec, records: str, class_counts: dict[str, list[int]]) -> dict:
    splits = _ordered(spec.splits)
    info = {
        "name": spec.name,
        "num_classes": len(spec.label_names),
        "label_names": list(spec.label_names),
        "channels": spec.channels,
        "splits": {s: len(spec.splits[s]) for s in splits},
        "class_counts": {s: class_counts.get(s, []) for s in splits},
        "has_masks": spec.has_masks,
        "size": spec.size,
        "image_format": spec.image_format,
        "tfds_name": TFDS_NAME,
        "tfds_version": VERSION,
        RECORDS_KEY: records,
    }
    info.update(spec.metadata)
    return info


def remove_stale_records(out_dir: str, *, keep: str) -> list[str]:
    """Deletes what earlier builds left in ``out_dir`` besides ``keep``: older records folders,
    the pre-records_dir layout, staging folders of builds no longer running. Returns them."""
    stale = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name == keep or not os.path.isdir(path):
            continue
        if name.startswith(STAGING_PREFIX) and _build_running(name):
            continue
        if _OURS.fullmatch(name) or name == TFDS_NAME:
            stale.append(path)
    for path in stale:
        try:
            shutil.rmtree(path)
        except OSError as err:
            print(f"warning: could not remove {path} ({err}); delete it by hand", file=sys.stderr)
    return stale


def _build_running(staging_name: str) -> bool:
    """Whether the process that owns ``.building-<pid>-<id>`` is alive (on this machine)."""
    pid = staging_name[len(STAGING_PREFIX) :].split("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _ordered(splits) -> list[str]:
    return sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))
