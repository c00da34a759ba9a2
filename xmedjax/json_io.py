"""Strict JSON out of results that hold numpy values and undefined (NaN) scores.

    write_json("WORKDIR/metrics.json", {"auc": np.float32(0.9), "ci": (np.nan, 1.0)})

writes `{"auc": 0.9, "ci": [null, 1.0]}`: numpy scalars and arrays become Python numbers and
lists, NaN and infinities become null, dict keys become strings, anything else JSON does
not know becomes its `str()`. Files are replaced atomically (a temp file in the same folder,
then `os.replace`), so a reader never sees half a file and a failed write leaves the old
one whole. A write error names `path` (a full disk's error on `write()` names no file).
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any

import numpy as np

from xmedjax.cli_errors import writing


def to_jsonable(value: Any) -> Any:
    """`value` with numpy types converted, non-finite floats as None and dict keys as str."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_text_atomic(path: str, text: str) -> str:
    """Writes `text` to `path` through a temp file in the same folder and `os.replace`."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # open(), not mkstemp: the file gets the usual permissions (mkstemp's are 0600)
    tmp = os.path.join(
        folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp"
    )
    try:
        with writing(path), open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str, obj: Any, *, indent: int | None = 1) -> str:
    """Writes `to_jsonable(obj)` as strict JSON (no NaN), atomically; returns `path`."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False))


__all__ = ["to_jsonable", "write_json", "write_text_atomic"]
