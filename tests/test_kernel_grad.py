"""Convolutions as matrix products (xmedjax.models.kernel_grad, issue 14): outputs and
gradients equal lax's up to float rounding (k x k forwards bit for bit), and the cases it
does not take fall back to the plain convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from xmedjax.models import DenseNet, create_model
from xmedjax.models import kernel_grad as kg

CASES = [  # (H, kernel, stride, pad, in, out): the 1x1 convolutions the models take
    (16, 1, 1, 0, 8, 16),
    (16, 1, 2, 0, 8, 16),  # strided 1x1 (downsample)
    (15, 1, 2, 0, 8, 16),  # odd size
    (9, 1, 1, 0, 64, 32),
]


def _loss(conv, x, w, stride, pad):
    y = conv(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=kg.NHWC)
    return jnp.sum(jnp.sin(y))  # a non-trivial output gradient


def _assert_lax_forward_and_product_kernel_grad(x, w, strides, pads, rng):
    """`kg.conv_general_dilated` runs lax's own forward and input gradient, bit for bit, and
    a kernel gradient of products (no convolution) equal to XLA's up to rounding."""

    def conv(conv_fn):
        return lambda x_, w_: conv_fn(x_, w_, strides, pads, dimension_numbers=kg.NHWC)

    ours, plain = conv(kg.conv_general_dilated), conv(lax.conv_general_dilated)
    y = jax.jit(plain)(x, w)
    np.testing.assert_array_equal(jax.jit(ours)(x, w), y)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    backward = lambda f: lambda x_, w_, g_: jax.vjp(f, x_, w_)[1](g_)  # noqa: E731
    (dx, dw), (dx0, dw0) = (jax.jit(backward(f))(x, w, g) for f in (ours, plain))
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_allclose(dw, dw0, rtol=1e-4, atol=1e-4)
    assert "dot_general" in str(jax.make_jaxpr(backward(ours))(x, w, g))
    assert "dot_general" not in str(jax.make_jaxpr(backward(plain))(x, w, g))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}k{}s{}p{}_{}to{}".format(*c))
def test_gradients_match_lax_autodiff(case):
    h, k, stride, pad, cin, cout = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    assert kg.uses_matmul_kernel_grad(w.shape, ((pad, pad), (pad, pad)), kg.NHWC)
    plain = jax.jit(
        jax.value_and_grad(lambda x, w: _loss(lax.conv_general_dilated, x, w, stride, pad), (0, 1))
    )
    ours = jax.jit(
        jax.value_and_grad(lambda x, w: _loss(kg.conv_general_dilated, x, w, stride, pad), (0, 1))
    )
    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = plain(x, w), ours(x, w)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw1), np.asarray(dw0), rtol=1e-4, atol=1e-4)
    assert dw1.dtype == w.dtype and dw1.shape == w.shape


@pytest.mark.parametrize(
    "case", [(17, 7, 2, 3, 3, 8), (15, 3, 2, 1, 2, 4), (12, 3, 1, 1, 5, 6), (9, 1, 2, 0, 4, 4)]
)
def test_kernel_gradient_of_any_kernel_matches_xla(case):
    """`kernel_gradient` for k x k kernels too (the models leave those to XLA: slower here)."""
    h, k, stride, pad, cin, cout = case
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, h, h, cin)), jnp.float32)
    w = jnp.zeros((k, k, cin, cout), jnp.float32)
    pads = ((pad, pad), (pad, pad))
    y, vjp = jax.vjp(
        lambda w: lax.conv_general_dilated(x, w, (stride,) * 2, pads, dimension_numbers=kg.NHWC),
        w,
    )
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    ours = kg.kernel_gradient(x, g, w.shape, (stride, stride), pads)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(vjp(g)[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, stride", [(1, 1), (1, 2), (3, 1), (7, 2)])
def test_forward_matches_lax(kernel, stride):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 13, 13, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 6)), jnp.float32)
    pads = ((kernel // 2, kernel // 2),) * 2
    a = lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=kg.NHWC)
    b = kg.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=kg.NHWC)
    assert a.shape == b.shape
    if kernel > 1:  # the same lax call
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, padding, extra",
    [
        ((3, 3, 64, 64), ((1, 1), (1, 1)), {}),  # k x k: shifted_kernel_gradient's rule
        ((7, 7, 3, 64), ((3, 3), (3, 3)), {}),  # the stem too
        ((1, 1, 8, 8), "SAME", {}),
        ((1, 1, 8, 8), ((0, 0), (0, 0)), {"rhs_dilation": (2, 2)}),
        ((1, 1, 4, 8), ((0, 0), (0, 0)), {"feature_group_count": 2}),
        ((3, 3, 8, 8), ((1, 1), (1, 1)), {"lhs_dilation": (2, 2)}),
    ],
)
def test_other_convolutions_stay_plain(shape, padding, extra):
    assert not kg.uses_matmul_kernel_grad(shape, padding, kg.NHWC, **extra)


