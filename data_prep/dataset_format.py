"""The prepared-dataset format, read and written by both packages (no TensorFlow, no numpy).

A prepared dataset is a folder ``DIR``::

  DIR/xmedjax_dataset.json        INFO_FILE: name, classes, channels, split counts, records_dir
  DIR/records-<stamp>-<id>/xmedjax_prepared/1.0.0/*.array_record
                                  RECORDS_KEY's folder, then TFDS_NAME/VERSION: one record per
                                  example (datasets built before records_dir existed keep
                                  DIR/xmedjax_prepared/1.0.0)

``data_prep.builder`` writes it: the records go into a new folder, and rewriting
``xmedjax_dataset.json`` (atomically) is what switches readers to them, so an interrupted
rebuild leaves the previous dataset whole.  ``xmedjax.input_pipeline`` and ``data_prep.shortcut`` read it
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
RECORDS_KEY = "records_dir"  # the info key naming the records folder, relative to DIR
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


class DatasetError(RuntimeError):
    """A prepared dataset that cannot be used as it is; the message names the file and fix."""


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
    """Writes ``info`` as ``DIR/xmedjax_dataset.json`` atomically (a synced temp file, then
    ``os.replace``): a reader sees the old file or the new one, never a mix. Returns its path."""
    path = info_path(data_dir)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(data_dir)
    return path


def _fsync_dir(folder: str) -> None:
    """Makes a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_info(data_dir: str) -> dict[str, Any]:
    """``DIR/xmedjax_dataset.json`` as written; a missing dataset raises FileNotFoundError,
    an unreadable file DatasetError."""
    path = info_path(data_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no prepared dataset at {data_dir} (missing {INFO_FILE}); "
            + _BUILD_HINT.format(d=data_dir)
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{path} is not valid JSON ({err}); {_BUILD_HINT.format(d=data_dir)}"
        ) from err


def rebuild_hint(data_dir: str, info: dict[str, Any]) -> str:
    """How to rebuild ``data_dir``, from what its info says about how it was built."""
    if info.get("dataset") and info.get("src"):
        flags = [f"--dataset={info['dataset']}", f"--src={info['src']}", f"--out={data_dir}"]
        if info.get("size"):
            flags.append(f"--size={info['size']}")
        if info.get("label_map") not in (None, "binary"):
            flags.append(f"--label_map={info['label_map']}")
        return f"rebuild it: python -m data_prep.build {' '.join(flags)} (plus your other flags)"
    if info.get("dataset") == "phantom":
        return (
            f"delete {data_dir}: a run's phantom dataset is rebuilt on the next run "
            f"(or rebuild it with python -m data_prep.phantoms --out={data_dir})"
        )
    return _BUILD_HINT.format(d=data_dir)


def records_path(data_dir: str, info: dict[str, Any]) -> str:
    """``DIR/<records_dir>/<tfds_name>/<tfds_version>``: the folder of the array_record files."""
    base = os.path.join(data_dir, info.get(RECORDS_KEY) or "")
    return os.path.join(
        base, info.get("tfds_name", TFDS_NAME), str(info.get("tfds_version", VERSION))
    )


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


def split_class_counts(data_dir: str, split: str) -> list[int]:
    """Examples per class of ``split``: from the info file, or (older datasets) by reading
    every record's label."""
    info = read_dataset_info(data_dir)
    counts = (info.extra.get("class_counts") or {}).get(split)
    if counts is not None:
        return [int(c) for c in counts]
    out = [0] * info.num_classes
    source = PreparedSource(data_dir, split)
    for i in range(len(source)):
        out[int(source[i]["label"])] += 1
    return out


class PreparedSource:
    """Random access to one split's raw records (image/mask PNG bytes undecoded).

    Opens the TFDS array_record data source lazily, so it pickles cheaply into Grain
    worker processes. A dataset whose records folder is missing raises FileNotFoundError
    here; a record that cannot be read (a corrupted or truncated file) raises DatasetError
    naming the file; both say how to rebuild.
    """

    def __init__(self, data_dir: str, split: str):
        self.data_dir = os.path.abspath(data_dir)
        self.split = split
        self.info = read_dataset_info(data_dir)
        self._len = check_split(self.info, data_dir, split)
        self._records = records_path(self.data_dir, self.info.extra)
        if not os.path.isdir(self._records):
            raise FileNotFoundError(
                f"prepared dataset {self.data_dir} is incomplete: its records folder "
                f"{self._records} is missing (an interrupted build, or deleted); "
                + rebuild_hint(self.data_dir, self.info.extra)
            )
        self._src = None
        self._lock = threading.Lock()

    def _open(self) -> None:
        import tensorflow_datasets as tfds  # heavy import, done once per process

        skip = tfds.decode.SkipDecoding()
        decoders = {"image": skip}
        if self.info.has_masks:
            decoders[MASK_KEY] = skip
        extra = self.info.extra
        name = f"{extra.get('tfds_name', TFDS_NAME)}:{extra.get('tfds_version', VERSION)}"
        data_dir = os.path.join(self.data_dir, extra.get(RECORDS_KEY) or "")
        try:
            src = tfds.data_source(name, data_dir=data_dir, split=self.split, decoders=decoders)
        except Exception as err:  # noqa: BLE001 - re-raised as one line naming the folder
            raise self._error(self._records, err) from err
        if len(src) != self._len:
            raise DatasetError(
                f"{self._records}: split {self.split} holds {len(src)} examples but "
                f"{INFO_FILE} says {self._len}; " + rebuild_hint(self.data_dir, extra)
            )
        self._src = src

    def _error(self, where: str, err: BaseException) -> DatasetError:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return DatasetError(
            f"{where}: cannot read split {self.split} of the prepared dataset {self.data_dir} "
            f"({type(err).__name__}: {first}); " + rebuild_hint(self.data_dir, self.info.extra)
        )

    def _file_of(self, index: int) -> str:
        """The array_record file holding record ``index`` (the records folder if unknown)."""
        reader = getattr(self._src, "data_source", None)
        locate = getattr(reader, "_reader_idx_and_position", None)
        paths = getattr(reader, "_paths", None)
        if locate is None or not paths:
            return self._records
        return os.fspath(paths[locate(index)[0]])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._src is None:
            with self._lock:  # read threads start together
                if self._src is None:
                    self._open()
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} outside split {self.split!r} of size {self._len}")
        try:
            return self._src[index]
        except Exception as err:  # noqa: BLE001 - re-raised as one line naming the file
            raise self._error(f"{self._file_of(index)} (record {index})", err) from err

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_src"], d["_lock"] = None, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
