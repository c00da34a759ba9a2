"""Config validation: one-line errors naming the key, before anything compiles.

`validate(config)` compares a config with the schema of `configs/default.py` (no unknown
key, no missing key, the schema's types) and checks each value's range. It raises
`ConfigError`, whose message starts with the key: "config.optimizer.learning_rate must be
> 0, got -1". The choices come from `xmedjax.names`; nothing here imports JAX, Flax or
the models, so a bad config stops before they load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections

from configs import default as default_schema
from xmedjax.errors import ConfigError
from xmedjax.names import (
    ANNOTATION_FORMATS,
    ARCHS,
    BEST_METRICS,
    CLASS_WEIGHTINGS,
    DATASETS,
    DISTRIBUTED,
    DTYPES,
    HEADS,
    MODES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PHANTOM_KINDS,
    SALIENCY_METHODS,
    THRESHOLDS,
)

__all__ = [
    "ConfigError",
    "check_schema",
    "check_values",
    "default_config",
    "explain_methods",
    "validate",
]


def explain_methods() -> tuple[str, ...]:
    """Saliency methods a config may name (`xmedjax.names.SALIENCY_METHODS`)."""
    return SALIENCY_METHODS


def default_config() -> ml_collections.ConfigDict:
    """The schema: `configs/default.py`'s get_config()."""
    return default_schema.get_config()


