"""One process's train step from nothing to steady state: where the first call's time goes.

    python benchmarks/cpu_first_call.py --arch=densenet121 [--steps=8] [--image_size=224]

Builds `gpu.build_train`'s step (the public `train_state.jit_train_step`, batch 8, float32,
random weights, as cpu.py), then times its first call and `--steps` more calls (median and
fastest), with the page faults of each call (`ru_minflt`) and what `import xmedjax` set up
(`host_memory`'s STATUS, DISPATCH, HUGE_PAGES). One line, `RESULT ...`, says it all. Compare settings or commits process by
process, alternating (e.g. `XMEDJAX_HOST_MALLOC=system`, or another checkout with
`PYTHONPATH`): the allocator options act per process, before JAX's threads start.

`--first=call` (the default) times the public first call, as cpu.py's `*_compile_s`, split
by JAX's compile events, with what `heap_warming` did; `--heap_warming=off` and
`--gc_pause=off` are A/B switches of `xmedjax/first_call.py`. `--first=stages` times the
trace, lowering, XLA compile and first execution one after the other (no warming, no
collector pause).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gpu  # noqa: E402  (benchmarks/gpu.py: build_train)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import monitoring  # noqa: E402  (JAX's compile events, as cpu.py uses)

import xmedjax  # noqa: E402, F401  (before any JAX computation: xmedjax/host_memory.py)
from xmedjax import first_call, heap_warming, host_memory  # noqa: E402
from xmedjax import mesh as mesh_lib  # noqa: E402

COMPILE_EVENTS = (  # as cpu.py's: trace, lowering, XLA compile
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("resnet50", "densenet121"), default="densenet121")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument(
        "--first",
        choices=("call", "stages"),
        default="call",
        help="call: the public first call, split by JAX's compile events (heap warming "
        "included); stages: trace, lower, compile and execute one after the other",
    )
    p.add_argument(
        "--heap_warming",
        choices=("on", "off"),
        default="on",
        help="off: train_state.jit_train_step without heap_warming (an A/B switch)",
    )
    p.add_argument(
        "--gc_pause",
        choices=("on", "off"),
        default="on",
        help="off: first calls with Python's garbage collector running (an A/B switch)",
    )
    args = p.parse_args(argv)
    heap_warming.ENABLED = args.heap_warming != "off"
    first_call.PAUSE_GC = args.gc_pause != "off"
    mesh = mesh_lib.make_mesh()
    sz = {"image": args.image_size, "width": args.width}
    step, state, data = gpu.build_train(args.arch, "float32", 8, sz, mesh)
    seconds, faults = [], []
    if args.first == "stages":
        t0 = time.perf_counter()
        traced = step.trace(state, data)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        split = f"trace {t1 - t0:.2f} s, lower {t2 - t1:.2f} s, XLA compile {t3 - t2:.2f} s, "
    else:
        events = {name: 0.0 for name in COMPILE_EVENTS}

        def listen(event: str, duration: float, **_) -> None:
            if event in events:
                events[event] += duration

        monitoring.register_event_duration_secs_listener(listen)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics["loss"])
        total = time.perf_counter() - t0
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        monitoring.unregister_event_duration_listener(listen)
        trace, lower, xla = (events[name] for name in COMPILE_EVENTS)
        split = (
            f"first call {total:.2f} s: trace {trace:.2f} s, lower {lower:.2f} s, XLA compile "
            f"{xla:.2f} s, the rest {total - trace - lower - xla:.2f} s ({heap_warming.LAST}); "
        )
        seconds.append(total)
        compiled = step
    for _ in range(1 + args.steps - len(seconds)):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
        seconds.append(time.perf_counter() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    steady = seconds[1:]
    if args.first == "stages":
        split += f"first execution {seconds[0]:.2f} s, "
    print(
        f"RESULT {args.arch} {split}"
        f"steady median {np.median(steady):.3f} s (fastest {min(steady):.3f}); "
        f"page faults first {faults[0]}, then median {int(np.median(faults[1:]))}; "
        f"host_memory: {host_memory.STATUS} | {host_memory.DISPATCH} | {host_memory.HUGE_PAGES}",
        flush=True,
    )


if __name__ == "__main__":
    main()
