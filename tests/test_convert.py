"""The weight converter: formats, strictness, head re-initialisation, 1-channel stems."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from xmedjax.models import (
    WeightLoadError,
    create_model,
    export_torchvision_state_dict,
    load_torchvision_weights,
)
from xmedjax.models.convert import canonical_keys
from xmedjax.models.weights_io import load_weights, read_metadata

ARCH = "resnet50"


def _logits(model, x):
    model.eval()
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


@pytest.fixture(scope="module")
def recipe():
    return parity.recipe_state_dict(ARCH, num_classes=5)


@pytest.fixture(scope="module")
def reference_logits(recipe):
    model = load_torchvision_weights(create_model(ARCH, 5), recipe)
    return _logits(model, parity.recipe_input(32))


def test_safetensors_round_trip(tmp_path, recipe, reference_logits):
    from safetensors.numpy import save_file

    model = load_torchvision_weights(create_model(ARCH, 5), recipe)
    exported = export_torchvision_state_dict(model)
    assert set(exported) == set(recipe)
    for key, value in recipe.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    path = tmp_path / "w.safetensors"
    save_file(exported, str(path))
    again = load_torchvision_weights(create_model(ARCH, 5, seed=7), str(path))
    np.testing.assert_array_equal(_logits(again, parity.recipe_input(32)), reference_logits)


def test_pth_file(tmp_path, recipe, reference_logits):
    if os.environ.get("XMEDJAX_REQUIRE_TORCH") != "1":
        pytest.importorskip("torch")
    import torch

    state = {k: torch.from_numpy(v) for k, v in recipe.items()}
    state["bn1.num_batches_tracked"] = torch.tensor(3)
    path = tmp_path / "w.pth"
    torch.save(state, str(path))
    model = load_torchvision_weights(create_model(ARCH, 5, seed=3), str(path))
    np.testing.assert_array_equal(_logits(model, parity.recipe_input(32)), reference_logits)


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="needs PyTorch"):
        load_torchvision_weights(create_model(ARCH, 5), str(path))


def test_strict_mismatch_lists_every_problem(recipe):
    broken = dict(recipe)
    del broken["layer1.0.conv1.weight"]
    broken["layer9.weight"] = np.zeros(3, np.float32)
    broken["layer2.0.bn1.bias"] = np.zeros(7, np.float32)
    with pytest.raises(WeightLoadError) as err:
        load_torchvision_weights(create_model(ARCH, 5), broken)
    msg = str(err.value)
    assert "missing: layer1.0.conv1.weight" in msg
    assert "unexpected: layer9.weight" in msg
    assert "wrong shape: layer2.0.bn1.bias" in msg


def test_other_head_needs_reinit(caplog):
    imagenet = parity.recipe_state_dict(ARCH, num_classes=1000)
    with pytest.raises(WeightLoadError, match="head='reinit'"):
        load_torchvision_weights(create_model(ARCH, 3), imagenet)
    model = create_model(ARCH, 3, seed=1)
    fresh_fc = np.asarray(model.fc.kernel[...]).copy()
    load_torchvision_weights(model, imagenet, head="reinit")
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), fresh_fc)
    np.testing.assert_array_equal(
        np.asarray(model.conv1.kernel[...]), imagenet["conv1.weight"].transpose(2, 3, 1, 0)
    )


def test_legacy_densenet_keys_are_renamed():
    legacy = {
        "features.denseblock1.denselayer1.norm.1.weight": 1,
        "features.denseblock1.denselayer1.conv.2.weight": 2,
        "module.features.norm5.running_var": 3,
        "features.norm5.num_batches_tracked": 4,
    }
    assert canonical_keys(legacy) == {
        "features.denseblock1.denselayer1.norm1.weight": 1,
        "features.denseblock1.denselayer1.conv2.weight": 2,
        "features.norm5.running_var": 3,
    }


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_one_channel_model_from_three_channel_checkpoint(arch):
    rgb = create_model(arch, 4, width=0.25, seed=2)  # a small model keeps the test fast
    weights = export_torchvision_state_dict(rgb)
    grey = load_torchvision_weights(create_model(arch, 4, in_channels=1, width=0.25), weights)
    image = np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 1)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        want = _logits(rgb, np.repeat(image, 3, axis=-1))
        got = _logits(grey, image)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_convert_cli_writes_a_checkpoint_configs_can_load(tmp_path, recipe, reference_logits):
    from safetensors.numpy import save_file

    src = tmp_path / "w.safetensors"
    save_file(recipe, str(src))
    out = tmp_path / "converted"
    cmd = [
        sys.executable,
        "-m",
        "xmedjax.convert",
        f"--arch={ARCH}",
        f"--src={src}",
        f"--out={out}",
        "--num_classes=5",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert read_metadata(str(out))["num_classes"] == 5
    model = load_weights(create_model(ARCH, 5, seed=9), str(out))
    np.testing.assert_array_equal(_logits(model, parity.recipe_input(32)), reference_logits)


def test_bfloat16_compute_keeps_float32_params():
    model = create_model(ARCH, 2, dtype=jnp.bfloat16, width=0.125)
    assert model.conv1.kernel[...].dtype == jnp.float32
    out = _logits(model, np.ones((1, 32, 32, 3), np.float32))
    assert out.dtype == np.float32 and np.isfinite(out).all()