def _flatten(d: Any, prefix: str = "config") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}.{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out[name] = value
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


# Keys whose value is a mapping of free keys (split name -> count).
_FREE_MAPPINGS = ("config.data.phantom_counts",)


def check_schema(config, schema=None) -> None:
    """Unknown or missing keys and type mismatches against the default schema."""
    schema = default_config() if schema is None else schema
    got, want = _flatten(config), _flatten(schema)

    def free(name):
        return any(name.startswith(m + ".") for m in _FREE_MAPPINGS)

    for name in got:
        if name not in want and not free(name):
            parent = name.rsplit(".", 1)[0]
            known = sorted(k.rsplit(".", 1)[1] for k in want if k.rsplit(".", 1)[0] == parent)
            raise ConfigError(
                f"{name} is not a known key (known under {parent}: {', '.join(known)})"
            )
    for name in want:
        if name not in got and not free(name):
            raise ConfigError(f"{name} is missing (start the config from configs/default.py)")
    for name, default in want.items():
        if free(name):
            continue
        value = got[name]
        if isinstance(default, (ml_collections.ConfigDict, dict)):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{name} must be a mapping, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        elif isinstance(default, (tuple, list)):
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"{name} must be a list, got {value!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(c, key: str, choices: tuple) -> None:
    value = _get(c, key)
    _require(
        value in choices,
        f"config.{key} must be one of {', '.join(map(str, choices))}; got {value!r}",
    )


def _get(c, key: str):
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def _cmp(c, key: str, test: Callable[[Any], bool], what: str) -> None:
    value = _get(c, key)
    _require(test(value), f"config.{key} must be {what}, got {value!r}")


def _check_model(c) -> None:
    _choice(c, "model.arch", ARCHS)
    _cmp(c, "model.width", lambda v: 0 < v <= 4, "in (0, 4]")
    _choice(c, "model.dtype", DTYPES)


def _check_data(c) -> None:
    _choice(c, "data.dataset", DATASETS)
    _choice(c, "data.phantom_kind", PHANTOM_KINDS)
    _choice(c, "data.normalization", NORMALIZATIONS)
    _cmp(c, "data.image_size", lambda v: v >= 32, ">= 32 (ResNet/DenseNet downsample 32x)")
    _cmp(c, "data.channels", lambda v: v in (1, 3), "1 or 3")
    _cmp(c, "data.worker_count", lambda v: v >= 0, ">= 0")
    _cmp(c, "data.phantom_seed", lambda v: v >= 0, ">= 0")
    if c.data.dataset == "prepared":
        _require(
            bool(c.data.data_dir),
            "config.data.data_dir must name a prepared dataset when "
            "config.data.dataset is 'prepared' (make one with python -m data_prep.build "
            "--dataset=... --src=RAW --out=DIR), or set config.data.dataset=phantoms",
        )
    else:
        _check_phantom_counts(c)
    for key in ("train_split", "val_split", "test_split"):
        _cmp(c, f"data.{key}", lambda v: bool(v), "a split name")


def _check_phantom_counts(c) -> None:
    counts = dict(c.data.phantom_counts)
    for split in (c.data.train_split, c.data.val_split, c.data.test_split):
        _require(
            split in counts,
            f"config.data.phantom_counts must give a count for split {split!r}, got {counts}",
        )
    for split, n in counts.items():
        _require(
            isinstance(n, int) and not isinstance(n, bool) and n > 0,
            f"config.data.phantom_counts.{split} must be a positive integer, got {n!r}",
        )
    _require(
        counts[c.data.train_split] >= c.training.batch_size,
        f"config.data.phantom_counts.{c.data.train_split} must be >= "
        f"config.training.batch_size ({c.training.batch_size}), got {counts[c.data.train_split]}",
    )


def _check_augment(c) -> None:
    for key in ("rotation_range", "zoom_range"):
        _cmp(c, f"augment.{key}", lambda v: v >= 0, ">= 0")
    for key in ("width_shift_range", "height_shift_range"):
        _cmp(c, f"augment.{key}", lambda v: 0 <= v < 1, "in [0, 1)")
    _cmp(c, "augment.zoom_range", lambda v: v < 1, "< 1")
    for key in ("blur_sigma", "gamma_range", "brightness_range", "noise_std"):
        _cmp(c, f"augment.{key}", lambda v: v >= 0, ">= 0")
    for key in ("resolution_range", "contrast_range"):
        _cmp(c, f"augment.{key}", lambda v: 0 <= v < 1, "in [0, 1)")
    for key in ("lesion_erase_prob", "lesion_paste_prob"):
        _cmp(c, f"augment.{key}", lambda v: 0 <= v <= 1, "in [0, 1]")
    mixing = c.augment.lesion_erase_prob > 0 or c.augment.lesion_paste_prob > 0
    _require(
        not mixing or bool(c.augment.lesion_negative_class),
        "config.augment.lesion_negative_class must name the lesion-free class (e.g. notumor) "
        "when augment.lesion_erase_prob or lesion_paste_prob is > 0",
    )


def _check_optimizer(c) -> None:
    _choice(c, "optimizer.name", OPTIMIZERS)
    _cmp(c, "optimizer.learning_rate", lambda v: v > 0, "> 0")
    _cmp(c, "optimizer.weight_decay", lambda v: v >= 0, ">= 0")
    _cmp(c, "optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)")


def _check_training(c) -> None:
    t = "training"
    _cmp(c, f"{t}.batch_size", lambda v: v > 0, "> 0")
    _cmp(c, f"{t}.eval_batch_size", lambda v: v > 0, "> 0")
    _cmp(c, f"{t}.max_epochs", lambda v: v > 0, "> 0")
    _cmp(c, f"{t}.max_steps", lambda v: v >= 0, ">= 0 (0 = no cap)")
    _cmp(c, f"{t}.early_stopping_patience", lambda v: v >= 0, ">= 0 (0 = off)")
    _cmp(c, f"{t}.early_stopping_min_delta", lambda v: v >= 0, ">= 0")
    _cmp(c, f"{t}.reduce_on_plateau_patience", lambda v: v >= 0, ">= 0 (0 = off)")
    _cmp(c, f"{t}.reduce_on_plateau_factor", lambda v: 0 < v < 1, "in (0, 1)")
    _cmp(c, f"{t}.min_learning_rate", lambda v: v >= 0, ">= 0")
    _choice(c, f"{t}.class_weighting", CLASS_WEIGHTINGS)
    _cmp(c, f"{t}.checkpoint_every_steps", lambda v: v > 0, "> 0")
    _choice(c, f"{t}.best_metric", BEST_METRICS)
    _cmp(c, f"{t}.log_every_steps", lambda v: v > 0, "> 0")
    _cmp(c, f"{t}.seed", lambda v: v >= 0, ">= 0")


def _check_init(c) -> None:
    _choice(c, "init.head", HEADS)
    if c.init.checkpoint and "://" not in c.init.checkpoint:
        _require(
            os.path.isdir(os.path.expanduser(c.init.checkpoint)),
            f"config.init.checkpoint must be a folder written by python -m xmedjax.convert, "
            f"got {c.init.checkpoint!r} (not found)",
        )


def _check_evaluate(c) -> None:
    _cmp(c, "evaluate.bootstrap_samples", lambda v: v >= 0, ">= 0 (0 = no intervals)")
    _choice(c, "evaluate.threshold", THRESHOLDS)


def _check_explain(c) -> None:
    _cmp(c, "explain.methods", lambda v: len(v) > 0, "a non-empty list")
    known = explain_methods()
    for method in tuple(c.explain.methods) + tuple(c.explain.quality_methods):
        _require(
            method in known,
            f"config.explain.methods: unknown method {method!r}; choose from {', '.join(known)}",
        )
    _cmp(c, "explain.batch_size", lambda v: v > 0, "> 0")
    _cmp(c, "explain.quality_images", lambda v: v > 0, "> 0")
    _cmp(c, "explain.split", lambda v: bool(v), "a split name")


def _check_predict(c) -> None:
    """The folder of predict mode (or explain mode with a folder) and its annotations."""
    if c.mode == "predict":
        _require(
            bool(c.predict.folder),
            "config.predict.folder must name a folder of images in predict mode",
        )
    if c.mode in ("predict", "explain") and c.predict.folder:
        _require(
            os.path.isdir(os.path.expanduser(c.predict.folder)),
            f"config.predict.folder must be an existing folder, got {c.predict.folder!r}",
        )
    _choice(c, "predict.annotation_format", ANNOTATION_FORMATS)
    _cmp(c, "predict.positive_class", lambda v: v >= -1, ">= -1 (-1 = the last class)")
    if not c.predict.annotations:
        _require(  # it would be ignored without a word: it only adds annotated scores
            not (
                c.mode in ("predict", "explain") and c.predict.folder and c.predict.negative_class
            ),
            "config.predict.negative_class needs config.predict.annotations (it adds the "
            "'any lesion' scores of an annotated folder)",
        )
        return
    _require(
        bool(c.predict.folder),
        "config.predict.annotations needs config.predict.folder (the annotated images)",
    )
    path = os.path.expanduser(c.predict.annotations)
    _require(
        os.path.exists(path),
        f"config.predict.annotations must be an existing file or folder, got "
        f"{c.predict.annotations!r}",
    )
    fmt = c.predict.annotation_format
    if fmt in ("via", "coco"):
        _require(
            os.path.isfile(path),
            f"config.predict.annotations must be a JSON file for annotation_format={fmt}, "
            f"got {c.predict.annotations!r}",
        )
    if fmt in ("yolo", "masks"):
        _require(
            os.path.isdir(path),
            f"config.predict.annotations must be a folder for annotation_format={fmt}, "
            f"got {c.predict.annotations!r}",
        )


def _check_runtime(c) -> None:
    _choice(c, "runtime.distributed", DISTRIBUTED)
    _cmp(c, "runtime.num_processes", lambda v: v >= 0, ">= 0")
    _cmp(c, "runtime.process_id", lambda v: v >= -1, ">= -1")


# One checker per config section, run in this order (the first problem is the one reported).
_SECTION_CHECKS = (
    _check_model,
    _check_data,
    _check_augment,
    _check_optimizer,
    _check_training,
    _check_init,
    _check_evaluate,
    _check_explain,
    _check_predict,
    _check_runtime,
)


def check_values(c) -> None:
    """Ranges and choices of every value; cross-key rules (one checker per config section)."""
    _choice(c, "mode", MODES)
    for check in _SECTION_CHECKS:
        check(c)


def validate(config) -> ml_collections.ConfigDict:
    """Schema and value checks; returns the config unchanged, or raises ConfigError."""
    if config is None:
        raise ConfigError("config is missing: pass --config=configs/NAME.py")
    check_schema(config)
    check_values(config)
    return config
