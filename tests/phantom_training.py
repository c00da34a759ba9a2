"""A narrow ResNet50 trained quickly on phantom arrays: shared by the saliency tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xmedjax.models import create_model


def unit_images(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W) -> float32 (n, H, W, 1) in [0, 1]."""
    return images[..., None].astype(np.float32) / 255.0


def train_phantom_model(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 400,
    seed: int = 0,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
):
    """Adam steps of ResNet50 (width 0.125, 1 channel, 2 classes) on unit-scaled uint8
    phantoms; returns (graphdef, state) in eval mode. ~45-50 s at 64 px on 2 cores (400
    steps; 200 take half that but leave Score-CAM's worst seed at 0.16 pointing game instead
    of 0.47: benchmarks/NOTES.md, "Phantom localisation")."""
    x = unit_images(images)
    model = create_model("resnet50", 2, in_channels=1, width=0.125, seed=seed)
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch_size)
        step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(labels[idx]))
    model.eval()
    return nnx.split(model)
