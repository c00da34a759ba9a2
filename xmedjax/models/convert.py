"""Load torchvision / timm checkpoints into the Flax models.

The models name their submodules after torchvision's `state_dict` keys, so a key such as
`layer1.0.downsample.1.running_var` is a path through the module tree plus a parameter
name. Conversion is strict: every checkpoint key must be consumed exactly once and every
model parameter must be set, or one error lists all that went wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from flax import nnx

HEAD_KEYS = ("fc", "classifier")
STEM_KEYS = ("conv1.weight", "features.conv0.weight")

# torch parameter name -> NNX variable name, per layer type.
_PARAM_NAMES = {
    nnx.Conv: {"weight": "kernel", "bias": "bias"},
    nnx.Linear: {"weight": "kernel", "bias": "bias"},
    nnx.BatchNorm: {
        "weight": "scale",
        "bias": "bias",
        "running_mean": "mean",
        "running_var": "var",
    },
}

# torchvision < 0.4 named DenseNet layers `norm.1`, `conv.2`, ...; `load_state_dict_from_url`
# rewrites them with this pattern.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model; the message lists every mismatch."""


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file, a `.pth`/`.pt` file or a mapping into numpy arrays.

    A file that is not a checkpoint of its kind (truncated, garbage) raises WeightLoadError
    naming it.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            raw = _decoded(path, "safetensors", load_file)
        elif path.endswith((".pth", ".pt", ".bin")):
            raw = _read_torch_file(path)
        else:
            raise ValueError(
                f"{path}: unknown checkpoint format (expected .safetensors, .pth or .pt)"
            )
    return {key: _to_numpy(value) for key, value in raw.items()}


def _decoded(path: str, kind: str, load, *args, **kwargs) -> Any:
    """`load(path, ...)`, its failure re-raised as one WeightLoadError line naming the file."""
    try:
        return load(path, *args, **kwargs)
    except OSError:  # the file system's own error already names the file
        raise
    except Exception as err:  # noqa: BLE001 - any decoder's error: the file is not readable
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise WeightLoadError(
            f"{path}: not a readable {kind} checkpoint ({type(err).__name__}: {first}); "
            "check the download (its size and checksum) or fetch it again"
        ) from err


def _read_torch_file(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path}: reading .pth files needs PyTorch (pip install 'xmedjax[torch]'), "
            "or convert it to .safetensors first"
        ) from err
    loaded = _decoded(path, "PyTorch", torch.load, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state"):
        if (
            isinstance(loaded, Mapping)
            and wrapper in loaded
            and isinstance(loaded[wrapper], Mapping)
        ):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return dict(loaded)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu().float().numpy()
    return (
        np.asarray(value, dtype=np.float32)
        if np.asarray(value).dtype != np.float32
        else np.asarray(value)
    )


def canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips `module.` prefixes, renames legacy DenseNet keys, drops BN step counters."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("module."):
            key = key[len("module.") :]
        match = _LEGACY_DENSENET.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def torch_layout(model: nnx.Module) -> dict[str, tuple[nnx.Variable, tuple[int, ...]]]:
    """Maps each torchvision key the model expects to (variable, torch-layout shape)."""
    layout = {}
    for path, module in nnx.iter_modules(model):
        # by the first base class that is a known layer (batch_norm.BatchNorm is nnx's)
        names = next((_PARAM_NAMES[t] for t in type(module).__mro__ if t in _PARAM_NAMES), None)
        if names is None:
            continue
        prefix = ".".join(str(p) for p in path)
        for torch_name, attr in names.items():
            var = getattr(module, attr, None)
            if var is None:
                continue
            shape = tuple(var[...].shape)
            if torch_name == "weight" and len(shape) == 4:  # HWIO -> OIHW
                shape = (shape[3], shape[2], shape[0], shape[1])
            elif torch_name == "weight" and len(shape) == 2:  # (in, out) -> (out, in)
                shape = (shape[1], shape[0])
            layout[f"{prefix}.{torch_name}"] = (var, shape)
    return layout


def _is_head(key: str) -> bool:
    return key.split(".")[0] in HEAD_KEYS


def load_torchvision_weights(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    head: str = "strict",
) -> nnx.Module:
    """Loads torchvision/timm weights into `model` in place and returns it.

    Args:
      model: a model from `create_model`.
      source: a `.safetensors` file, a `.pth` file (needs torch) or a mapping of arrays
        keyed like torchvision's `state_dict()`.
      head: "strict" (every key must fit) or "reinit" (a classifier head of another size,
        or a missing one, keeps the model's fresh initialisation; the re-initialised keys
        are logged).

    A 3-channel stem loaded into a 1-channel model is summed over its RGB kernels.
    Raises `WeightLoadError` listing every missing, unexpected and wrongly shaped key.
    """
    if head not in ("strict", "reinit"):
        raise ValueError(f"head must be 'strict' or 'reinit', got {head!r}")
    given = canonical_keys(read_state_dict(source))
    layout = torch_layout(model)

    missing = sorted(k for k in layout if k not in given)
    unexpected = sorted(k for k in given if k not in layout)
    wrong_shape, reinit, updates = [], [], []
    for key, (var, shape) in layout.items():
        if key not in given:
            continue
        value = given[key]
        if key in STEM_KEYS and value.ndim == 4 and value.shape[1] == 3 and shape[1] == 1:
            value = value.sum(axis=1, keepdims=True)
        if tuple(value.shape) != shape:
            if head == "reinit" and _is_head(key):
                reinit.append(f"{key} {tuple(value.shape)} -> {shape}")
                continue
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)}, model {shape}")
            continue
        updates.append((var, _to_flax_layout(value)))

    if head == "reinit":
        reinit += [f"{k} (absent from checkpoint)" for k in missing if _is_head(k)]
        missing = [k for k in missing if not _is_head(k)]
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint does not fit {type(model).__name__}:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in wrong_shape]
        if any(_is_head(k.split(":")[0]) for k in wrong_shape):
            lines.append("  (a classifier of another size: pass head='reinit' to re-initialise it)")
        raise WeightLoadError("\n".join(lines))

    for var, value in updates:
        var[...] = value.astype(var[...].dtype)
    if reinit:
        logging.warning("re-initialised the classifier head: %s", "; ".join(reinit))
    return model


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if value.ndim == 2:
        return value.T
    return value


def export_torchvision_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of loading: the model's weights as a torchvision-keyed numpy dict."""
    out = {}
    for key, (var, _) in torch_layout(model).items():
        value = np.asarray(var[...])
        if value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))
        elif value.ndim == 2:
            value = value.T
        out[key] = np.ascontiguousarray(value)
    return out