def test_gpu_and_tpu_stay_plain(monkeypatch):
    assert kg.uses_matmul_kernel_grad((1, 1, 8, 8), ((0, 0), (0, 0)), kg.NHWC)  # on this CPU
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert not kg.uses_matmul_kernel_grad((1, 1, 8, 8), ((0, 0), (0, 0)), kg.NHWC)


def test_nchw_layout_stays_plain():
    assert not kg.uses_matmul_kernel_grad((1, 1, 8, 8), ((0, 0), (0, 0)), ("NCHW", "OIHW", "NCHW"))


def test_float64_gradients_are_float64_exact():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float64)
        w = jnp.asarray(rng.standard_normal((1, 1, 4, 4)), jnp.float64)
        dw = jax.grad(lambda w: _loss(kg.conv_general_dilated, x, w, 2, 0))(w)
        ref = jax.grad(lambda w: _loss(lax.conv_general_dilated, x, w, 2, 0))(w)
        assert dw.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(dw), np.asarray(ref), rtol=1e-12)


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
    w = jnp.full((1, 1, 4, 4), 0.5, jnp.bfloat16)
    dw = jax.grad(lambda w: _loss(kg.conv_general_dilated, x, w, 1, 0).astype(jnp.float32))(w)
    ref = jax.grad(lambda w: _loss(lax.conv_general_dilated, x, w, 1, 0).astype(jnp.float32))(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref, np.float32), rtol=2e-2)


