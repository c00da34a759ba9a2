"""The three hand-written backward passes of issue 14 against what XLA derives, op by op.

    python benchmarks/cpu_kernels.py [--out=FILE.json] [--steps=5] [--batch=8]

For every distinct convolution of ResNet50 at 224 px (batch 8, float32) it times the kernel
gradient two ways, each its own jitted program on the same inputs: XLA's own
(`jax.vjp` of `lax.conv_general_dilated` w.r.t. the kernel) and the matrix products of
`xmedjax.models.kernel_grad.kernel_gradient`; then the stem's max-pool backward (JAX's
reduce-window rule vs `layers.max_pool_3x3_s2`'s) and forward (one reduce-window vs the
maximum of nine strided windows) and BatchNorm forward + backward (autodiff of
`nnx.BatchNorm` vs `batch_norm.BatchNorm`); last, every 3x3 stride-1 convolution of both
models, XLA's kernel gradient against `kernel_grad.shifted_kernel_gradient` (the two calls
alternating, as XLA's own swings 2-4x with the host's cache pressure at 56 px). Each row also gives the largest difference
between the two results relative to the largest value (rounding only). `taken` says whether
`kernel_grad.uses_matmul_kernel_grad` or `uses_tap_kernel_grad` (`uses_shifted_kernel_grad`
for the last rows)
routes that shape to the matrix products: the rule this table justifies; `--batch=32` shows
the rule's dependence on the batch. Median of --steps calls after one warm-up; run it on a quiet machine
(it prints the load average; the full step is `benchmarks/cpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from xmedjax.models import batch_norm, kernel_grad, layers  # noqa: E402

# ResNet50's convolutions at 224 px: (input size, kernel, stride, in, out, how many)
RESNET50_CONVS = (
    (224, 7, 2, 3, 64, 1),
    (56, 1, 1, 64, 64, 1),
    (56, 3, 1, 64, 64, 3),
    (56, 1, 1, 64, 256, 4),
    (56, 1, 1, 256, 64, 2),
    (56, 1, 1, 256, 128, 1),
    (56, 3, 2, 128, 128, 1),
    (56, 1, 2, 256, 512, 1),
    (28, 1, 1, 128, 512, 4),
    (28, 1, 1, 512, 128, 3),
    (28, 3, 1, 128, 128, 3),
    (28, 1, 1, 512, 256, 1),
    (28, 3, 2, 256, 256, 1),
    (28, 1, 2, 512, 1024, 1),
    (14, 1, 1, 256, 1024, 6),
    (14, 1, 1, 1024, 256, 5),
    (14, 3, 1, 256, 256, 5),
    (14, 1, 1, 1024, 512, 1),
    (14, 3, 2, 512, 512, 1),
    (14, 1, 2, 1024, 2048, 1),
    (7, 1, 1, 512, 2048, 3),
    (7, 1, 1, 2048, 512, 2),
    (7, 3, 1, 512, 512, 2),
)

# Both models' 3x3 stride-1 convolutions: (input size, in, out, how many), DenseNet121 first
SHIFTED_CONVS = (
    ("densenet121", 56, 128, 32, 6),
    ("densenet121", 28, 128, 32, 12),
    ("densenet121", 14, 128, 32, 24),
    ("densenet121", 7, 128, 32, 16),
    ("resnet50", 56, 64, 64, 3),
    ("resnet50", 28, 128, 128, 3),
    ("resnet50", 14, 256, 256, 5),
    ("resnet50", 7, 512, 512, 2),
)


def median_ms(fn, args, steps: int) -> tuple[float, jax.Array]:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, out


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def conv_rows(batch: int, steps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size, k, stride, cin, cout, count in RESNET50_CONVS:
        pad = k // 2
        pads = ((pad, pad), (pad, pad))
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
        w = jnp.zeros((k, k, cin, cout), jnp.float32)
        out = (size + 2 * pad - k) // stride + 1
        g = jnp.asarray(rng.standard_normal((batch, out, out, cout)), jnp.float32)

        def xla(x, w, g, stride=stride, pads=pads):
            conv = lambda w: lax.conv_general_dilated(  # noqa: E731
                x, w, (stride, stride), pads, dimension_numbers=kernel_grad.NHWC
            )
            return jax.vjp(conv, w)[1](g)[0]

        def ours(x, w, g, stride=stride, pads=pads):
            return kernel_grad.kernel_gradient(x, g, w.shape, (stride, stride), pads)

        t_xla, ref = median_ms(jax.jit(xla), (x, w, g), steps)
        t_ours, got = median_ms(jax.jit(ours), (x, w, g), steps)
        rows.append(
            {
                "op": f"conv {k}x{k}/{stride} {cin}->{cout} at {size}",
                "count": count,
                "xla_ms": round(t_xla, 2),
                "ours_ms": round(t_ours, 2),
                "rel_diff": rel_diff(got, ref),
                "taken": kernel_grad.uses_matmul_kernel_grad(w.shape, pads, kernel_grad.NHWC)
                or kernel_grad.uses_tap_kernel_grad(
                    x.shape, w.shape, (stride, stride), pads, kernel_grad.NHWC
                ),
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


def pool_row(batch: int, steps: int) -> dict:
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.maximum(rng.standard_normal((batch, 112, 112, 64)), 0), jnp.float32)

    plain = layers.max_pool_3x3_s2_plain
    g = jnp.asarray(rng.standard_normal(plain(x).shape), jnp.float32)
    t_xla, ref = median_ms(jax.jit(lambda x, g: jax.vjp(plain, x)[1](g)[0]), (x, g), steps)
    t_ours, got = median_ms(
        jax.jit(lambda x, g: jax.vjp(layers.max_pool_3x3_s2, x)[1](g)[0]), (x, g), steps
    )
    return _pool_row("max-pool 3x3/2 backward at 112x112x64", t_xla, t_ours, got, ref)


def _pool_row(op: str, t_xla: float, t_ours: float, got, ref) -> dict:
    row = {
        "op": op,
        "count": 1,
        "xla_ms": round(t_xla, 2),
        "ours_ms": round(t_ours, 2),
        "rel_diff": rel_diff(got, ref),
        "taken": True,
    }
    print(_line(row), flush=True)
    return row


def pool_forward_row(batch: int, steps: int) -> dict:
    """The stem max pool's forward: one reduce-window vs the maximum of nine windows."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((batch, 112, 112, 64)), jnp.float32)
    t_xla, ref = median_ms(jax.jit(layers.max_pool_3x3_s2_plain), (x,), steps)
    t_ours, got = median_ms(jax.jit(layers.max_pool_3x3_s2), (x,), steps)
    return _pool_row("max-pool 3x3/2 forward at 112x112x64", t_xla, t_ours, got, ref)


