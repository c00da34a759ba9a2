"""Grain input pipelines over prepared datasets (see ``data_prep.dataset_format``).

Train: an endless, per-epoch reshuffled stream of per-process batches (drop remainder),
deterministic for a seed whatever the worker count (each example's augmentation draws
from a generator seeded by (seed, global position)), checkpointable through the
returned iterator's ``get_state()`` / ``set_state()``.

Eval: a fixed order, every example exactly once; the last global batch is padded and
carries ``valid=False`` and ``index=-1`` on padding.

Batches are dicts of numpy arrays: ``image`` float32 (b, H, W, C), ``label`` int32 (b,),
``mask`` float32 (b, H, W) and ``mask_known`` bool (b,) when the dataset has masks
(``mask_known`` False: the image is not annotated, its all-zero mask is unknown, not a
negative; datasets written before the flag existed read as all known); eval adds
``valid``, ``index``, ``id``. ``b = global_batch_size // shard_count``; process ``p`` gets rows
``[p * b, (p + 1) * b)`` of each global batch. ``to_global_array`` turns a batch into
global ``jax.Array``s sharded along the data axis of a mesh.

Every image, prepared or a user's file, goes through one ``Preprocess(image_size,
channels, normalization)`` (``Preprocess.from_config(config)`` in the modes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from data_prep.dataset_format import (  # noqa: F401 (the format's names, re-exported)
    INFO_FILE,
    DatasetError,
    DatasetInfo,
    PreparedSource,
    check_split,
    read_dataset_info,
    split_class_counts,
)
from xmedjax import augment as augment_lib
from xmedjax import intensity as intensity_lib
from xmedjax import lesion_mix
from xmedjax.errors import ConfigError
from xmedjax.names import NORMALIZATIONS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------- checks
def check_trainable(data_dir: str, train_split: str) -> None:
    """A ConfigError naming ``config.data.data_dir`` unless ``train_split`` holds two classes
    or more: a one-class dataset "trains" to loss 0 and accuracy 1, which means nothing.

    Cheap for datasets built with per-class counts in their info file; older ones are counted.
    """
    info = read_dataset_info(data_dir)
    check_split(info, data_dir, train_split)
    counts = split_class_counts(data_dir, train_split)
    present = {info.label_names[c]: n for c, n in enumerate(counts) if n > 0}
    if info.num_classes >= 2 and len(present) >= 2:
        return
    found = ", ".join(f"{k!r} ({n} examples)" for k, n in present.items()) or "no example"
    raise ConfigError(
        f"config.data.data_dir={data_dir}: split {train_split!r} holds one class only "
        f"({found}; the dataset's classes: {list(info.label_names)}); a classifier needs two "
        "or more: add the missing class's images and rebuild with python -m data_prep.build"
    )


# ----------------------------------------------------------------------------- preprocessing
@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes model input: resized (stretched) to `image_size` square,
    `channels` 1 or 3, normalised by `normalization` ("imagenet" or "unit", see `to_float`)."""

    image_size: int
    channels: int
    normalization: str

    def __post_init__(self):
        if int(self.image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        _norm_consts(self.normalization, self.channels)  # validates the normalisation

    @classmethod
    def from_config(cls, config) -> Preprocess:
        """From `config.data.{image_size, channels, normalization}`."""
        d = config.data
        return cls(int(d.image_size), int(d.channels), str(d.normalization))

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's model input shape (H, W, C)."""
        return (self.image_size, self.image_size, self.channels)


# ----------------------------------------------------------------------------- info
def num_examples(data_dir: str, split: str) -> int:
    """Number of examples of a split."""
    return check_split(read_dataset_info(data_dir), data_dir, split)


def steps_per_epoch(data_dir: str, split: str, global_batch_size: int) -> int:
    """Full global batches per epoch (the train iterator drops the remainder)."""
    return num_examples(data_dir, split) // global_batch_size


# ----------------------------------------------------------------------------- decode
def _norm_consts(normalization: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    if normalization == "imagenet":
        if channels == 1:
            return IMAGENET_MEAN.mean(keepdims=True), IMAGENET_STD.mean(keepdims=True)
        return IMAGENET_MEAN, IMAGENET_STD
    if normalization in ("unit", "per_image"):  # per_image: standardised after x / 255
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


_LUTS: dict[tuple[str, int], np.ndarray] = {}


def _lut(normalization: str, channels: int) -> np.ndarray:
    """(256, channels) float32 table: uint8 value -> normalised value per channel."""
    key = (normalization, channels)
    if key not in _LUTS:
        mean, std = _norm_consts(normalization, channels)
        v = np.arange(256, dtype=np.float64)[:, None] / 255.0
        _LUTS[key] = ((v - mean) / std).astype(np.float32)
    return _LUTS[key]


def to_float(pixels: np.ndarray, channels: int, normalization: str) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> float32 (H, W, channels), normalised.

    Greyscale is replicated to 3 channels when channels=3; RGB is averaged when channels=1.
    ``imagenet``: x / 255, then ImageNet mean/std per channel (their averages for grey);
    ``unit``: x / 255; ``per_image``: x / 255, then minus the image's own mean, divided by
    its own standard deviation (over all pixels and channels): the image's overall
    brightness and contrast, which differ between scanners and sources, are removed.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    lut = _lut(normalization, channels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        x = np.take(lut, pixels, axis=0)  # (H, W, channels) in one gather
    elif channels == 3:
        x = np.stack([np.take(lut[:, c], pixels[..., c]) for c in range(3)], axis=-1)
    else:
        mean, std = _norm_consts(normalization, 1)
        x = (pixels.astype(np.float32).mean(-1, keepdims=True) * (1.0 / 255.0) - mean) / std
    return standardise(x) if normalization == "per_image" else x


def standardise(x: np.ndarray) -> np.ndarray:
    """(x - mean(x)) / std(x) over the whole image; a constant image becomes all zeros."""
    x = x - x.mean(dtype=np.float64)
    return (x / max(float(x.std(dtype=np.float64)), 1e-6)).astype(np.float32)


def unit_to_float(x: np.ndarray, channels: int, normalization: str) -> np.ndarray:
    """float pixels in [0, 1], (H, W) or (H, W, 3) -> float32 (H, W, channels), normalised as
    `to_float` normalises x / 255 (the path of intensity-augmented training images)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[2] != channels:
        x = np.repeat(x, 3, axis=2) if channels == 3 else x.mean(-1, keepdims=True)
    mean, std = _norm_consts(normalization, channels)
    x = (x - mean) / std
    return standardise(x) if normalization == "per_image" else x.astype(np.float32)


def _decode_png(data: bytes) -> np.ndarray:
    import io

    import PIL.Image

    img = PIL.Image.open(io.BytesIO(data))
    a = np.asarray(img)
    return a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a


@dataclasses.dataclass
class _Decoder:
    """Record -> example dict (decode, resize/augment, normalise)."""

    preprocess: Preprocess
    has_masks: bool
    augment: augment_lib.AugmentParams | None = None
    intensity: intensity_lib.IntensityParams | None = None
    mix: lesion_mix.LesionMixParams | None = None

    def __call__(
        self,
        rec: Mapping[str, Any],
        rng: np.random.Generator | None,
        donor: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        image = _decode_png(rec["image"])
        label = int(rec["label"])
        arrays = [image]
        if self.has_masks:
            arrays.append(_decode_png(rec["mask"]).astype(np.float32) * (1.0 / 255.0))
        if self.mix is not None and rng is not None and self.has_masks:
            arrays, label = self._mix(arrays, label, rec, rng, donor)
        size = self.preprocess.image_size
        transform = None
        if self.augment is not None and rng is not None:
            transform = augment_lib.sample_transform(rng, self.augment, size)
        arrays = augment_lib.warp(arrays, transform, size)
        p = self.preprocess
        if self.intensity is not None and rng is not None:
            x = intensity_lib.augment(arrays[0] * np.float32(1 / 255), rng, self.intensity)
            image = unit_to_float(x, p.channels, p.normalization)
        else:
            image = to_float(arrays[0], p.channels, p.normalization)
        out = {"image": image, "label": np.int32(label)}
        if self.has_masks:
            out["mask"] = np.clip(arrays[1].astype(np.float32), 0.0, 1.0)
            out["mask_known"] = np.bool_(rec["mask_known"] if "mask_known" in rec else True)
        return out

    def _mix(self, arrays, label, rec, rng, donor) -> tuple[list[np.ndarray], int]:
        """`lesion_mix`: a donor (chosen by the train element) is pasted; a lesion image is
        erased with probability erase_prob."""
        image, mask = arrays
        if donor is not None:
            pasted = lesion_mix.paste(
                image, _decode_png(donor["image"]), _decode_png(donor["mask"]) / 255.0, rng
            )
            if pasted is not None:
                return list(pasted), int(donor["label"])
            return arrays, label
        known = bool(rec["mask_known"]) if "mask_known" in rec else True
        if label != self.mix.negative_class and known and mask.max() > 0.5:
            if rng.random() < self.mix.erase_prob:
                erased = lesion_mix.erase(image, mask, rng)
                return [erased, np.zeros_like(mask)], self.mix.negative_class
        return arrays, label


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    return shard_index, shard_count


def _per_process(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple "
            f"of the process count {shard_count}"
        )
    return global_batch_size // shard_count


# ----------------------------------------------------------------------------- train
class _TrainElement:
    """Per-process position -> augmented example (picklable, for Grain workers)."""

    def __init__(
        self,
        source: PreparedSource,
        decoder: _Decoder,
        seed: int,
        global_batch: int,
        per_process: int,
        shard_index: int,
        epoch_len: int,
    ):
        self.source, self.decoder, self.seed = source, decoder, seed
        self.global_batch, self.per_process, self.shard_index = (
            global_batch,
            per_process,
            shard_index,
        )
        self.epoch_len = epoch_len  # examples used per epoch (full global batches)
        self._perms: dict[int, np.ndarray] = {}
        self.donors = np.zeros(0, np.int64)  # lesion_mix: the records that lend lesions

    def _permutation(self, epoch: int) -> np.ndarray:
        # Read threads share this cache; a permutation is a pure function of (seed, epoch),
        # so a race only recomputes it, never mixes epochs.
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(len(self.source))
            self._perms[epoch] = perm
            for old in [e for e in list(self._perms) if e < epoch - 2]:
                self._perms.pop(old, None)
        return perm

    def __call__(self, position: int, _: Any) -> dict[str, Any]:
        step, j = divmod(position, self.per_process)
        g = step * self.global_batch + self.shard_index * self.per_process + j
        epoch, k = divmod(g, self.epoch_len)
        index = int(self._permutation(epoch)[k])
        rng = np.random.default_rng([self.seed, epoch, index])
        rec, donor, mix = self.source[index], None, self.decoder.mix
        if mix is not None and len(self.donors) and int(rec["label"]) == mix.negative_class:
            if rng.random() < mix.paste_prob:
                donor = self.source[int(self.donors[rng.integers(len(self.donors))])]
        return self.decoder(rec, rng, donor)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_perms"] = {}
        return d


def make_train_iterator(
    data_dir: str,
    split: str,
    *,
    global_batch_size: int,
    preprocess: Preprocess,
    augment: Mapping[str, Any] | None = None,
    seed: int = 0,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_buffer_size: int = 2,
    read_threads: int | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of per-process train batches (see the module docstring).

    ``augment``: a mapping with the geometric keys rotation_range, width_shift_range,
    height_shift_range, zoom_range, horizontal_flip (`xmedjax.augment`), the intensity
    keys of `xmedjax.intensity` and the counterfactual-lesion keys of `xmedjax.lesion_mix`
    (None, empty or all zero: no augmentation). The returned
    ``grain.DatasetIterator`` supports ``get_state()`` / ``set_state()``.
    ``read_threads``: decode threads per process (default: min(8, CPUs) without workers,
    2 per worker); PIL releases the GIL while decoding and warping.
    """
    source = PreparedSource(data_dir, split)
    shard_index, shard_count = _shard(shard_index, shard_count)
    b = _per_process(global_batch_size, shard_count)
    steps = len(source) // global_batch_size
    if steps == 0:
        raise ValueError(
            f"split {split!r} of {data_dir} holds {len(source)} examples, fewer "
            f"than one global batch of {global_batch_size}"
        )
    augment = dict(augment or {})
    known = (*augment_lib.AUGMENT_KEYS, *intensity_lib.INTENSITY_KEYS, *lesion_mix.MIX_KEYS)
    unknown = sorted(set(augment) - set(known))
    if unknown:
        raise ValueError(f"unknown augment key(s) {unknown}")
    decoder = _Decoder(
        preprocess,
        source.info.has_masks,
        augment_lib.AugmentParams.from_mapping(
            {k: v for k, v in augment.items() if k in augment_lib.AUGMENT_KEYS}
        ),
        intensity_lib.IntensityParams.from_mapping(augment),
        lesion_mix.LesionMixParams.from_mapping(augment, source.info.label_names),
    )
    if decoder.mix is not None and not source.info.has_masks:
        raise ValueError(
            f"augment.lesion_erase_prob/lesion_paste_prob need lesion masks; {data_dir} has "
            "none (build it with --annotations or --annotations_from)"
        )
    element = _TrainElement(
        source, decoder, seed, global_batch_size, b, shard_index, steps * global_batch_size
    )
    if decoder.mix is not None and decoder.mix.paste_prob > 0:
        element.donors = lesion_mix.donor_indices(source, decoder.mix.negative_class)
    ds = (
        grain.MapDataset.range(steps * b)
        .repeat(None)
        .map_with_index(element)
        .batch(b, drop_remainder=True)
    )
    if read_threads is None:
        read_threads = max(2, min(8, os.cpu_count() or 2)) if worker_count == 0 else 2
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * b)
    )
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(it_ds)


# ----------------------------------------------------------------------------- eval
class _EvalElement:
    """Per-process position -> example (padding -> example 0 with valid False)."""

    def __init__(
        self,
        source: PreparedSource,
        decoder: _Decoder,
        global_batch: int,
        per_process: int,
        shard_index: int,
    ):
        self.source, self.decoder = source, decoder
        self.global_batch, self.per_process, self.shard_index = (
            global_batch,
            per_process,
            shard_index,
        )

    def __call__(self, position: int, _: Any) -> dict[str, Any]:
        step, j = divmod(position, self.per_process)
        g = step * self.global_batch + self.shard_index * self.per_process + j
        valid = g < len(self.source)
        rec = self.source[g if valid else 0]
        out = self.decoder(rec, None)
        if not valid:
            out["label"] = np.int32(0)
            if "mask" in out:
                out["mask"] = np.zeros_like(out["mask"])
                out["mask_known"] = np.bool_(False)
        out["valid"] = np.bool_(valid)
        out["index"] = np.int64(g if valid else -1)
        out["id"] = np.str_(_text(rec["id"]) if valid else "")
        return out


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class EvalIterable:
    """Re-iterable eval batches; ``len()`` is the number of (per-process) batches."""

    def __init__(self, ds: grain.MapDataset, steps: int, num_examples: int):
        self._ds, self._steps, self.num_examples = ds, steps, num_examples

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        opts = grain.ReadOptions(
            num_threads=max(2, min(8, os.cpu_count() or 2)), prefetch_buffer_size=64
        )
        return iter(self._ds.to_iter_dataset(opts))


def make_eval_iterator(
    data_dir: str,
    split: str,
    *,
    global_batch_size: int,
    preprocess: Preprocess,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> EvalIterable:
    """Per-process eval batches in a fixed order, each example once, last batch padded."""
    source = PreparedSource(data_dir, split)
    shard_index, shard_count = _shard(shard_index, shard_count)
    b = _per_process(global_batch_size, shard_count)
    steps = max(1, math.ceil(len(source) / global_batch_size))
    decoder = _Decoder(preprocess, source.info.has_masks)
    element = _EvalElement(source, decoder, global_batch_size, b, shard_index)
    ds = grain.MapDataset.range(steps * b).map_with_index(element).batch(b)
    return EvalIterable(ds, steps, len(source))


# ----------------------------------------------------------------------------- random access
def load_examples(
    data_dir: str,
    split: str,
    indices,
    *,
    preprocess: Preprocess,
) -> dict[str, np.ndarray]:
    """Examples by position in the split, no augmentation: image, label, mask?, id."""
    source = PreparedSource(data_dir, split)
    decoder = _Decoder(preprocess, source.info.has_masks)
    rows = []
    ids = []
    for i in np.asarray(indices, dtype=np.int64).ravel():
        if not 0 <= i < len(source):
            raise IndexError(f"index {i} outside split {split!r} of size {len(source)}")
        rec = source[int(i)]
        rows.append(decoder(rec, None))
        ids.append(_text(rec["id"]))
    if not rows:
        raise ValueError("load_examples needs at least one index")
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out["id"] = np.array(ids)
    return out


# ----------------------------------------------------------------------------- devices
def to_global_array(batch: Mapping[str, Any], mesh, axis: str = "data") -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded along ``axis`` of ``mesh``.

    Non-numeric arrays (such as ``id`` strings) are left out.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(axis))
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "USO":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


# ----------------------------------------------------------------------------- user files
def list_image_files(folder: str) -> list[str]:
    """Image and DICOM files under a folder (recursive, sorted, hidden files skipped)."""
    from data_prep import image_io

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"not a folder: {folder}")
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and image_io.is_image_name(name):
                out.append(os.path.join(root, name))
    return out


def load_image_file(path: str, *, preprocess: Preprocess) -> np.ndarray:
    """One PNG/JPEG/DICOM file -> float32 (image_size, image_size, channels), normalised.

    DICOM: RescaleSlope/Intercept, then the VOI window (WindowCenter/Width) when present,
    MONOCHROME1 inverted.
    """
    from data_prep import image_io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    return preprocess_pixels(image_io.decode_file(path).pixels, preprocess=preprocess)


def preprocess_pixels(pixels: np.ndarray, *, preprocess: Preprocess) -> np.ndarray:
    """Decoded uint8 pixels (H, W) or (H, W, 3) -> float32 (image_size, image_size, channels):
    the whole image stretched to the square (PIL bilinear), then `to_float`."""
    resized = augment_lib.warp([pixels], None, preprocess.image_size)[0]
    return to_float(resized, preprocess.channels, preprocess.normalization)
