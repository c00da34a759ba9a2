"""torchvision-exact ResNet50 and DenseNet121 in Flax NNX, and their weight converter.

    model = create_model("densenet121", num_classes=2, in_channels=1)
    load_torchvision_weights(model, "densenet121.safetensors", head="reinit")
    model.eval()
    logits = model(images)  # float32 NHWC -> (B, num_classes) float32

Both models sow their Grad-CAM target activation under `CAM_TARGET` ("cam_target"):
the feature map that global average pooling consumes. Each declares its layers for the
explain code (CAM targets, stages, head) as a `ModelSpec`: `model_spec(model)` or
`model_spec(graphdef, state)`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from xmedjax.models.convert import (
    WeightLoadError,
    export_torchvision_state_dict,
    load_torchvision_weights,
    read_state_dict,
)
from xmedjax.models.densenet import DenseNet, DenseNet121
from xmedjax.models.layers import CAM_TARGET
from xmedjax.models.resnet import ResNet, ResNet50
from xmedjax.models.spec import ModelSpec

# Keys: xmedjax.names.ARCHS (tests/test_configs.py checks they agree).
ARCHITECTURES = {"resnet50": ResNet50, "densenet121": DenseNet121}

__all__ = [
    "ARCHITECTURES",
    "CAM_TARGET",
    "DenseNet",
    "ModelSpec",
    "ResNet",
    "WeightLoadError",
    "create_model",
    "export_torchvision_state_dict",
    "load_torchvision_weights",
    "model_spec",
    "read_state_dict",
]

_RAISE = object()


def model_spec(
    model: nnx.Module | nnx.GraphDef, state: nnx.State | None = None, default=_RAISE
) -> ModelSpec:
    """The `ModelSpec` a model declares (its `spec` property), from the model or its split.

    `model_spec(model)` or `model_spec(graphdef, state)` (abstract states from
    `nnx.eval_shape` work too). A model that declares none raises ValueError, or returns
    `default` when one is given.
    """
    if isinstance(model, nnx.GraphDef):
        if state is None:
            raise TypeError("model_spec(graphdef) needs the state: model_spec(graphdef, state)")
        model = nnx.merge(model, state)
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    if default is not _RAISE:
        return default
    raise ValueError(
        f"{type(model).__name__} declares no ModelSpec (a `spec` property); the models of "
        "xmedjax.models.create_model do"
    )


def create_model(
    arch: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    dtype=jnp.float32,
    seed: int = 0,
    width: float = 1.0,
) -> nnx.Module:
    """Builds a freshly initialised model in train mode.

    Args:
      arch: "resnet50" or "densenet121".
      num_classes: size of the classifier head.
      in_channels: 1 (greyscale) or 3.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits float32.
      seed: initialisation seed.
      width: channel-width factor; 1.0 is the torchvision model (the only setting
        ImageNet weights fit), smaller values give fast models for CPU demos and tests.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 < width <= 4:
        raise ValueError(f"width must be in (0, 4], got {width}")
    if arch == "resnet50":
        sizing = {"base_width": max(1, round(64 * width))}
    else:
        sizing = {
            "growth_rate": max(1, round(32 * width)),
            "init_features": max(1, round(64 * width)),
        }
    return ARCHITECTURES[arch](
        num_classes=int(num_classes),
        in_channels=in_channels,
        dtype=jnp.dtype(dtype),
        rngs=nnx.Rngs(seed),
        **sizing,
    )
