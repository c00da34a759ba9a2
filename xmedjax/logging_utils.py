"""Run logging: WORKDIR/metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), tqdm.

Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from xmedjax.cli_errors import writing


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Appends scalars to metrics.jsonl and TensorBoard under WORKDIR/tensorboard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self._path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (a dependency; slow import)

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any], *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in scalars.items()})
        with writing(self._path):  # a full disk's error names the file
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                value = _plain(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar (steps/s in its rate); a no-op object when disabled."""
    if enabled:
        from tqdm.auto import tqdm  # noqa: PLC0415

        return tqdm(
            total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True
        )
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def log(message: str, *, primary: bool = True) -> None:
    """A line on stdout from process 0."""
    if primary:
        print(message, flush=True)
