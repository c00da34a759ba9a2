"""The deterministic weight and input recipe of the torchvision parity goldens.

See tests/data/README.md: every float is `hash_uniform(name, n)`, splitmix64 over
`(crc32(name) << 32) + i`, scaled per key. Any head size or input size can be rebuilt.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "data")


def hash_uniform(name: str, n: int) -> np.ndarray:
    """n float32 values in [-1, 1) derived from `name` by splitmix64."""
    with np.errstate(over="ignore"):
        x = (np.uint64(zlib.crc32(name.encode("utf-8"))) << np.uint64(32)) + np.arange(
            n, dtype=np.uint64
        )
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(40)).astype(np.float64) / 2.0**24 * 2.0 - 1.0
    return u.astype(np.float32)


def recipe_value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The golden value of one state-dict entry."""
    u = hash_uniform(key, int(np.prod(shape))).reshape(shape)
    if key.endswith(".weight") and len(shape) == 4:
        return (u * np.sqrt(6.0 / (shape[1] * shape[2] * shape[3]))).astype(np.float32)
    if key.endswith(".weight") and len(shape) == 2:
        return (u * np.sqrt(3.0 / shape[1])).astype(np.float32)
    if key.endswith("bn3.weight"):
        return (0.2 * u).astype(np.float32)
    if key.endswith(".weight"):
        return (1.0 + 0.2 * u).astype(np.float32)
    if key.endswith(".bias") or key.endswith(".running_mean"):
        return (0.1 * u).astype(np.float32)
    if key.endswith(".running_var"):
        return (1.0 + 0.3 * u).astype(np.float32)
    raise KeyError(key)


def manifest(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    with open(os.path.join(DATA, "manifest.json")) as f:
        return [(k, tuple(s)) for k, s in json.load(f)["state_dict_order"][arch]]


def recipe_state_dict(
    arch: str, num_classes: int = 1000, in_channels: int = 3
) -> dict[str, np.ndarray]:
    """The golden weights for `arch`, with a head of `num_classes` (same recipe)."""
    out = {}
    for key, shape in manifest(arch):
        if key.split(".")[0] in ("fc", "classifier"):
            shape = (num_classes,) + shape[1:]
        if key in ("conv1.weight", "features.conv0.weight"):
            shape = (shape[0], in_channels) + shape[2:]
        out[key] = recipe_value(key, shape)
    return out


def recipe_input(size: int, batch: int = 2, channels: int = 3) -> np.ndarray:
    """The golden NCHW input for `size`, transposed to NHWC."""
    x = hash_uniform(f"input{size}", batch * channels * size * size).reshape(
        batch, channels, size, size
    )
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def golden(arch: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, f"{arch}_golden.npz")) as data:
        return {k: data[k] for k in data.files}
