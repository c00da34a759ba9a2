"""ResNet50 in Flax NNX, layer for layer the same function as torchvision's `resnet50`.

Attribute names follow torchvision's `state_dict` keys (`layer1[0].conv1`,
`downsample[1]`, `fc`, ...) so the converter can walk key paths. The Grad-CAM target
(`CAM_TARGET`) is the output of `layer4`, the map that global average pooling consumes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.models import layers
from xmedjax.models.spec import ModelSpec

# Each bottleneck's output is computed once into its own buffer (`layers.materialised`).
# Left to itself XLA fuses the residual chain behind it (the BatchNorm apply and ReLU of
# every earlier block's last convolution) into each reader, forward and backward: with the
# boundary, ResNet50's eval step is ~7% faster and its train step ~3% (NOTES, "Phase 12").
# float32 and narrower only: in float64 (tests/test_multihost.py's exactness check) two
# processes of two devices and one of four then differed by a rounding after three steps,
# and float64 is not where speed is wanted.
MATERIALISE_BLOCK_OUTPUT = True


class Bottleneck(nnx.Module):
    """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
        out_ch = width * self.expansion
        self.conv1 = layers.conv(in_ch, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = layers.batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = layers.conv(width, width, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = layers.batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv3 = layers.conv(width, out_ch, 1, dtype=dtype, rngs=rngs)
        self.bn3 = layers.batch_norm(out_ch, dtype=dtype, rngs=rngs)
        if stride != 1 or in_ch != out_ch:
            self.downsample = nnx.List(
                [
                    layers.conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs),
                    layers.batch_norm(out_ch, dtype=dtype, rngs=rngs),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample[1](self.downsample[0](x))
        y = nnx.relu(out + identity)
        if MATERIALISE_BLOCK_OUTPUT and jnp.finfo(y.dtype).bits <= 32:
            return layers.materialised(y)
        return y


class ResNet(nnx.Module):
    """torchvision ResNet with Bottleneck blocks; `ResNet50` fixes the depths."""

    def __init__(
        self,
        stage_sizes: tuple[int, ...],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        base_width: int = 64,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.stage_sizes = tuple(stage_sizes)
        self.dtype = dtype
        self.conv1 = layers.conv(
            in_channels, base_width, 7, stride=2, padding=3, dtype=dtype, rngs=rngs
        )
        self.bn1 = layers.batch_norm(base_width, dtype=dtype, rngs=rngs)
        in_ch = base_width
        stage_widths = tuple(base_width * 2**i for i in range(len(stage_sizes)))
        for index, (blocks, width) in enumerate(zip(stage_sizes, stage_widths)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(
                    Bottleneck(in_ch, width, stride if block == 0 else 1, dtype=dtype, rngs=rngs)
                )
                in_ch = width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nnx.List(stage))
        self.num_features = in_ch
        self.fc = layers.linear(in_ch, num_classes, rngs=rngs)

    @property
    def spec(self) -> ModelSpec:
        """Target the last stage (layer4), earlier targets the stages deepest first, head fc."""
        body = tuple(f"layer{i + 1}" for i in range(len(self.stage_sizes)))
        return ModelSpec(
            cam_target=body[-1],
            cam_layers=body[-2::-1],
            stem=("conv1", "bn1"),
            stages=(*body, "fc"),
            head="fc",
        )

    def features(self, x: jax.Array) -> jax.Array:
        """NHWC images -> the layer4 feature map (the Grad-CAM target)."""
        x = x.astype(self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = layers.max_pool_3x3_s2(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        """NHWC images -> float32 logits."""
        return layers.classify(self, self.features(x), self.fc)


def ResNet50(**kwargs) -> ResNet:
    """torchvision `resnet50`: Bottleneck stages of 3, 4, 6 and 3 blocks."""
    return ResNet((3, 4, 6, 3), **kwargs)
