"""The one capture mechanism every CAM method stands on.

Each model marks its Grad-CAM target with `sow` (an `nnx.Intermediate`) and `perturb` (a
zero `nnx.Perturbation`) under `CAM_TARGET`. Running the model inside `nnx.capture`
returns the activation; differentiating the target logits with respect to the
perturbation returns dScore/dActivation, without touching parameter gradients.

All functions here are pure functions of (graphdef, state, inputs), traceable under
`jax.jit`; the model always runs in eval mode (BatchNorm running statistics).

`layer` (optional, a dotted attribute path such as "layer3" or "features.denseblock3")
targets an earlier feature map instead, the way pytorch-grad-cam's `target_layers` does:
the merged model's module at that path (the last block when it is a list of blocks) is
wrapped so that its output is sown and perturbed like the model's own target. Earlier
layers give finer maps (at 64 px ResNet50's layer4 is 2x2, layer3 4x4, layer2 8x8).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.models import CAM_TARGET


class TargetCapture(NamedTuple):
    """What one forward/backward pass yields: all float32, NHWC activations."""

    logits: jax.Array  # (B, K)
    activation: jax.Array  # (B, h, w, C)
    gradient: jax.Array  # (B, h, w, C): d logit[b, target[b]] / d activation[b]


LAYER_TARGET = "cam_layer_target"


def eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    """Rebuilds the model from its split and puts it in eval mode."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


class _Tap(nnx.Module):
    """Wraps a sub-module so that its output is sown and perturbed under LAYER_TARGET."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, LAYER_TARGET, out)
            out = self.perturb(LAYER_TARGET, out)
        return out


def tap_layer(model: nnx.Module, layer: str) -> None:
    """Wraps the sub-module at dotted path `layer` (its last block if it is a list) in place."""
    parent, key = None, None
    node = model
    for part in layer.split("."):
        parent, key = node, (int(part) if part.lstrip("-").isdigit() else part)
        node = node[key] if isinstance(key, int) else getattr(node, key, None)
        if node is None:
            raise ValueError(f"the model has no layer {layer!r}")
    if isinstance(node, (nnx.List, list, tuple)):
        parent, key = node, len(node) - 1
        node = node[key]
    if isinstance(key, int):
        parent[key] = _Tap(node)
    else:
        setattr(parent, key, _Tap(node))


def _model_and_name(
    graphdef: nnx.GraphDef, state: nnx.State, layer: str | None
) -> tuple[nnx.Module, str]:
    model = eval_model(graphdef, state)
    if layer is None:
        return model, CAM_TARGET
    tap_layer(model, layer)
    return model, LAYER_TARGET


def _find(captured: nnx.State, name: str) -> jax.Array:
    for path, var in nnx.to_flat_state(captured):
        if path and path[-1] == name:
            value = var.get_value() if hasattr(var, "get_value") else var
            return value[0] if isinstance(value, tuple) else value
    raise KeyError(f"the model sowed no {name!r}: was it built by xmedjax.models.create_model?")


def forward_with_activation(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, layer: str | None = None
):
    """Returns (float32 logits, float32 target activation) for a batch of NHWC images."""
    model, name = _model_and_name(graphdef, state, layer)
    logits, captured = nnx.capture(model, nnx.Intermediate)(images)
    return logits.astype(jnp.float32), _find(captured, name).astype(jnp.float32)


# One compiled forward shared by predictions, the random baseline and the label check.
forward_fn = jax.jit(forward_with_activation, static_argnums=(0, 3))


def choose_targets(logits: jax.Array, targets: jax.Array | None) -> jax.Array:
    """The class explained for each image: `targets` (B,), or each image's predicted class
    (the argmax of `logits`) when None; int32."""
    chosen = jnp.argmax(logits, axis=-1) if targets is None else jnp.asarray(targets)
    return chosen.astype(jnp.int32)


def logits_and_targets(graphdef, state, images, targets) -> tuple[jax.Array, jax.Array]:
    """The shared compiled forward's float32 logits, and `choose_targets` of them."""
    logits, _ = forward_fn(graphdef, state, images, None)
    return logits, choose_targets(logits, targets)


def select_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[b, targets[b]] for each image b."""
    return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=1)[:, 0]


def capture_target_gradients(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array | None,
    layer: str | None = None,
) -> tuple[TargetCapture, jax.Array]:
    """Forward plus the gradient of each image's target logit w.r.t. the CAM target.

    `targets` (B,) int, or None for each image's predicted class. Images in a batch are
    independent (eval mode), so summing the selected logits gives per-image gradients.
    `layer` optionally targets an earlier feature map (see the module docstring).
    Returns the capture and the targets used.
    """
    _, zeros = nnx.capture(_model_and_name(graphdef, state, layer)[0], nnx.Perturbation)(images)

    def target_score(perturbation):
        model, name = _model_and_name(graphdef, state, layer)
        logits, captured = nnx.capture(model, nnx.Intermediate, init=perturbation)(images)
        logits = logits.astype(jnp.float32)
        chosen = jax.lax.stop_gradient(choose_targets(logits, targets))
        return select_logits(logits, chosen).sum(), (logits, _find(captured, name), chosen)

    grads, (logits, activation, chosen) = jax.grad(target_score, has_aux=True)(zeros)
    gradient = _find(grads, CAM_TARGET if layer is None else LAYER_TARGET)
    return (
        TargetCapture(logits, activation.astype(jnp.float32), gradient.astype(jnp.float32)),
        chosen,
    )
