"""xmedjax/compile_options.py: forward-only programs compile with XLA's own convolutions on a
CPU (the eval step, Grad-CAM), the train step keeps YNNPACK's, nested calls stay legal."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmedjax import compile_options, trace_state
from xmedjax import mesh as mesh_lib
from xmedjax import train_state as ts
from xmedjax.explain import grad_cam
from xmedjax.explain.gradcam import grad_cam_fn
from xmedjax.models import create_model


def _ynn_convolutions(hlo: str) -> int:
    """How many YNNPACK fusions of a compiled module hold a convolution."""
    bodies = {m.group(1): m.group(0) for m in re.finditer(r"\n%([\w.-]+) \(.*?\n\}", hlo, re.S)}
    count = 0
    for line in hlo.splitlines():
        called = re.search(r"calls=%([\w.-]+)", line)
        if "__ynn_fusion" in line and called and " convolution(" in bodies.get(called[1], ""):
            count += 1
    return count


def test_forward_options_only_on_a_cpu(monkeypatch):
    assert compile_options.forward_options("cpu") == compile_options.CPU_FORWARD
    assert compile_options.forward_options("gpu") is None
    assert compile_options.forward_options("tpu") is None
    monkeypatch.setattr(compile_options, "EIGEN_FORWARD_CONVS", False)
    assert compile_options.forward_options("cpu") is None


@pytest.fixture(scope="module")
def resnet():
    return create_model("resnet50", 2, width=0.125, seed=0)


def test_eval_step_uses_xla_convolutions_and_train_step_ynnpack(resnet):
    mdef, state = ts.create_train_state(resnet, ts.make_optimizer("adam", 1e-4))
    mesh = mesh_lib.make_mesh()
    state = ts.place_state(state, mesh)
    batch = {
        "image": np.zeros((2, 32, 32, 3), np.float32),
        "label": np.zeros(2, np.int32),
        "valid": np.ones(2, np.int32),
        "index": np.arange(2),
    }
    eval_hlo = ts.jit_eval_step(mdef, state, mesh).lower(state, batch).compile().as_text()
    train_hlo = ts.jit_train_step(mdef, state, mesh).lower(state, batch).compile().as_text()
    assert " convolution(" in eval_hlo  # the 3x3 and 7x7 convolutions are still there ...
    assert _ynn_convolutions(eval_hlo) == 0  # ... as XLA's own
    assert _ynn_convolutions(train_hlo) > 0  # the default: YNNPACK's


def test_grad_cam_top_level_and_nested_agree(resnet):
    resnet.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    targets = jnp.array([0, 1], jnp.int32)
    top = grad_cam(resnet, x, targets)
    graphdef, state = nnx.split(resnet)
    hlo = grad_cam_fn.lower(graphdef, state, x, targets).compile().as_text()
    assert _ynn_convolutions(hlo) == 0

    # Inside another jit the options are dropped (JAX refuses them on a nested jit).
    nested = jax.jit(lambda s, images: grad_cam_fn(graphdef, s, images, targets))
    inner = nested(state, x)
    np.testing.assert_allclose(np.asarray(inner.raw), np.asarray(top.raw), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(inner.targets), np.asarray(top.targets))


def test_top_level_is_told_from_inside_a_trace():
    """The switch `forward_jit`'s calls take: options at top level, none inside a trace."""
    assert trace_state.top_level()
    seen = []
    jax.jit(lambda x: seen.append(trace_state.top_level()) or x)(1.0)
    assert seen == [False]