def _to_float64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _short_densenet(dtype):
    """DenseNet121's layers (stem, dense layers, transitions, norm5) with 2-3 dense layers
    per block: the same convolutions at a fraction of DenseNet121's compile time."""
    return DenseNet(
        (2, 3, 2, 2), growth_rate=2, init_features=4, num_classes=2, dtype=dtype, rngs=nnx.Rngs(0)
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "densenet"])
def test_model_gradients_match_the_plain_convolution(arch, monkeypatch):
    """The whole model's parameter gradients with and without the products, in float64 (in
    float32 a freshly initialised narrow network with BatchNorm over a small batch amplifies
    the products' different rounding to 1e-3; in float64 only the math is compared)."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32, 32, 3)), jnp.float64)

        def grads():
            if arch == "densenet":
                model = _short_densenet(jnp.float64)
            else:
                model = create_model(arch, 2, in_channels=3, width=0.0625, dtype=jnp.float64)
            model.train()  # BatchNorm on the batch's statistics, as in a train step
            graphdef, state = nnx.split(model)
            state = _to_float64(state)
            # float64 BatchNorm is nnx's own: the custom VJPs are the convolution rules and
            # the max pool's one.
            forward = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state)
            rules = str(forward).count("custom_vjp_call")
            model = nnx.merge(graphdef, state)
            return nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)))))(model), rules

        monkeypatch.setattr(kg, "SPACE_TO_DEPTH_MIN_ROWS", 1)  # the 32-pixel stem too
        ours, rules = grads()
        monkeypatch.setattr(kg, "SPACE_TO_DEPTH_MIN_ROWS", None)
        monkeypatch.setattr(kg, "uses_matmul_kernel_grad", lambda *a, **k: False)
        monkeypatch.setattr(kg, "SHIFTED_3X3_KERNEL_GRAD", False)
        monkeypatch.setattr(kg, "TAPS_3X3_FORWARD", False)
        monkeypatch.setattr(kg, "TAP_KERNEL_GRAD_MIN_ROWS", None)
        plain, plain_rules = grads()
        assert rules > plain_rules + 10, (rules, plain_rules)  # the products were taken
        leaves = jax.tree_util.tree_leaves_with_path(ours)
        assert len(leaves) == len(jax.tree_util.tree_leaves(plain)) > 50
        for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(plain)):
            assert a.dtype == jnp.float64
            scale = float(jnp.max(jnp.abs(b))) + 1e-30
            err = float(jnp.max(jnp.abs(a - b))) / scale
            assert err < 1e-9, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("size", [14, 17], ids=lambda s: f"H{s}")
@pytest.mark.parametrize("shifted", [False, True], ids=["xla_kernel_grad", "shifted"])
def test_taps_forward_equals_the_convolution_and_keeps_xlas_backward(size, shifted, monkeypatch):
    """A 3x3 convolution with few output channels runs forward as one product and nine
    shifted sums (DenseNet121's 128 -> 32): the output equals lax's up to rounding, the input
    gradient is XLA's own, bit for bit, and so is the kernel gradient below
    `NINE_SHIFTS_MIN_ROWS` (above it `shifted_kernel_gradient`, equal up to rounding)."""
    monkeypatch.setattr(kg, "NINE_SHIFTS_MIN_ROWS", 1 if shifted else 10**9)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, size, size, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 48, 16)) / np.sqrt(9 * 48), jnp.float32)
    pads = ((1, 1), (1, 1))
    assert kg.uses_taps_forward(x.shape, w.shape, (1, 1), pads, kg.NHWC)
    assert kg.uses_shifted_kernel_grad(x.shape, w.shape, (1, 1), pads, kg.NHWC) == shifted

    def conv(conv_fn):
        return lambda x_, w_: conv_fn(x_, w_, (1, 1), pads, dimension_numbers=kg.NHWC)

    ours, plain = conv(kg.conv_general_dilated), conv(lax.conv_general_dilated)
    y, want = jax.jit(ours)(x, w), jax.jit(plain)(x, w)
    assert "dot_general" in str(jax.make_jaxpr(ours)(x, w))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    backward = lambda f: lambda x_, w_, g_: jax.vjp(f, x_, w_)[1](g_)  # noqa: E731
    (dx, dw), (dx0, dw0) = (jax.jit(backward(f))(x, w, g) for f in (ours, plain))
    np.testing.assert_array_equal(dx, dx0)
    if shifted:
        np.testing.assert_allclose(dw, dw0, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_array_equal(dw, dw0)
    # The forward's product, and the shifted kernel gradient's where it is taken.
    products = str(jax.make_jaxpr(backward(ours))(x, w, g)).count("dot_general")
    assert products == (2 if shifted else 1)


@pytest.mark.parametrize(
    "shape, strides, pads, why",
    [
        ((2, 16, 16, 48), (1, 1), ((1, 1), (1, 1)), "taken"),
        ((2, 16, 16, 32), (1, 1), ((1, 1), (1, 1)), "too many outputs (16 * 3 > 32)"),
        ((2, 13, 13, 48), (1, 1), ((1, 1), (1, 1)), "smaller than 14x14"),
        ((2, 16, 16, 48), (2, 2), ((1, 1), (1, 1)), "strided"),
        ((2, 16, 16, 48), (1, 1), ((0, 0), (0, 0)), "unpadded"),
    ],
)
def test_taps_forward_rule(shape, strides, pads, why):
    w_shape = (3, 3, shape[-1], 16)
    taken = kg.uses_taps_forward(shape, w_shape, strides, pads, kg.NHWC)
    assert taken == (why == "taken"), why
    assert not kg.uses_taps_forward(shape, (1, 1, shape[-1], 16), strides, pads, kg.NHWC)


SHIFTED_CASES = [  # (N, H, W, in, out): any size, either channel count the larger
    (2, 8, 8, 16, 4),
    (1, 7, 5, 3, 8),
    (3, 14, 9, 8, 8),
    (2, 1, 1, 4, 4),  # one pixel: every tap but the centre meets padding
]


@pytest.mark.parametrize(
    "form", ["shifted_kernel_gradient", "_nine_shifts", "_nine_shifts_transposed", "_row_windows"]
)
@pytest.mark.parametrize("case", SHIFTED_CASES, ids=lambda c: "N{}H{}W{}_{}to{}".format(*c))
def test_shifted_kernel_gradient_matches_xla(case, form):
    """`shifted_kernel_gradient` (and each of its forms, whichever channel count is the
    larger) equals XLA's kernel gradient of a 3x3, stride-1, padding-1 convolution: float64
    to 1e-12 (the same sums in another order), float32 to rounding."""
    n, h, wd, cin, cout = case
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-4)):
            x = jnp.asarray(rng.standard_normal((n, h, wd, cin)), dtype)
            w = jnp.zeros((3, 3, cin, cout), dtype)
            y, vjp = jax.vjp(lambda w_, x=x: kg._plain_3x3(x, w_), w)
            g = jnp.asarray(rng.standard_normal(y.shape), dtype)
            ours = jax.jit(getattr(kg, form))(x, g)
            assert ours.dtype == dtype and ours.shape == w.shape
            np.testing.assert_allclose(ours, vjp(g)[0], rtol=tol, atol=tol)


def _transposed_products(fn, *args) -> list[str]:
    """The compiled `dot` instructions of jit(fn) that contract their left operand's major
    axis: the products this jaxlib's YNNPACK refuses (XLA's own, slower dot runs them)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return [
        line for line in hlo.splitlines() if " dot(" in line and "lhs_contracting_dims={0}" in line
    ]


