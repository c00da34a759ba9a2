"""The CAM family matches pytorch-grad-cam 1.5.7 on the torchvision parity weights.

tests/data/pgc_reference.npz was made by tests/data/make_pgc_reference.py (torch 2.14.1,
torchvision 0.29.1, grad-cam 1.5.7, CPU); pytorch-grad-cam min-max scales and resizes with
OpenCV, so the check is a per-image correlation above 0.99, not equality.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from xmedjax.explain.cams import GRADIENT_RULES, scorecam_fn
from xmedjax.explain.capture import capture_target_gradients
from xmedjax.explain.maps import to_input_size
from xmedjax.models import create_model, load_torchvision_weights

REFERENCE = os.path.join(parity.DATA, "pgc_reference.npz")
ARCHS = ("resnet50", "densenet121")
MIN_CORR = 0.99


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=ARCHS)
def parity_model(request):
    arch = request.param
    model = create_model(arch, 1000)
    load_torchvision_weights(model, parity.recipe_state_dict(arch))
    model.eval()
    graphdef, state = nnx.split(model)
    return arch, graphdef, state


def correlations(got, want) -> list[float]:
    got, want = np.asarray(got), np.asarray(want)
    return [float(np.corrcoef(g.ravel(), w.ravel())[0, 1]) for g, w in zip(got, want)]


@pytest.mark.parametrize("size", [64, 128])
def test_gradient_cams_match_pytorch_grad_cam(parity_model, reference, size):
    arch, graphdef, state = parity_model
    x = jnp.asarray(parity.recipe_input(size))
    targets = jnp.asarray(reference[f"{arch}_target_{size}"])
    with jax.default_matmul_precision("highest"):
        capture, chosen = jax.jit(capture_target_gradients, static_argnums=0)(
            graphdef, state, x, targets
        )
    np.testing.assert_array_equal(np.asarray(chosen), reference[f"{arch}_target_{size}"])
    for name in ("gradcampp", "hirescam", "layercam", "xgradcam"):
        maps = to_input_size(
            GRADIENT_RULES[name](capture.activation, capture.gradient), (size, size)
        )
        corr = correlations(maps, reference[f"{arch}_{name}_{size}"])
        assert min(corr) > MIN_CORR, (arch, name, size, corr)


@pytest.mark.slow
def test_scorecam_matches_pytorch_grad_cam(parity_model, reference):
    arch, graphdef, state = parity_model
    # One image by default (1024 masked DenseNet121 passes, 2048 ResNet50 passes); both
    # images with XMEDJAX_SLOW_TESTS=1 (~3.5 min for ResNet50 on 2 CPU cores).
    n = 2 if os.environ.get("XMEDJAX_SLOW_TESTS") else 1
    x = jnp.asarray(parity.recipe_input(64))[:n]
    targets = jnp.asarray(reference[f"{arch}_target_64"])[:n]
    with jax.default_matmul_precision("highest"):
        result = scorecam_fn(graphdef, state, x, targets, chunk=128)
    corr = correlations(result.maps, reference[f"{arch}_scorecam_64"][:n])
    assert min(corr) > MIN_CORR, (arch, corr)
