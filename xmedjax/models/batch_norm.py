"""torch's BatchNorm2d with a hand-written training backward (issue 14: CPU speed).

`BatchNorm` is `nnx.BatchNorm` (same variables, same forward, bit for bit) whose training
forward on float32 input has the textbook backward of batch normalisation, per channel over
the M = N*H*W values:

    x_hat = (x - mean) * rstd,   d_bias = sum(g),   d_scale = sum(g * x_hat),
    d_x   = scale * rstd / M * (M * g - d_bias - x_hat * d_scale)

two reductions over (g, x) and one elementwise pass, where autodiff of the two-pass forward
differentiates through both means and the centred square; d_scale is taken as
rstd * sum(g * (x - mean)) (`SCALE_AFTER_SUM`). Evaluation (running averages), other dtypes,
masks and named-axis statistics are `nnx.BatchNorm` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` with `batch_norm_train`'s backward for float32 training."""

    def __call__(self, x, use_running_average=None, *, mask=None, stats=None, centred=False):
        """`stats`: this batch's per-channel (mean, variance) of `x`, if the caller already
        has them (DenseNet121's blocks, `densenet.DenseBlock`); used by the float32 training
        path only, which otherwise computes them (every other path ignores them).
        `centred=True`: `x` is already the input minus `stats`' mean (that path only)."""
        running = self.use_running_average if use_running_average is None else use_running_average
        plain = (
            running
            or mask is not None
            or self.axis_name is not None
            or self.use_fast_variance
            or self.scale is None
            or self.bias is None
            or x.dtype != jnp.float32
            or jnp.dtype(self.dtype or jnp.float32) != jnp.float32
            or self.axis not in (-1, x.ndim - 1)
        )
        if centred and (plain or stats is None):
            raise ValueError("BatchNorm: a centred input needs `stats` and float32 training")
        if plain:
            return super().__call__(x, use_running_average, mask=mask)
        if centred:
            mean, var = (jax.lax.stop_gradient(v) for v in stats)
            y = batch_norm_centred(x, var, self.scale[...], self.bias[...], self.epsilon)
        elif stats is None:
            y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon)
        else:
            mean, var = (jax.lax.stop_gradient(v) for v in stats)
            y = batch_norm_given(x, mean, var, self.scale[...], self.bias[...], self.epsilon)
        stop = jax.lax.stop_gradient
        # set_value, not `[...] =`: the indexed form asks the new value for its sharding,
        # which on a tracer builds an error message by walking the whole jaxpr traced so far
        # (4.5 of DenseNet121's 6.5 s train-step trace). Same result: the value is replaced.
        self.mean.set_value(stop(_average(self.momentum, self.mean[...], mean)))
        self.var.set_value(stop(_average(self.momentum, self.var[...], var)))
        return y


# The elementwise arithmetic below is written with `lax` ops: jnp's operators each enter a
# nested jit while tracing (~20 per BatchNorm): DenseNet121's train-step trace took 2.95-3.25
# s with them, 2.61-2.67 s without. The same operations in the same order as jnp's, so the
# same numbers, bit for bit.
def _binary(op, a, b):
    """`op` on `a` and `b` promoted as jnp promotes them (Python scalars are weak)."""
    dtype = jnp.result_type(a, b)
    return op(lax.convert_element_type(a, dtype), lax.convert_element_type(b, dtype))


def _add(a, b):
    return _binary(lax.add, a, b)


def _sub(a, b):
    return _binary(lax.sub, a, b)


def _mul(a, b):
    return _binary(lax.mul, a, b)


def _average(momentum: float, running: jax.Array, batch: jax.Array) -> jax.Array:
    """`momentum * running + (1 - momentum) * batch`, nnx's running-average update."""
    return _add(_mul(momentum, running), _mul(1 - momentum, batch))


