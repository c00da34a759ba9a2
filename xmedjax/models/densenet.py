"""DenseNet121 in Flax NNX, layer for layer the same function as torchvision's `densenet121`.

Attribute names follow torchvision's `state_dict` keys (`features.denseblock1.denselayer1
.norm1`, `features.transition1.conv`, `classifier`, ...). The Grad-CAM target
(`CAM_TARGET`) is `relu(norm5(...))`, the map that global average pooling consumes
(torchvision applies that ReLU in place inside `forward`; here it is an ordinary op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.models import batch_norm, layers
from xmedjax.models.spec import ModelSpec

# Each dense layer's BatchNorm takes the statistics of its concatenated input from the
# chunks it is made of, each chunk's computed once (in training; benchmarks/NOTES.md,
# "Phase 6"), instead of two more passes over the whole concatenation per layer.
CHUNK_STATS = True
# Each dense layer's input gradient (norm1's backward over the whole concatenation) is
# computed once into its own buffer, then split into its chunks. Left to itself XLA fuses
# it into every chunk's slice, one fusion per chunk summing the terms of all later layers:
# DenseNet121's train step is 1.7-2.8% faster this way (benchmarks/NOTES.md, "Phase 9").
MATERIALISE_INPUT_GRAD = True
# ... and each dense layer's BatchNorm reads the concatenation of its chunks' x - mean (each
# chunk's computed once, for its variance; `BatchNorm(..., centred=True)`), not the chunks
# themselves: the backward needs x - mean, which XLA otherwise wrote per layer over the
# whole concatenation (DenseNet121's train step 1.7% faster, benchmarks/NOTES.md "Phase 12").
CENTRED_CHUNKS = True


class DenseLayer(nnx.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, producing `growth_rate` new channels."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, *, dtype, rngs: nnx.Rngs):
        inner = bn_size * growth_rate
        self.norm1 = layers.batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.conv1 = layers.conv(in_ch, inner, 1, dtype=dtype, rngs=rngs)
        self.norm2 = layers.batch_norm(inner, dtype=dtype, rngs=rngs)
        self.conv2 = layers.conv(inner, growth_rate, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, stats=None, centred: bool = False) -> jax.Array:
        """`stats`: x's per-channel batch (mean, variance), if known (`DenseBlock`);
        `centred`: x is already the input minus that mean."""
        out = self.conv1(nnx.relu(self.norm1(x, stats=stats, centred=centred)))
        return self.conv2(nnx.relu(self.norm2(out)))


class DenseBlock(nnx.Module):
    """`num_layers` dense layers, each seeing the concatenation of all before it."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int, *, dtype, rngs):
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = DenseLayer(
                in_ch + i * growth_rate, growth_rate, bn_size, dtype=dtype, rngs=rngs
            )
            setattr(self, f"denselayer{i + 1}", layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = [x]
        # Only float32 training uses batch statistics passed in (`batch_norm.BatchNorm`); in
        # evaluation they would be traced for nothing (XLA then drops them).
        per_chunk = (
            CHUNK_STATS
            and not self.denselayer1.norm1.use_running_average
            and x.dtype == jnp.float32
        )
        centred = per_chunk and CENTRED_CHUNKS
        chunk_stats = [] if per_chunk else None
        inputs = [] if centred else features  # what each layer's BatchNorm reads, by chunk

        def add_chunk(chunk):
            if centred:
                mean, var, chunk_centred = batch_norm.centred_batch_stats(chunk)
                chunk_stats.append((mean, var))
                inputs.append(chunk_centred)
            elif per_chunk:
                chunk_stats.append(batch_norm.batch_stats(chunk))

        add_chunk(x)
        for i in range(self.num_layers):
            layer = getattr(self, f"denselayer{i + 1}")
            stats = _joined(chunk_stats)
            joined = jnp.concatenate(inputs, axis=-1)
            if MATERIALISE_INPUT_GRAD:
                joined = layers.materialised_grad(joined)
            features.append(layer(joined, stats, centred=centred))
            add_chunk(features[-1])
        return jnp.concatenate(features, axis=-1)


def _joined(chunk_stats):
    """Per-chunk (mean, variance) pairs -> the concatenation's (a BatchNorm's statistics are
    per channel, so each chunk's are computed once, when it is made, not once per layer)."""
    if chunk_stats is None:
        return None
    means, variances = zip(*chunk_stats)
    return jnp.concatenate(means), jnp.concatenate(variances)


class Transition(nnx.Module):
    """BN-ReLU-Conv1x1 halving the channels, then 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
        self.norm = layers.batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.conv = layers.conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.avg_pool_2x2(self.conv(nnx.relu(self.norm(x))))


class Features(nnx.Module):
    """torchvision's `densenet.features`: stem, dense blocks, transitions, `norm5`."""

    def __init__(
        self, block_config, growth_rate, bn_size, init_features, in_channels, *, dtype, rngs
    ):
        self.conv0 = layers.conv(
            in_channels, init_features, 7, stride=2, padding=3, dtype=dtype, rngs=rngs
        )
        self.norm0 = layers.batch_norm(init_features, dtype=dtype, rngs=rngs)
        channels = init_features
        self.num_blocks = len(block_config)
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, dtype=dtype, rngs=rngs)
            setattr(self, f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                setattr(
                    self,
                    f"transition{i + 1}",
                    Transition(channels, channels // 2, dtype=dtype, rngs=rngs),
                )
                channels //= 2
        self.norm5 = layers.batch_norm(channels, dtype=dtype, rngs=rngs)
        self.num_features = channels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm0(self.conv0(x)))
        x = layers.max_pool_3x3_s2(x)
        for i in range(self.num_blocks):
            x = getattr(self, f"denseblock{i + 1}")(x)
            if i != self.num_blocks - 1:
                x = getattr(self, f"transition{i + 1}")(x)
        return self.norm5(x)


class DenseNet(nnx.Module):
    """torchvision DenseNet-BC; `DenseNet121` fixes growth 32, bn_size 4, blocks 6-12-24-16."""

    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        *,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_features: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.features = Features(
            block_config, growth_rate, bn_size, init_features, in_channels, dtype=dtype, rngs=rngs
        )
        self.num_features = self.features.num_features
        self.classifier = layers.linear(self.num_features, num_classes, rngs=rngs)
        # torchvision sets the classifier bias to zero.
        self.classifier.bias[...] = jnp.zeros_like(self.classifier.bias[...])

    @property
    def spec(self) -> ModelSpec:
        """Target relu(features), earlier targets the dense blocks deepest first, head classifier."""
        body = []
        for i in range(1, self.features.num_blocks + 1):
            body.append(f"features.denseblock{i}")
            if i != self.features.num_blocks:
                body.append(f"features.transition{i}")
        return ModelSpec(
            cam_target="features",
            cam_layers=tuple(
                f"features.denseblock{i}" for i in range(self.features.num_blocks - 1, 0, -1)
            ),
            stem=("features.conv0", "features.norm0"),
            stages=(*body, "features.norm5", "classifier"),
            head="classifier",
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC images -> float32 logits."""
        fmap = nnx.relu(self.features(x.astype(self.dtype)))
        return layers.classify(self, fmap, self.classifier)


def DenseNet121(*, growth_rate: int = 32, init_features: int = 64, **kwargs) -> DenseNet:
    """torchvision `densenet121` (growth 32, bn_size 4, blocks 6-12-24-16)."""
    return DenseNet(
        (6, 12, 24, 16), growth_rate=growth_rate, bn_size=4, init_features=init_features, **kwargs
    )