@pytest.mark.parametrize("transposed", [True, False])
def test_transposed_forms_make_every_kernel_gradient_product_a_plain_one(transposed, monkeypatch):
    """With `TRANSPOSED_NINE_SHIFTS` and `TRANSPOSED_ROW_PRODUCTS` (the defaults) the nine
    shifts' product and `kernel_gradient`'s per-tap products contract the minor axis of their
    left operand (g transposed into a buffer once); without them, the major axis. The values
    are the same either way (to rounding)."""
    monkeypatch.setattr(kg, "TRANSPOSED_NINE_SHIFTS", transposed)
    monkeypatch.setattr(kg, "TRANSPOSED_ROW_PRODUCTS", transposed)
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 16)), jnp.float32)
    g4 = jnp.asarray(rng.standard_normal((2, 12, 12, 4)), jnp.float32)
    g64 = jnp.asarray(rng.standard_normal((2, 6, 6, 64)), jnp.float32)
    nine = lambda x_, g_: kg.shifted_kernel_gradient(x_, g_)  # noqa: E731  16 -> 4: nine shifts
    taps = lambda x_, g_: kg.kernel_gradient(x_, g_, (3, 3, 16, 64), (2, 2), ((1, 1), (1, 1)))  # noqa: E731
    for fn, g, w_shape, stride in ((nine, g4, (3, 3, 16, 4), 1), (taps, g64, (3, 3, 16, 64), 2)):
        assert bool(_transposed_products(fn, x, g)) != transposed
        y, vjp = jax.vjp(
            lambda w, s=stride: lax.conv_general_dilated(
                x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=kg.NHWC
            ),
            jnp.zeros(w_shape, jnp.float32),
        )
        assert y.shape == g.shape
        np.testing.assert_allclose(jax.jit(fn)(x, g), vjp(g)[0], rtol=1e-4, atol=1e-4)


def test_shifted_kernel_gradient_in_the_convolution_keeps_lax_forward(monkeypatch):
    """A 3x3 stride-1 convolution that is not `taps_forward`'s runs lax's own forward, bit
    for bit, and its gradients are XLA's input gradient (bit for bit) and the shifted
    product, which the traced backward holds."""
    monkeypatch.setattr(kg, "SHIFTED_MIN_ROWS", 200)  # 2 x 10 x 10 rows below
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 10, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) / np.sqrt(72), jnp.float32)
    pads = ((1, 1), (1, 1))
    assert kg.uses_shifted_kernel_grad(x.shape, w.shape, (1, 1), pads, kg.NHWC)
    assert not kg.uses_taps_forward(x.shape, w.shape, (1, 1), pads, kg.NHWC)
    _assert_lax_forward_and_product_kernel_grad(x, w, (1, 1), pads, rng)


