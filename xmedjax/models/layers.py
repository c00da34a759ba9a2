"""Building blocks shared by the torchvision-exact models.

Everything here mirrors a torch.nn layer exactly: explicit symmetric padding (never
'SAME', which is asymmetric at stride 2), BatchNorm with torch's epsilon and momentum,
max pooling padded with -inf, and torchvision's default initialisers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax.models import barrier, kernel_grad
from xmedjax.models import batch_norm as batch_norm_lib

# torch BatchNorm2d: eps 1e-5, running = (1 - 0.1) * running + 0.1 * batch.
# Flax: running = momentum * running + (1 - momentum) * batch, so momentum 0.9.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# The name under which every model sows its Grad-CAM target activation.
CAM_TARGET = "cam_target"

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free 2-D convolution with symmetric padding, like torch.nn.Conv2d; its kernel
    gradient is a matrix product where that is faster on a CPU (`kernel_grad`)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        kernel_init=conv_init,
        conv_general_dilated=kernel_grad.conv_general_dilated,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def batch_norm(features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """torch.nn.BatchNorm2d(features) with float32 parameters and statistics (and a
    hand-written training backward, `batch_norm.BatchNorm`)."""
    # Two-pass variance (mean((x - mean)^2)), as torch computes it. Flax's default "fast"
    # variance, mean(x^2) - mean(x)^2, cancels catastrophically in float32: data-parallel
    # train steps on 8 devices then got gradients up to 23% off the 1-device ones (ResNet50,
    # 32 px); with two passes both agree with float64 to ~1e-4 (tests/test_sharding.py).
    return batch_norm_lib.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """torch.nn.Linear with torch's default uniform initialisation; computes in float32."""
    bound_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    limit = 1.0 / (in_features**0.5)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=bound_init,
        bias_init=bias_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


POOL_PAD = ((0, 0), (1, 1), (1, 1), (0, 0))
MATERIALISE_POOL_GRAD = True


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1) on NHWC input.

    The gradient goes to the first maximum of each window in row-major order, as torch's;
    it is computed tap by tap (`_max_pool_grad`) instead of JAX's argmax-form reduce-window,
    which materialises four int32 index maps of the padded input (7% of a ResNet50 train
    step on a CPU, benchmarks/NOTES.md). The forward is the maximum of the nine strided
    windows (`_max_of_windows`), equal to one reduce-window bit for bit and 3x faster on a
    CPU."""
    return _max_of_windows(x)


def _windows(x: jax.Array):
    """The nine stride-2 windows of the -inf-padded x, [(dy, dx, window)], each the size of
    the pool's output."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, POOL_PAD, constant_values=-jnp.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    for dy in range(3):
        for dx in range(3):
            end = (n, dy + 2 * (ho - 1) + 1, dx + 2 * (wo - 1) + 1, c)
            yield dy, dx, jax.lax.slice(padded, (0, dy, dx, 0), end, (1, 2, 2, 1))


def _max_of_windows(x: jax.Array) -> jax.Array:
    """max_pool_3x3_s2's forward: one elementwise pass over the nine windows (XLA's
    reduce-window: 10.6 ms, this: 3.3 ms at 8x112x112x64; benchmarks/NOTES.md, "Phase 4")."""
    out = None
    for _, _, window in _windows(x):
        out = window if out is None else jnp.maximum(out, window)
    return out


def max_pool_3x3_s2_plain(x: jax.Array) -> jax.Array:
    """The same max pool as one reduce-window, differentiated by JAX's own rule."""
    # The init value must be a Python scalar: a jnp array is a tracer under jit.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), POOL_PAD)


@jax.custom_vjp
def materialised_grad(x: jax.Array) -> jax.Array:
    """`x` itself; its gradient is computed once into a buffer of its own
    (`barrier.materialise`) before whatever takes it apart."""
    return x


def _materialised_grad_fwd(x):
    return x, None


def _materialised_grad_bwd(_, g):
    return (barrier.materialise(g),)


materialised_grad.defvjp(_materialised_grad_fwd, _materialised_grad_bwd)


@jax.custom_jvp
def materialised(x: jax.Array) -> jax.Array:
    """`x`, computed once into a buffer of its own (`barrier.materialise`) for every reader,
    where XLA would otherwise fuse its producers into each of them. The identity to autodiff (a
    JVP rule, so forward and reverse mode both work; the loop itself has no reverse mode)."""
    return barrier.materialise(x)


@materialised.defjvp
def _materialised_jvp(primals, tangents):
    return barrier.materialise(primals[0]), tangents[0]


def _max_pool_fwd(x):
    y = _max_of_windows(x)
    return y, (x, y)


def _max_pool_grad(residuals, g):
    """Each output's gradient to the first input of its 3x3 window equal to the maximum."""
    x, y = residuals
    # g is materialised once: left to itself XLA fuses g's producer (in DenseNet121 the
    # BatchNorm backward of every dense layer reading the stem's channels) into all nine taps
    # below and evaluates it at the input's resolution, a 134 ms fusion per step.
    if MATERIALISE_POOL_GRAD:
        g = barrier.materialise(g)
    n, h, w, c = x.shape
    _, ho, wo, _ = y.shape
    padded_shape = (n, h + 2, w + 2, c)
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(padded_shape, g.dtype)
    for dy, dxx, window in _windows(x):
        first = (window == y) & ~taken
        taken = taken | first
        part = jnp.where(first, g, jnp.zeros_like(g))
        # back to the window's positions: every 2nd row/column from (dy, dxx)
        dx = dx + jax.lax.pad(
            part,
            jnp.array(0, g.dtype),
            (
                (0, 0, 0),
                (dy, padded_shape[1] - dy - 2 * (ho - 1) - 1, 1),
                (dxx, padded_shape[2] - dxx - 2 * (wo - 1) - 1, 1),
                (0, 0, 0),
            ),
        )
    return (dx[:, 1 : h + 1, 1 : w + 1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_grad)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """torch.nn.AvgPool2d(kernel_size=2, stride=2) (floor mode, no padding) on NHWC."""
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return summed / jnp.array(4, dtype=x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC map, computed in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def mark_cam_target(module: nnx.Module, activation: jax.Array) -> jax.Array:
    """Sow the Grad-CAM target activation and return it open to gradient capture.

    `sow` records the activation as an `nnx.Intermediate` named ``CAM_TARGET`` and
    `perturb` adds a zero `nnx.Perturbation` of the same name, whose gradient is the
    gradient of the output with respect to the activation. Outside `nnx.capture` both
    are no-ops, so the plain forward pass pays nothing.
    """
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, CAM_TARGET, activation)
        activation = module.perturb(CAM_TARGET, activation)
    return activation


def classify(module: nnx.Module, fmap: jax.Array, head: nnx.Linear) -> jax.Array:
    """The end both models share: `fmap`, the map global average pooling consumes, marked as
    the Grad-CAM target (`mark_cam_target`), pooled in float32, then the linear `head`."""
    return head(global_avg_pool(mark_cam_target(module, fmap)))
