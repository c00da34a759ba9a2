"""The prepared-dataset format, read and written by both packages (no TensorFlow, no numpy).

A prepared dataset is a folder ``DIR``::

  DIR/xmedjax_dataset.json                   INFO_FILE: name, classes, channels, split counts, ...
  DIR/xmedjax_prepared/1.0.0/*.array_record  TFDS_NAME/VERSION, one record per example

``data_prep.builder`` writes it; ``xmedjax.input_pipeline`` and ``data_prep.shortcut`` read it
through ``read_dataset_info`` and ``PreparedSource`` (TFDS is imported only when a source
first reads a record). Each record holds ``FEATURE_KEYS`` (and ``MASK_KEY`` when the dataset
has masks); images and masks are PNG (or JPEG) bytes.

This module imports nothing from ``xmedjax``: data_prep sits below it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

INFO_FILE = "xmedjax_dataset.json"
TFDS_NAME = "xmedjax_prepared"
VERSION = "1.0.0"
SPLIT_ORDER = ("train", "val", "test", "test_dedup")

# The features of one record, in the order the builder declares them.
FEATURE_KEYS = (
    "image",  # encoded image bytes, (H, W, channels)
    "label",  # int class index
    "label_name",
    "id",  # unique per dataset
    "source",  # the raw file it came from
    "patient_id",
    "pixel_hash",
    "bytes_hash",
    "phash",  # uint64 perceptual hash
    "orig_size",  # int32 (height, width) of the source image
    "orig_mode",  # PIL mode of the source image
    "file_format",
    "file_size",  # bytes
)
MASK_KEY = "mask"  # PNG bytes (H, W, 1), only when the dataset has masks
# bool, beside MASK_KEY: False = not annotated (the all-zero mask is unknown, never scored)
MASK_KNOWN_KEY = "mask_known"

_BUILD_HINT = (
    "make one with `python -m data_prep.build --dataset=brain_tumor_mri|"
    "chest_xray|folder --src=RAW_DIR --out={d}` (or data_prep.phantoms."
    "build_phantom_dataset)"
)
_INFO_KEYS = ("name", "num_classes", "label_names", "channels", "splits", "has_masks", "size")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``xmedjax_dataset.json`` says about a prepared dataset."""

    name: str
    num_classes: int
    label_names: tuple[str, ...]
    channels: int
    splits: dict[str, int]
    has_masks: bool
    size: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def info_path(data_dir: str) -> str:
    """``DIR/xmedjax_dataset.json``."""
    return os.path.join(data_dir, INFO_FILE)


def write_info(data_dir: str, info: dict[str, Any]) -> str:
    """Writes ``info`` as ``DIR/xmedjax_dataset.json``; returns its path."""
    path = info_path(data_dir)
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    return path


def read_info(data_dir: str) -> dict[str, Any]:
    """``DIR/xmedjax_dataset.json`` as written; a missing dataset raises FileNotFoundError."""
    path = info_path(data_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no prepared dataset at {data_dir} (missing {INFO_FILE}); "
            + _BUILD_HINT.format(d=data_dir)
        )
    with open(path) as f:
        return json.load(f)


def read_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads ``DIR/xmedjax_dataset.json``; a missing dataset raises FileNotFoundError."""
    d = read_info(data_dir)
    return DatasetInfo(
        name=d["name"],
        num_classes=int(d["num_classes"]),
        label_names=tuple(d["label_names"]),
        channels=int(d["channels"]),
        splits={k: int(v) for k, v in d["splits"].items()},
        has_masks=bool(d["has_masks"]),
        size=int(d["size"]),
        extra={k: v for k, v in d.items() if k not in _INFO_KEYS},
    )


def check_split(info: DatasetInfo, data_dir: str, split: str) -> int:
    """The number of examples of ``split``; a ValueError naming the fix when it is absent."""
    if split not in info.splits:
        hint = " (build with --dedup_test to get test_dedup)" if split == "test_dedup" else ""
        raise ValueError(
            f"split {split!r} not in prepared dataset {data_dir} (has "
            f"{sorted(info.splits)}){hint}; rebuild with `python -m data_prep.build "
            f"... --out={data_dir}`"
        )
    return info.splits[split]


class PreparedSource:
    """Random access to one split's raw records (image/mask PNG bytes undecoded).

    Opens the TFDS array_record data source lazily, so it pickles cheaply into Grain
    worker processes.
    """

    def __init__(self, data_dir: str, split: str):
        self.data_dir = os.path.abspath(data_dir)
        self.split = split
        self.info = read_dataset_info(data_dir)
        self._len = check_split(self.info, data_dir, split)
        self._src = None
        self._lock = threading.Lock()

    def _open(self) -> None:
        import tensorflow_datasets as tfds  # heavy import, done once per process

        skip = tfds.decode.SkipDecoding()
        decoders = {"image": skip}
        if self.info.has_masks:
            decoders[MASK_KEY] = skip
        name = self.info.extra.get("tfds_name", TFDS_NAME)
        self._src = tfds.data_source(
            name, data_dir=self.data_dir, split=self.split, decoders=decoders
        )
        if len(self._src) != self._len:
            raise ValueError(
                f"{self.data_dir}: split {self.split} holds {len(self._src)} "
                f"examples but {INFO_FILE} says {self._len}; rebuild it"
            )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._src is None:
            with self._lock:  # read threads start together
                if self._src is None:
                    self._open()
        return self._src[int(index)]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_src"], d["_lock"] = None, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
