"""Issue 14, phase 5: formulations tried against what the code does now, kernel by kernel.

    python benchmarks/cpu_tried.py [--steps=20] [--out=FILE.json]

None of these is in the code: each row times a candidate against the current program on
the same inputs, batch 8, float32, each its own jitted program (median of --steps calls
after one warm-up, `cpu_kernels.median_ms`), with the largest difference relative to the
largest value. Where torch
is importable, torch's own kernel for the same job (eager, NCHW, all cores) is a column too,
to show what the target is. Rows:

  stem_forward      the 7x7/2 stem convolution (3 -> 64, 224 px): XLA's convolution against
                    the patch matrix ([N*112*112, 147], 49 strided slices concatenated) times
                    the kernel, and against a space-to-depth 4x4 convolution on 12 channels
  stem_kernel_grad  its kernel gradient: XLA's, patches^T g, and 16 space-to-depth tap products
  dense3x3_kernel_grad   DenseNet121's 3x3 128 -> 32 kernel gradient at 56, 28 and 14 px:
                    XLA's (the code's) against one product of the activation with nine shifted
                    copies of the gradient ([9, R, 32] built by dynamic-update-slices, then
                    nine transposed products)
  kernel_grad_product  1x1 kernel gradients x^T g ([R, Cin]^T [R, Cout], the code's) at
                    DenseNet121's shapes, against the same product with x transposed in memory
                    first
  bn_backward       BatchNorm + ReLU forward and backward into a 1x1 product: the two
                    reductions of batch_norm.BatchNorm's backward against one variadic reduce
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from cpu_kernels import median_ms, rel_diff  # noqa: E402  (benchmarks/cpu_kernels.py)
from jax import lax  # noqa: E402

from xmedjax.models import batch_norm  # noqa: E402
from xmedjax.models.barrier import materialise as _materialise  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
RNG = np.random.default_rng(0)


def randn(*shape) -> jax.Array:
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def rel(a, b) -> float:
    """The largest leaf-wise `cpu_kernels.rel_diff` of two results (arrays or tuples)."""
    return max(rel_diff(x, y) for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(a)))


def compare(op: str, shape: str, candidates: dict, args, steps: int, torch_ms=None) -> dict:
    """Times each candidate (the first is the code's), prints one line, returns the row."""
    row = {"op": op, "shape": shape, "ms": {}, "rel_diff": {}}
    ref = None
    for name, fn in candidates.items():
        ms, out = median_ms(jax.jit(fn), args, steps)
        ref = out if ref is None else ref
        row["ms"][name], row["rel_diff"][name] = ms, rel(ref, out)
    if torch_ms is not None:
        row["ms"]["torch"] = torch_ms
    cells = "  ".join(f"{k} {v:.2f}" for k, v in row["ms"].items())
    print(f"{op:22s} {shape:22s} {cells}  (ms)", flush=True)
    return row


# ------------------------------------------------------------------------------- the stem
def stem_conv(x, w):
    return lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=NHWC)


def stem_patches(x):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    ho, wo = h // 2, wd // 2
    windows = [
        lax.slice(xp, (0, dy, dx, 0), (n, dy + 2 * ho - 1, dx + 2 * wo - 1, c), (1, 2, 2, 1))
        for dy in range(7)
        for dx in range(7)
    ]
    return jnp.concatenate(windows, -1)


def space_to_depth(x):
    """[N, 224, 224, 3] padded by 3 -> [N, 115, 115, 12] (2x2 blocks as channels)."""
    n, _, _, c = x.shape
    xp = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    hs, ws = xp.shape[1] // 2, xp.shape[2] // 2
    return xp.reshape(n, hs, 2, ws, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, 4 * c)


def space_to_depth_kernel(w):
    """[7, 7, C, O] padded to 8x8 -> the 4x4 kernel over 4C channels."""
    c, o = w.shape[2:]
    wp = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(4, 2, 4, 2, c, o)
    return wp.transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, o)


def stem_s2d(x, w):
    z, k = space_to_depth(x), space_to_depth_kernel(w)
    return lax.conv_general_dilated(z, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC)


def stem_s2d_kernel_grad(x, g):
    z = space_to_depth(x)
    n, hs, ws, c4 = z.shape
    ho, wo = hs - 3, ws - 3
    rows = g.reshape(-1, g.shape[-1])
    taps = [
        lax.dot_general(
            z[:, dy : dy + ho, dx : dx + wo].reshape(-1, c4), rows, (((0,), (0,)), ((), ()))
        )
        for dy in range(4)
        for dx in range(4)
    ]
    c = c4 // 4
    k = jnp.stack(taps).reshape(4, 4, 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5)
    return k.reshape(8, 8, c, -1)[:7, :7]


def stem_rows(batch: int, steps: int, torch) -> list[dict]:
    x, w, g = randn(batch, 224, 224, 3), randn(7, 7, 3, 64) * 0.1, randn(batch, 112, 112, 64)
    t_fwd = t_kg = None
    if torch is not None:
        xt, conv = torch.randn(batch, 3, 224, 224), torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        with torch.inference_mode():
            t_fwd = torch_ms(lambda: conv(xt), steps)
        y = conv(xt)
        t_kg = torch_weight_grad_ms(torch, conv, y, torch.randn_like(y), steps)
    fwd = {
        "xla": stem_conv,
        "patches@w": lambda x, w: stem_patches(x) @ w.reshape(147, 64),
        "space_to_depth": stem_s2d,
    }
    kg = {
        "xla": lambda x, w, g: jax.vjp(lambda w_: stem_conv(x, w_), w)[1](g)[0],
        "patches^T g": lambda x, w, g: lax.dot_general(
            stem_patches(x), g, (((0, 1, 2), (0, 1, 2)), ((), ()))
        ).reshape(7, 7, 3, 64),
        "s2d taps": lambda x, w, g: stem_s2d_kernel_grad(x, g),
    }
    return [
        compare("stem_forward", "8x224x224x3 -> 64", fwd, (x, w), steps, t_fwd),
        compare("stem_kernel_grad", "8x224x224x3 -> 64", kg, (x, w, g), steps, t_kg),
    ]