def _per_channel(v: jax.Array, x: jax.Array) -> jax.Array:
    """A per-channel vector broadcast to `x`'s shape (channels last)."""
    return lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (mean, two-pass variance) of `x` over every axis but the last, as the
    training forward computes them; no gradient flows through them (`BatchNorm`'s `stats`)."""
    return _stats(jax.lax.stop_gradient(x))


def centred_batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_stats(x)` and x - mean, the value the variance is computed from, for
    `BatchNorm(..., centred=True)`; the gradient flows through x - mean to x only."""
    axes = tuple(range(x.ndim - 1))
    mean = jax.lax.stop_gradient(x).mean(axes)
    centred = x - jnp.expand_dims(mean, axes)
    var = jnp.square(jax.lax.stop_gradient(centred)).mean(axes)  # _stats, bit for bit
    return mean, var, centred


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and two-pass variance over every axis but the last (as nnx)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - jnp.expand_dims(mean, axes)).mean(axes)
    return mean, var


def _apply(x, mean, var, scale, bias, epsilon):
    return _scale_and_shift(_sub(x, _per_channel(mean, x)), var, scale, bias, epsilon)


def _scale_and_shift(centred, var, scale, bias, epsilon):
    """(x - mean) * (rsqrt(var + epsilon) * scale) + bias, in nnx's order (bit for bit)."""
    mul = _mul(lax.rsqrt(_add(var, epsilon)), scale)
    return _add(_mul(centred, _per_channel(mul, centred)), _per_channel(bias, centred))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
    """(normalised x, batch mean, batch variance) over every axis but the last; the
    statistics are for the running averages only (their gradient is not propagated)."""
    return _fwd(x, scale, bias, epsilon)[0]


def _fwd(x, scale, bias, epsilon):
    mean, var = _stats(x)
    return (_apply(x, mean, var, scale, bias, epsilon), mean, var), (x, mean, var, scale)


# The backward's sum(g * x_hat) is taken as rstd * sum(g * (x - mean)): XLA computes x - mean
# once for the forward's two-pass variance and the backward's reduction reads that buffer,
# where sum(g * x_hat) had it write x_hat into one more buffer per BatchNorm and read it
# back (ResNet50's train step ~2% faster: benchmarks/NOTES.md, "Phase 12").
SCALE_AFTER_SUM = True


def _bwd(epsilon, residuals, cotangents):
    x, mean, var, scale = residuals
    g = cotangents[0]  # the statistics' cotangents are dropped (running averages only)
    return _centred_bwd(epsilon, _sub(x, _per_channel(mean, x)), var, scale, g)


def _centred_bwd(epsilon, centred, var, scale, g):
    """d_x, d_scale, d_bias from the centred input x - mean."""
    axes = tuple(range(centred.ndim - 1))
    count = centred.size // centred.shape[-1]
    rstd = lax.rsqrt(_add(var, epsilon))
    d_bias = g.sum(axes)
    if SCALE_AFTER_SUM:
        d_scale = _mul(_mul(g, centred).sum(axes), rstd)
        x_hat_d_scale = _mul(centred, _per_channel(_mul(d_scale, rstd), g))
    else:
        x_hat = _mul(centred, _per_channel(rstd, centred))
        d_scale = _mul(g, x_hat).sum(axes)
        x_hat_d_scale = _mul(x_hat, _per_channel(d_scale, g))
    factor = _binary(lax.div, _mul(scale, rstd), count)
    inner = _sub(_sub(_mul(count, g), _per_channel(d_bias, g)), x_hat_d_scale)
    d_x = _mul(_per_channel(factor, g), inner)
    return d_x, d_scale, d_bias


batch_norm_train.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def batch_norm_given(x, mean, var, scale, bias, epsilon: float):
    """`batch_norm_train`'s normalised x with the batch's `mean` and `var` given (they must
    be x's own): the same backward, which already differentiates through the statistics,
    so `mean` and `var` get no gradient."""
    return _apply(x, mean, var, scale, bias, epsilon)


def _given_fwd(x, mean, var, scale, bias, epsilon):
    return _apply(x, mean, var, scale, bias, epsilon), (x, mean, var, scale)


def _given_bwd(epsilon, residuals, g):
    d_x, d_scale, d_bias = _bwd(epsilon, residuals, (g, None, None))
    _, mean, var, _ = residuals
    return d_x, jnp.zeros_like(mean), jnp.zeros_like(var), d_scale, d_bias


batch_norm_given.defvjp(_given_fwd, _given_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_centred(centred, var, scale, bias, epsilon: float):
    """`batch_norm_given`'s normalised x from x - mean itself (DenseNet121's blocks keep each
    chunk's, computed for its variance anyway): the same values and the same backward, whose
    d_x is the gradient of x; `var` gets no gradient."""
    return _scale_and_shift(centred, var, scale, bias, epsilon)


def _centred_fwd(centred, var, scale, bias, epsilon):
    return batch_norm_centred(centred, var, scale, bias, epsilon), (centred, var, scale)


def _centred_vjp(epsilon, residuals, g):
    centred, var, scale = residuals
    d_x, d_scale, d_bias = _centred_bwd(epsilon, centred, var, scale, g)
    return d_x, jnp.zeros_like(var), d_scale, d_bias


batch_norm_centred.defvjp(_centred_fwd, _centred_vjp)
