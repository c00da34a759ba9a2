"""The one capture mechanism every CAM method stands on.

Each model marks its Grad-CAM target with `sow` (an `nnx.Intermediate`) and `perturb` (a
zero `nnx.Perturbation`) under `CAM_TARGET`. Running the model inside `nnx.capture`
returns the activation; differentiating the target logits with respect to the
perturbation returns dScore/dActivation, without touching parameter gradients.

All functions here are pure functions of (graphdef, state, inputs), traceable under
`jax.jit`; the model always runs in eval mode (BatchNorm running statistics).
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


def eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    """Rebuilds the model from its split and puts it in eval mode."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _find(captured: nnx.State, name: str) -> jax.Array:
    for path, var in nnx.to_flat_state(captured):
        if path and path[-1] == name:
            value = var.get_value() if hasattr(var, "get_value") else var
            return value[0] if isinstance(value, tuple) else value
    raise KeyError(f"the model sowed no {name!r}: was it built by xmedjax.models.create_model?")


def forward_with_activation(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array):
    """Returns (float32 logits, float32 target activation) for a batch of NHWC images."""
    model = eval_model(graphdef, state)
    logits, captured = nnx.capture(model, nnx.Intermediate)(images)
    return logits.astype(jnp.float32), _find(captured, CAM_TARGET).astype(jnp.float32)


def select_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[b, targets[b]] for each image b."""
    return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=1)[:, 0]


def capture_target_gradients(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, targets: jax.Array | None
) -> tuple[TargetCapture, jax.Array]:
    """Forward plus the gradient of each image's target logit w.r.t. the CAM target.

    `targets` (B,) int, or None for each image's predicted class. Images in a batch are
    independent (eval mode), so summing the selected logits gives per-image gradients.
    Returns the capture and the targets used.
    """
    _, zeros = nnx.capture(eval_model(graphdef, state), nnx.Perturbation)(images)

    def target_score(perturbation):
        model = eval_model(graphdef, state)
        logits, captured = nnx.capture(model, nnx.Intermediate, init=perturbation)(images)
        logits = logits.astype(jnp.float32)
        chosen = jnp.argmax(logits, axis=-1) if targets is None else targets
        chosen = jax.lax.stop_gradient(chosen)
        return select_logits(logits, chosen).sum(), (logits, _find(captured, CAM_TARGET), chosen)

    grads, (logits, activation, chosen) = jax.grad(target_score, has_aux=True)(zeros)
    gradient = _find(grads, CAM_TARGET)
    return (
        TargetCapture(logits, activation.astype(jnp.float32), gradient.astype(jnp.float32)),
        chosen.astype(jnp.int32),
    )
