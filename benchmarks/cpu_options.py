"""XLA:CPU compiler options on our whole train (or eval) step, interleaved in one process.

    python benchmarks/cpu_options.py --arch=densenet121 [--rounds=8] \
        --variant='O1={"xla_backend_optimization_level": 1}' \
        --variant='no_ynn_reduce={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}'

The step of benchmarks/gpu.py's `build_train` (the public `train_state.jit_train_step`, batch
8, 224 px, float32, random weights) is lowered once and compiled once per variant with
`Lowered.compile(compiler_options=...)`; "default" (no options) is always the first. Each
variant's compile seconds are printed; then the variants are timed in turn, `--rounds` times
each, so that a change in the machine's speed hits them alike (each variant keeps its own
copy of the train state, the step donates it). Prints the median, fastest and first
quartile per variant. Unlike XLA_FLAGS, this compares options within one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gpu  # noqa: E402  (benchmarks/gpu.py: build_train)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from xmedjax import mesh as mesh_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("resnet50", "densenet121"), default="densenet121")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument(
        "--variant", action="append", default=[], help="NAME=JSON dict of compiler options"
    )
    args = p.parse_args(argv)
    variants = {"default": {}}
    for spec in args.variant:
        name, sep, options = spec.partition("=")
        if not sep:
            p.error(f"--variant {spec!r}: expected NAME=JSON")
        try:
            variants[name] = json.loads(options)
        except json.JSONDecodeError as exc:
            p.error(f"--variant {name}: not JSON ({exc})")
    args.variants = variants
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    mesh = mesh_lib.make_mesh()
    sz = {"image": args.image_size, "width": args.width}
    step, state, data = gpu.build_train(args.arch, "float32", 8, sz, mesh)
    lowered = step.lower(state, data)
    run, held = {}, {}
    for name, options in args.variants.items():
        t0 = time.perf_counter()
        run[name] = lowered.compile(compiler_options=options or None)
        seconds = time.perf_counter() - t0
        held[name] = jax.tree.map(lambda a: a.copy(), state)
        for _ in range(2):
            _call(run[name], held, name, data)
        print(f"{name}: compiled in {seconds:.1f} s  {options}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(args.rounds):
        for name in run:
            t0 = time.perf_counter()
            _call(run[name], held, name, data)
            times[name].append(time.perf_counter() - t0)
    print(f"\n{args.arch} train step, seconds over {args.rounds} rounds")
    for name, ts_ in times.items():
        ts_ = sorted(ts_)
        print(
            f"{name:16s} median {np.median(ts_):.3f}  fastest {ts_[0]:.3f}  "
            f"first quartile {ts_[len(ts_) // 4]:.3f}"
        )


def _call(compiled, held: dict, name: str, data) -> None:
    """One train step of `compiled`; its new state replaces the donated one."""
    held[name], metrics = compiled(held[name], data)
    jax.block_until_ready(metrics["loss"])


if __name__ == "__main__":
    main()
