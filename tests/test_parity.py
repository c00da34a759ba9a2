"""The Flax models plus the converter reproduce torchvision on the parity goldens."""

from __future__ import annotations

import jax
import numpy as np
import parity
import pytest
from flax import nnx

from xmedjax.explain import forward_with_activation, grad_cam
from xmedjax.models import create_model, load_torchvision_weights
from xmedjax.models.convert import torch_layout

ARCHS = ("resnet50", "densenet121")
TOL = 1e-4


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request):
    arch = request.param
    model = create_model(arch, 1000)
    load_torchvision_weights(model, parity.recipe_state_dict(arch))
    model.eval()
    return arch, model, parity.golden(arch)


def test_every_torchvision_key_is_consumed_exactly_once(loaded):
    arch, model, _ = loaded
    layout = torch_layout(model)
    manifest = parity.manifest(arch)
    assert len(manifest) == len(dict(manifest))
    # the same keys, each exactly once, with torchvision's shapes
    assert {k: shape for k, (_, shape) in layout.items()} == dict(manifest)
    # and every model variable is the target of exactly one key
    targets = [id(var) for var, _ in layout.values()]
    assert len(targets) == len(set(targets))
    n_vars = len(nnx.to_flat_state(nnx.state(model)))
    assert n_vars == len(manifest)


@pytest.mark.parametrize("size", [64, 224])
def test_logits_features_and_gradcam_match_torchvision(loaded, size):
    arch, model, gold = loaded
    x = parity.recipe_input(size)
    graphdef, state = nnx.split(model)

    with jax.default_matmul_precision("highest"):
        logits, features = jax.jit(forward_with_activation, static_argnums=0)(graphdef, state, x)
        cam = grad_cam(model, x, gold[f"target_{size}"])
    assert rel_err(logits, gold[f"logits_{size}"]) < TOL
    # golden features are NCHW
    assert rel_err(np.transpose(features, (0, 3, 1, 2)), gold[f"features_{size}"]) < TOL
    assert rel_err(cam.raw, gold[f"cam_raw_{size}"]) < TOL
    np.testing.assert_array_equal(np.asarray(cam.targets), gold[f"target_{size}"])
    assert cam.maps.shape == (2, size, size)
    for i in range(2):
        corr = np.corrcoef(
            np.asarray(cam.maps[i]).ravel(), gold[f"cam_pytorch_grad_cam_{size}"][i].ravel()
        )[0, 1]
        assert corr > 0.99, (arch, size, i, corr)
