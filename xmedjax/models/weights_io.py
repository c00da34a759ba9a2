"""Converted weights on disk: an Orbax checkpoint of a model's state plus its recipe.

`python -m xmedjax.convert` writes one; a training config names it as its
initialisation (`config.init.checkpoint`; a trained run's work directory works too, see
`xmedjax.runs`). Paths may be local or `gs://`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

META_FILE = "xmedjax_model.json"
STATE_DIR = "state"


def save_weights(model: nnx.Module, directory: str, metadata: dict[str, Any]) -> str:
    """Writes `model`'s parameters and BatchNorm statistics to `directory` (must not exist)."""
    path = epath.Path(directory)
    if (path / STATE_DIR).exists():
        raise FileExistsError(f"{directory} already holds converted weights; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((path / STATE_DIR).absolute(), state)
    checkpointer.wait_until_finished()
    (path / META_FILE).write_text(json.dumps(metadata, indent=2))
    return os.fspath(path)


def read_metadata(directory: str) -> dict[str, Any]:
    """The recipe (arch, num_classes, in_channels, ...) saved beside converted weights."""
    meta = epath.Path(directory) / META_FILE
    if not meta.exists():
        raise FileNotFoundError(
            f"{directory} holds no converted weights ({META_FILE} missing); make them with "
            "python -m xmedjax.convert --arch=ARCH --src=FILE --out=DIR"
        )
    return json.loads(meta.read_text())


def load_weights(model: nnx.Module, directory: str, *, head: str = "strict") -> nnx.Module:
    """Restores converted weights into `model` in place (same rules as the converter).

    With head="reinit" a classifier of another size keeps the model's initialisation.
    """
    read_metadata(directory)
    path = (epath.Path(directory) / STATE_DIR).absolute()
    restored = ocp.StandardCheckpointer().restore(path)
    flat = _flatten(restored)
    from xmedjax.models.convert import load_torchvision_weights  # noqa: PLC0415 (cycle)

    return load_torchvision_weights(model, _as_torchvision(model, flat), head=head)


def load_state(model: nnx.Module, source_state: nnx.State, *, head: str = "strict") -> nnx.Module:
    """Restores another model's state (same architecture and width, e.g. a trained run's
    best checkpoint) into `model` in place, with the converter's rules (`head`)."""
    from xmedjax.models.convert import load_torchvision_weights  # noqa: PLC0415 (cycle)

    flat = _flatten(nnx.to_pure_dict(source_state))
    return load_torchvision_weights(model, _as_torchvision(model, flat), head=head)


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, prefix + (key,)))
    else:
        out[prefix] = np.asarray(tree)
    return out


def _as_torchvision(model: nnx.Module, flat: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a pure-dict state to torchvision keys so loading shares one code path."""
    names = {
        "kernel": "weight",
        "scale": "weight",
        "bias": "bias",
        "mean": "running_mean",
        "var": "running_var",
    }
    out = {}
    for path, value in flat.items():
        key = ".".join(str(p) for p in path[:-1]) + "." + names.get(str(path[-1]), str(path[-1]))
        if value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))
        elif value.ndim == 2:
            value = value.T
        out[key] = value
    return out
