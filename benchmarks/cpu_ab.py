"""Before and after issue 14's CPU changes, on the public train/eval/Grad-CAM calls of cpu.py.

    JAX_PLATFORMS=cpu python benchmarks/cpu_ab.py --arch=resnet50 --workload=train \
        --variants=,k,kp,kpb,kpbf,kpbfm,kpbfmw,kpbfmwt,kpbfmwtg,kpbfmwtgr,kpbfmwtgrc,kpbfmwtgrcd,kpbfmwtgrcds,kpbfmwtgrcdsa,kpbfmwtgrcdsav,kpbfmwtgrcdsavo,kpbfmwtgrcdsavon [--rounds=5] [--image_size=224] [--width=1.0]

A variant is a set of letters, each switching one change on (none: XLA's own gradients,
as before issue 14):

  k  matrix-product kernel gradients (`kernel_grad.uses_matmul_kernel_grad`)
  p  the tap-by-tap max-pool backward (`layers.max_pool_3x3_s2`)
  b  BatchNorm's written-out training backward (`batch_norm.BatchNorm`)
  f  1x1 convolutions as products forward (`kernel_grad.MATMUL_1X1_FORWARD`; implies k)
  m  the max-pool backward's incoming gradient computed once (`layers.MATERIALISE_POOL_GRAD`)
  t  3x3 convolutions with few output channels as one product and nine shifted sums
     (`kernel_grad.TAPS_3X3_FORWARD`: DenseNet121's 128 -> 32)
  w  the max-pool forward as the maximum of nine strided windows (`layers._max_of_windows`;
     without it one reduce-window)
  g  3x3 stride-1 kernel gradients as one product with the output gradient shifted nine
     times (`kernel_grad.SHIFTED_3X3_KERNEL_GRAD`; without it XLA's own)
  r  3x3 kernel gradients with 64 or more outputs as one product per tap
     (`kernel_grad.TAP_KERNEL_GRAD_MIN_ROWS`; without it XLA's own)
  c  DenseNet121's dense layers take their BatchNorm statistics chunk by chunk, each
     chunk's computed once (`densenet.CHUNK_STATS`)
  d  each dense layer's input gradient computed once before it is split into its chunks
     (`densenet.MATERIALISE_INPUT_GRAD`)
  s  the stem's kernel gradient in space-to-depth form
     (`kernel_grad.SPACE_TO_DEPTH_MIN_ROWS`; without it XLA's own)
  a  Adam's update written out with the non-finite guard folded in
     (`guarded_update.WRITE_OUT_ADAM`; without it optax's update, then the guard)
  v  BatchNorm's d_scale as rstd * sum(g * (x - mean)), which reads the forward's x - mean
     (`batch_norm.SCALE_AFTER_SUM`; without it sum(g * x_hat), x_hat in a buffer of its own)
  o  each ResNet50 bottleneck's output computed once into its own buffer
     (`resnet.MATERIALISE_BLOCK_OUTPUT`)
  n  DenseNet121's dense layers normalise the joined x - mean of their chunks
     (`densenet.CENTRED_CHUNKS`; needs c)
  e  the nine shifts of `g` channel-major, so that the product is a plain one
     (`kernel_grad.TRANSPOSED_NINE_SHIFTS`; needs g)
  x  `kernel_gradient`'s per-tap products reading g transposed into a buffer once, so that
     each is a plain product (`kernel_grad.TRANSPOSED_ROW_PRODUCTS`; needs k or r)
  u  each parameter's offset into Adam's flat update given at run time, so that parameters
     of one shape share one update kernel (`guarded_update.RUNTIME_OFFSETS`; needs a)

Every variant is compiled first (its first-call seconds printed), then the variants are
timed in turn, `--rounds` times each, interleaved so that a change in the machine's load
hits them alike (the order reverses every round);
the median per variant is printed. Batch 8, float32, random weights, as
cpu.py. Run it on a quiet machine; XLA flags go in XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import cpu  # noqa: E402  (benchmarks/cpu.py: ours_makers, the public calls)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from xmedjax import guarded_update  # noqa: E402
from xmedjax import mesh as mesh_lib  # noqa: E402
from xmedjax.models import batch_norm, densenet, kernel_grad, layers, resnet  # noqa: E402

ORIGINAL = (
    kernel_grad.uses_matmul_kernel_grad,
    layers.max_pool_3x3_s2,
    batch_norm.BatchNorm.__call__,
    layers._max_of_windows,
)
ALL = "kpbfmwtgrcdsavonexu"
TAP_MIN_ROWS = kernel_grad.TAP_KERNEL_GRAD_MIN_ROWS
S2D_MIN_ROWS = kernel_grad.SPACE_TO_DEPTH_MIN_ROWS


def select(variant: str) -> None:
    """Switch the changes named by `variant`'s letters on, every other one off."""
    matmul = "k" in variant or "f" in variant
    kernel_grad.uses_matmul_kernel_grad = ORIGINAL[0] if matmul else (lambda *a, **k: False)
    kernel_grad.MATMUL_1X1_FORWARD = "f" in variant
    layers.max_pool_3x3_s2 = ORIGINAL[1] if "p" in variant else layers.max_pool_3x3_s2_plain
    batch_norm.BatchNorm.__call__ = ORIGINAL[2] if "b" in variant else nnx.BatchNorm.__call__
    layers.MATERIALISE_POOL_GRAD = "m" in variant
    kernel_grad.TAPS_3X3_FORWARD = "t" in variant
    kernel_grad.SHIFTED_3X3_KERNEL_GRAD = "g" in variant
    kernel_grad.TAP_KERNEL_GRAD_MIN_ROWS = TAP_MIN_ROWS if "r" in variant else None
    densenet.CHUNK_STATS = "c" in variant
    densenet.MATERIALISE_INPUT_GRAD = "d" in variant
    kernel_grad.SPACE_TO_DEPTH_MIN_ROWS = S2D_MIN_ROWS if "s" in variant else None
    guarded_update.WRITE_OUT_ADAM = "a" in variant
    guarded_update.RUNTIME_OFFSETS = "u" in variant
    batch_norm.SCALE_AFTER_SUM = "v" in variant
    resnet.MATERIALISE_BLOCK_OUTPUT = "o" in variant
    densenet.CENTRED_CHUNKS = "n" in variant
    kernel_grad.TRANSPOSED_NINE_SHIFTS = "e" in variant
    kernel_grad.TRANSPOSED_ROW_PRODUCTS = "x" in variant
    layers._max_of_windows = ORIGINAL[3] if "w" in variant else layers.max_pool_3x3_s2_plain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=cpu.ARCHS)
    parser.add_argument("--workload", default="train", choices=cpu.WORKLOADS)
    parser.add_argument("--variants", default="," + ALL, help="comma-separated; '' = before")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = {"image": args.image_size, "width": args.width}
    mesh = mesh_lib.make_mesh()
    calls = {}
    for variant in args.variants.split(","):
        select(variant)
        t0 = time.perf_counter()
        call, _ = cpu.ours_makers(cfg, mesh)[args.workload](args.arch, "float32")
        call()
        name = variant or "before"
        print(f"{name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
        calls[name] = call
    select(ALL)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(args.rounds):
        for name in list(calls)[:: -1 if round_ % 2 else 1]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"{args.arch} {args.workload}, batch {cpu.BATCH}, {args.image_size} px:")
    for name, values in times.items():
        median, low = float(np.median(values)), float(np.min(values))
        quartile = float(np.percentile(values, 25))
        print(
            f"  {name:<8} median {median:.4f} s  {cpu.BATCH / median:7.2f} img/s"
            f"  (fastest {low:.4f} s, first quartile {quartile:.4f} s)"
        )
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