@pytest.mark.parametrize(
    "kernel, strides, pads, extra, taken",
    [
        (3, (1, 1), ((1, 1), (1, 1)), {}, True),
        (3, (1, 1), ((1, 1), (1, 1)), {"lhs_shape": (2, 8, 7, 8)}, False),  # 112 rows < 128
        (3, (2, 2), ((1, 1), (1, 1)), {}, False),  # strided (ResNet50's first of a stage)
        (3, (1, 1), ((0, 0), (0, 0)), {}, False),  # unpadded
        (5, (1, 1), ((1, 1), (1, 1)), {}, False),
        (3, (1, 1), ((1, 1), (1, 1)), {"rhs_dilation": (2, 2)}, False),
        (3, (1, 1), ((1, 1), (1, 1)), {"feature_group_count": 2}, False),
        (3, (1, 1), ((1, 1), (1, 1)), {"precision": lax.Precision.HIGHEST}, False),
    ],
)
def test_shifted_kernel_gradient_rule(kernel, strides, pads, extra, taken, monkeypatch):
    monkeypatch.setattr(kg, "SHIFTED_MIN_ROWS", 128)  # 2 x 8 x 8 rows below
    shape, w_shape = extra.pop("lhs_shape", (2, 8, 8, 8)), (kernel, kernel, 8, 8)
    assert kg.uses_shifted_kernel_grad(shape, w_shape, strides, pads, kg.NHWC, **extra) == taken


def test_shifted_kernel_gradient_takes_the_models_measured_layers_at_batch_8():
    """The default thresholds: ResNet50's 3x3 64 -> 64 layers at 56x56 and batch 8 take the
    shifted product, its 128 -> 128 at 28x28 not; DenseNet121's 128 -> 32 at 56x56 and
    28x28 take it, its 14x14 ones not."""
    pads = ((1, 1), (1, 1))

    def taken(size, cin, cout):
        w_shape = (3, 3, cin, cout)
        return kg.uses_shifted_kernel_grad((8, size, size, cin), w_shape, (1, 1), pads, kg.NHWC)

    assert taken(56, 64, 64) and not taken(28, 128, 128)
    assert taken(56, 128, 32) and taken(28, 128, 32) and not taken(14, 128, 32)


def test_shifted_kernel_gradient_stays_off_gpu_and_tpu(monkeypatch):
    monkeypatch.setattr(kg, "SHIFTED_MIN_ROWS", 1)
    args = ((2, 8, 8, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1)), kg.NHWC)
    assert kg.uses_shifted_kernel_grad(*args)  # on this CPU
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert not kg.uses_shifted_kernel_grad(*args)


@pytest.mark.parametrize("stride", [1, 2])
def test_tap_kernel_gradient_in_the_convolution_keeps_lax_forward(stride, monkeypatch):
    """A 3x3 convolution with at least 64 output channels and enough rows runs lax's own
    forward, bit for bit; its input gradient is XLA's, bit for bit, and its kernel gradient
    `kernel_gradient`'s products, equal to XLA's up to rounding."""
    monkeypatch.setattr(kg, "TAP_KERNEL_GRAD_MIN_ROWS", 8)
    monkeypatch.setattr(kg, "SHIFTED_MIN_ROWS", 10**9)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 64)) / 12.0, jnp.float32)
    pads = ((1, 1), (1, 1))
    assert kg.uses_tap_kernel_grad(x.shape, w.shape, (stride, stride), pads, kg.NHWC)
    _assert_lax_forward_and_product_kernel_grad(x, w, (stride, stride), pads, rng)