def batch_norm_rows(batch: int, steps: int) -> list[dict]:
    rows = []
    for size, ch in ((56, 256), (14, 1024)):
        x = jnp.asarray(np.random.default_rng(2).standard_normal((batch, size, size, ch)))
        x = x.astype(jnp.float32)
        timed = {}
        for name, cls in (("xla", nnx.BatchNorm), ("ours", batch_norm.BatchNorm)):
            bn = cls(ch, use_fast_variance=False, rngs=nnx.Rngs(0))
            bn.train()
            grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1)))
            timed[name] = median_ms(grads, (bn, x), steps)
        row = {
            "op": f"BatchNorm fwd+bwd (train) at {size}x{size}x{ch}",
            "count": 1,
            "xla_ms": round(timed["xla"][0], 2),
            "ours_ms": round(timed["ours"][0], 2),
            "rel_diff": rel_diff(timed["ours"][1][1], timed["xla"][1][1]),
            "taken": True,
        }
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def interleaved_ms(fns: dict, args, steps: int) -> dict:
    """name -> (median ms, output); the calls alternate, the first of each round too."""
    outs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for step in range(steps):
        for name in list(fns)[:: 1 if step % 2 else -1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(times[name])) * 1e3, outs[name]) for name in fns}


def shifted_rows(batch: int, steps: int) -> list[dict]:
    """3x3 stride-1 kernel gradients: XLA's own vs `shifted_kernel_gradient`."""
    rng = np.random.default_rng(3)
    pads = ((1, 1), (1, 1))
    rows = []
    for arch, size, cin, cout, count in SHIFTED_CONVS:
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((batch, size, size, cout)), jnp.float32)
        w = jnp.zeros((3, 3, cin, cout), jnp.float32)

        def xla(x, g, w=w):
            conv = lambda w: lax.conv_general_dilated(  # noqa: E731
                x, w, (1, 1), pads, dimension_numbers=kernel_grad.NHWC
            )
            return jax.vjp(conv, w)[1](g)[0]

        timed = interleaved_ms(
            {"xla": jax.jit(xla), "ours": jax.jit(kernel_grad.shifted_kernel_gradient)},
            (x, g),
            max(steps, 10),
        )
        row = {
            "op": f"{arch} 3x3/1 {cin}->{cout} at {size} (shifted)",
            "count": count,
            "xla_ms": round(timed["xla"][0], 2),
            "ours_ms": round(timed["ours"][0], 2),
            "rel_diff": rel_diff(timed["ours"][1], timed["xla"][1]),
            "taken": kernel_grad.uses_shifted_kernel_grad(
                x.shape, w.shape, (1, 1), pads, kernel_grad.NHWC
            ),
        }
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    mark = "*" if r["taken"] else " "
    return (
        f"{mark} {r['op']:<46} x{r['count']:<2} xla {r['xla_ms']:8.2f} ms  "
        f"ours {r['ours_ms']:8.2f} ms  diff {r['rel_diff']:.1e}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    print("load average before:", os.getloadavg(), "(* = taken by the model)")
    rows = conv_rows(args.batch, args.steps)
    rows.append(pool_row(args.batch, args.steps))
    rows.append(pool_forward_row(args.batch, args.steps))
    rows += batch_norm_rows(args.batch, args.steps)
    shifted = shifted_rows(args.batch, args.steps)
    rows += shifted
    convs = [r for r in rows if r["op"].startswith("conv")]
    total = {
        "xla_ms": sum(r["xla_ms"] * r["count"] for r in convs),
        "taken_ms": sum(r[("ours_ms" if r["taken"] else "xla_ms")] * r["count"] for r in convs),
    }
    print(
        f"ResNet50 kernel gradients per step: XLA {total['xla_ms']:.0f} ms, "
        f"as the model takes them {total['taken_ms']:.0f} ms"
    )
    three = {}
    for arch in ("resnet50", "densenet121"):
        mine = [r for r in shifted if r["op"].startswith(arch)]
        three[arch] = {
            "xla_ms": sum(r["xla_ms"] * r["count"] for r in mine),
            "taken_ms": sum(r[("ours_ms" if r["taken"] else "xla_ms")] * r["count"] for r in mine),
        }
        print(
            f"{arch} 3x3 stride-1 kernel gradients per step: XLA {three[arch]['xla_ms']:.0f} ms,"
            f" as the model takes them {three[arch]['taken_ms']:.0f} ms"
        )
    print("load average after:", os.getloadavg())
    if args.out:
        out = {"rows": rows, "resnet50_kernel_gradients": total, "kernel_gradients_3x3": three}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