# ---------------------------------------------------------------- DenseNet's 3x3 kernel gradient
def conv3x3(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def shifted_gradient_kernel_grad(x, g):
    """dW[t] = sum_q xpad[q] gpad[q - o_t] on the flattened padded grid, with the nine
    shifted copies of g written by dynamic-update-slices ([9, R, Cout])."""
    n, h, wd, cin = x.shape
    cout, w2 = g.shape[-1], wd + 2
    r = n * (h + 2) * w2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(r, cin)
    gp = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(r, cout)
    shifted = jnp.zeros((9, r, cout), g.dtype)
    for t, o in enumerate(dy * w2 + dx for dy in range(3) for dx in range(3)):
        shifted = lax.dynamic_update_slice(shifted, gp[None, : r - o], (t, o, 0))
    k = lax.dot_general(shifted, xp, (((1,), (0,)), ((), ())))  # [9, Cout, Cin]
    return k.reshape(3, 3, cout, cin).transpose(0, 1, 3, 2)


def dense3x3_rows(batch: int, steps: int, torch) -> list[dict]:
    rows = []
    for hw in (56, 28, 14):
        x, w, g = randn(batch, hw, hw, 128), randn(3, 3, 128, 32) * 0.1, randn(batch, hw, hw, 32)
        t = None
        if torch is not None:
            xt, conv = (
                torch.randn(batch, 128, hw, hw),
                torch.nn.Conv2d(128, 32, 3, padding=1, bias=False),
            )
            y = conv(xt)
            t = torch_weight_grad_ms(torch, conv, y, torch.randn_like(y), steps)
        cands = {
            "xla": lambda x, w, g: jax.vjp(lambda w_: conv3x3(x, w_), w)[1](g)[0],
            "shifted g": lambda x, w, g: shifted_gradient_kernel_grad(x, g),
        }
        rows.append(
            compare(
                "dense3x3_kernel_grad", f"{batch}x{hw}x{hw} 128->32", cands, (x, w, g), steps, t
            )
        )
    return rows


# ------------------------------------------------------------------ 1x1 kernel-gradient products
def product_rows(batch: int, steps: int) -> list[dict]:
    rows = []
    for hw, cin in ((14, 768), (14, 256), (28, 384), (56, 192)):
        r = batch * hw * hw
        x, g = randn(r, cin), randn(r, 128)
        cands = {
            "x^T g": lambda x, g: lax.dot_general(jax.nn.relu(x), g, (((0,), (0,)), ((), ()))),
            "transposed x, then NN": lambda x, g: _materialise(jax.nn.relu(x).T) @ g,
        }
        rows.append(compare("kernel_grad_product", f"[{r},{cin}]^T[{r},128]", cands, (x, g), steps))
    return rows


# ------------------------------------------------------------------------ BatchNorm backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_variadic(x, scale, bias, epsilon: float):
    return batch_norm._fwd(x, scale, bias, epsilon)[0]


def _variadic_bwd(epsilon, residuals, cotangents):
    x, mean, var, scale = residuals
    g = cotangents[0]
    axes, count = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    rstd = lax.rsqrt(var + epsilon)
    x_hat = (x - mean) * rstd
    zero = jnp.zeros((), x.dtype)
    d_bias, d_scale = lax.reduce(
        (g, g * x_hat), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), axes
    )
    d_x = (scale * rstd / count) * (count * g - d_bias - x_hat * d_scale)
    return d_x, d_scale, d_bias


batch_norm_variadic.defvjp(batch_norm._fwd, _variadic_bwd)


def bn_rows(batch: int, steps: int) -> list[dict]:
    rows = []
    for hw, c in ((56, 192), (28, 384), (14, 768)):
        x, w = randn(batch, hw, hw, c), randn(c, 128) * 0.05
        scale, bias = jnp.ones(c), jnp.full((c,), 0.1)

        def chain(bn):
            def loss(inputs, s, b, kernel):
                return jnp.sum(jax.nn.relu(bn(inputs, s, b, 1e-5)[0]) @ kernel)

            return jax.grad(loss, argnums=(0, 1, 2, 3))

        cands = {
            "two reductions": chain(batch_norm.batch_norm_train),
            "variadic": chain(batch_norm_variadic),
        }
        rows.append(
            compare("bn_backward", f"{batch}x{hw}x{hw}x{c}", cands, (x, scale, bias, w), steps)
        )
    return rows


# ------------------------------------------------------------------------------------ torch
def import_torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def torch_ms(fn, steps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def torch_weight_grad_ms(torch, conv, y, gt, steps: int) -> float:
    """torch's kernel gradient of `conv` alone (autograd.grad w.r.t. its weight)."""
    return torch_ms(lambda: torch.autograd.grad(y, conv.weight, gt, retain_graph=True), steps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch = import_torch()
    print(
        f"load average {os.getloadavg()}; torch {'absent' if torch is None else torch.__version__}"
    )
    rows = stem_rows(args.batch, args.steps, torch)
    rows += dense3x3_rows(args.batch, args.steps, torch)
    rows += product_rows(args.batch, args.steps)
    rows += bn_rows(args.batch, args.steps)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "load_average": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