@pytest.mark.parametrize(
    "lhs, w, stride, taken",
    [
        ((8, 56, 56, 128), (3, 3, 128, 128), 2, True),  # ResNet50's stride-2 3x3 at 56
        ((8, 28, 28, 128), (3, 3, 128, 128), 1, True),
        ((8, 28, 28, 256), (3, 3, 256, 256), 2, False),  # 1568 output rows
        ((8, 56, 56, 64), (3, 3, 64, 64), 1, False),  # the shifted product's
        ((8, 28, 28, 128), (3, 3, 128, 32), 1, False),  # 32 output channels
        ((8, 28, 28, 128), (5, 5, 128, 128), 1, False),
        ((8, 28, 28, 128), (1, 1, 128, 128), 1, False),
    ],
)
def test_tap_kernel_gradient_rule(lhs, w, stride, taken):
    pads = ((w[0] // 2,) * 2,) * 2
    got = kg.uses_tap_kernel_grad(lhs, w, (stride, stride), pads, kg.NHWC)
    assert got == taken


S2D_CASES = [  # (N, H, W, in, out, kernel, pad): stride 2, odd and even sizes and kernels
    (2, 17, 12, 3, 5, 7, 3),
    (2, 16, 16, 1, 4, 7, 3),
    (1, 9, 9, 1, 4, 3, 1),
    (2, 10, 11, 2, 3, 5, 2),
    (1, 4, 4, 3, 2, 7, 3),  # 2x2 outputs: most block taps meet the padding
    (2, 16, 16, 3, 8, 4, 1),
    (2, 9, 8, 3, 4, 7, 0),  # unpadded: the last input row reaches no output and is cropped
]


@pytest.mark.parametrize("case", S2D_CASES, ids=lambda c: "N{}H{}W{}_{}to{}_k{}p{}".format(*c))
def test_space_to_depth_kernel_gradient_matches_xla(case):
    """`space_to_depth_kernel_gradient` equals XLA's kernel gradient of a stride-2
    convolution: float64 to 1e-12 (the same sums in another order), float32 to rounding."""
    n, h, wd, cin, cout, k, p = case
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-4)):
            x = jnp.asarray(rng.standard_normal((n, h, wd, cin)), dtype)
            w = jnp.zeros((k, k, cin, cout), dtype)

            def conv(w_, x=x):
                pads = ((p, p), (p, p))
                return lax.conv_general_dilated(x, w_, (2, 2), pads, dimension_numbers=kg.NHWC)

            y, vjp = jax.vjp(conv, w)
            g = jnp.asarray(rng.standard_normal(y.shape), dtype)
            ours = jax.jit(kg.space_to_depth_kernel_gradient, static_argnums=(2, 3))(x, g, k, p)
            assert ours.dtype == dtype and ours.shape == w.shape
            np.testing.assert_allclose(ours, vjp(g)[0], rtol=tol, atol=tol)


def test_space_to_depth_kernel_gradient_in_the_convolution_keeps_lax_forward(monkeypatch):
    """The stem (7x7, stride 2, padding 3, 3 channels) with enough rows runs lax's own
    forward and input gradient, bit for bit, and the space-to-depth products as its kernel
    gradient, equal to XLA's up to rounding."""
    monkeypatch.setattr(kg, "SPACE_TO_DEPTH_MIN_ROWS", 100)  # 2 x 8 x 8 output rows below
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 7, 3, 16)) / 12.0, jnp.float32)
    pads = ((3, 3), (3, 3))
    assert kg.uses_space_to_depth_kernel_grad(x.shape, w.shape, (2, 2), pads, kg.NHWC)
    _assert_lax_forward_and_product_kernel_grad(x, w, (2, 2), pads, rng)


@pytest.mark.parametrize(
    "lhs, w, stride, pad, taken",
    [
        ((8, 224, 224, 3), (7, 7, 3, 64), 2, 3, True),  # the models' stem at 224 px
        ((8, 224, 224, 1), (7, 7, 1, 64), 2, 3, True),  # on one channel
        ((8, 128, 128, 3), (7, 7, 3, 64), 2, 3, True),
        ((8, 64, 64, 3), (7, 7, 3, 64), 2, 3, False),  # 8,192 output rows: XLA's was faster
        ((8, 224, 224, 8), (7, 7, 8, 64), 2, 3, False),  # more than 4 input channels
        ((8, 224, 224, 3), (7, 7, 3, 64), 1, 3, False),
        ((8, 224, 224, 3), (5, 5, 3, 64), 2, 2, False),
        ((8, 224, 224, 3), (7, 7, 3, 64), 2, 2, False),
    ],
)
def test_space_to_depth_kernel_gradient_rule(lhs, w, stride, pad, taken, monkeypatch):
    args = (lhs, w, (stride, stride), ((pad, pad), (pad, pad)), kg.NHWC)
    assert kg.uses_space_to_depth_kernel_grad(*args) == taken
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not kg.uses_space_to_depth_kernel_grad(*args)
