"""Ours against torchvision eager and pytorch-grad-cam on the same CPU, in one call (issue 14).

    python benchmarks/cpu.py --out=/tmp/cpu.json [--archs=resnet50,densenet121] [--steps=8]
        [--warmup=2] [--image_size=224] [--bf16] [--xla_flags="--xla_cpu_use_onednn=true"]
        [--peer_site=/tmp/xmedjax-cpu-peers] [--peer_python=PYTHON] [--cache_dir=DIR]
    python benchmarks/cpu.py --dry_run --out=/tmp/cpu.json   # tiny sizes: checks code, measures nothing

What one call measures (float32, batch 8, 224 px, 2 classes, random weights, Adam lr 1e-4):

  NAME (ARCH = resnet50, densenet121)  ours, through the public API      peer, same call
  ARCH_train_bs8                       train_state.jit_train_step          torchvision eager step, Adam
  ARCH_infer_bs8                       train_state.jit_eval_step (logits)  torchvision eval(), inference_mode
  ARCH_gradcam_bs8                     explain.grad_cam, maps to numpy     pytorch-grad-cam 1.5.7 GradCAM
  ARCH_{train,infer,gradcam}_compile_s first call: trace + XLA compile +   first call (eager: no compile,
                                       one run (no persistent cache)       oneDNN primitives are made)
  ..._bf16 rows (--bf16 only)          create_model(dtype=bfloat16)        torch.autocast("cpu", bfloat16)

img/s = batch / median time of --steps timed calls, after --warmup calls (the first of which is
the *_compile_s figure); every call waits for its result (`block_until_ready`; the peers are
synchronous on a CPU). `ratio` is "how many times better ours is": ours/peer for img/s,
peer/ours for seconds. A side that did not run (architecture not asked for, torch,
torchvision or pytorch-grad-cam missing, a failure) is null, never a made-up number.

JSON (`--out`): {"meta": {cpu, flags, versions, load averages, settings, details per row},
"benchmarks": {NAME: {"ours", "peer", "ratio", "unit"}}}, rewritten after each architecture.

The peers run in a child process (`--peer_python`, default this Python; torch set to
--peer_threads threads, default every core, as XLA uses), which makes one call at a time
when asked. For each workload both sides first compile and warm up; then the timed calls
alternate, peer and ours in turn (the first of each pair alternating too), so that a
change in the machine's speed during the run (a shared host's neighbours: 20-40% from one
minute to the next here) hits both columns alike instead of one of them. The two frameworks
never run at the same time.

Torchvision beside the CPU torch. PyPI's x86_64 torchvision wheels are CUDA builds whose C
ops (nms, roi_align, image decoding) do not register beside the CPU torch wheel these
machines use: `import torchvision` stops in torchvision._meta_registrations ("operator
torchvision::nms does not exist"). The classification models and pytorch-grad-cam never call
those ops, so this script TOLERATES the missing registrations: when the plain import fails
that way, it re-imports torchvision with its two op-registration modules stubbed out (and
says so in meta.peer.torchvision_ops). Nothing is installed into the project's environment;
put the peers in a separate folder added to the child's path (--peer_site):

    pip install --no-deps --target /tmp/xmedjax-cpu-peers torchvision==0.28.0 grad-cam==1.5.7 \
        ttach opencv-python-headless     # torchvision 0.28 is torch 2.13's pair; grad-cam's
                                         # other needs (numpy, Pillow, tqdm, matplotlib,
                                         # scikit-learn, scipy) are in the project env already

A pinned matching pair in its own venv works too: `--peer_python=/tmp/pgc/bin/python` (see
tests/data/make_pgc_reference.py); then the peer's torch is that venv's, as meta records.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ARCHS = ("resnet50", "densenet121")
WORKLOADS = ("train", "infer", "gradcam")
BATCH = 8
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_compile_s",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (absl-style `--name=value` works too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="JSON output file ('' = print only)")
    p.add_argument("--dry_run", action="store_true", help="width 1/8, 32 px, 1 step: checks code")
    p.add_argument(
        "--archs", default=",".join(ARCHS), help="comma-separated subset of " + str(ARCHS)
    )
    p.add_argument("--steps", type=int, default=8, help="timed calls per workload")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first = compile")
    p.add_argument("--image_size", type=int, default=0, help="pixels (0 = 224, dry run 32)")
    p.add_argument("--bf16", action="store_true", help="also the _bf16 rows (vs torch autocast)")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS, recorded in meta")
    p.add_argument("--cache_dir", default="", help="persistent JAX cache ('' = off: cold compiles)")
    p.add_argument("--peer_python", default=sys.executable, help="Python that runs the peers")
    p.add_argument(
        "--peer_site",
        default=os.environ.get("XMEDJAX_PEER_SITE", ""),
        help="folder put first on the peer child's path (torchvision, grad-cam); "
        "default $XMEDJAX_PEER_SITE",
    )
    p.add_argument("--peer_threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--skip_peers", action="store_true", help="ours only (peer columns null)")
    p.add_argument("--_peer_server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(args.archs) - set(ARCHS))
    if unknown:
        p.error(f"--archs: unknown {unknown}; choose from {list(ARCHS)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first warm-up call is the compile)")
    return args


def settings(args: argparse.Namespace) -> dict:
    """Sizes and step counts of this call (a dry run: tiny, one timed step)."""
    return {
        "batch": BATCH,
        "image": args.image_size or (32 if args.dry_run else 224),
        "width": 0.125 if args.dry_run else 1.0,
        "warmup": 1 if args.dry_run else args.warmup,
        "steps": 1 if args.dry_run else args.steps,
        "precisions": ["float32", "bfloat16"] if args.bf16 else ["float32"],
        "dry_run": args.dry_run,
    }


def say(msg: str) -> None:
    print(f"[cpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key(arch: str, workload: str, precision: str) -> str:
    """The img/s row name: resnet50_train_bs8, densenet121_gradcam_bs8_bf16, ..."""
    return f"{arch}_{workload}_bs{BATCH}" + ("_bf16" if precision == "bfloat16" else "")


def compile_key(arch: str, workload: str, precision: str) -> str:
    """The first-call row name: resnet50_train_compile_s, resnet50_train_bf16_compile_s, ..."""
    return f"{arch}_{workload}" + ("_bf16" if precision == "bfloat16" else "") + "_compile_s"


def warm_up(call: Callable[[], Any], warmup: int) -> float:
    """The first call's seconds (the compile), then warmup - 1 more untimed calls."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        call()
    return first


def timed(call: Callable[[], Any]) -> float:
    """One call's seconds; `call` must return only when its result is ready."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def summary(first: float, times: list[float], what: str) -> dict:
    return {
        "first_s": first,
        "step_s": times,
        "img_s": BATCH / statistics.median(times),
        "what": what,
    }


def run_pairs(
    makers: dict,
    peer: PeerProcess | None,
    arch: str,
    cfg: dict,
    before: Callable[[], Any] | None = None,
    after: Callable[[], dict] | None = None,
) -> tuple[dict, dict]:
    """(ours, peers) for every (workload, precision) of `arch`: each side compiled and warmed
    up, then their timed calls alternating (`PeerProcess`); a failure is a note, never a
    number. `before` runs once our workload is built, just before its first call; `after`'s
    dict is merged into our entry (the compile split)."""
    ours: dict[str, dict] = {}
    peers: dict[str, dict] = {}
    for precision in cfg["precisions"]:
        for workload in WORKLOADS:
            name = key(arch, workload, precision)
            if peer is not None:
                peers[name] = peer.ask("build", arch=arch, workload=workload, precision=precision)
            call = what = None
            try:
                call, what = makers[workload](arch, precision)
                if before is not None:
                    before()
                ours[name] = {"first_s": warm_up(call, cfg["warmup"])}
            except Exception as exc:  # noqa: BLE001
                ours[name], call = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}, None
            peer_on = peer is not None and "error" not in peers[name]
            ours_times, peer_times = [], []
            for step in range(cfg["steps"]):
                for side in ("peer", "ours") if step % 2 == 0 else ("ours", "peer"):
                    if side == "peer" and peer_on:
                        reply = peer.ask("call")
                        if "error" in reply:  # the child failed or died: no peer number
                            peers[name], peer_on = reply, False
                        else:
                            peer_times.append(reply["s"])
                    elif side == "ours" and call is not None:
                        ours_times.append(timed(call))
            if call is not None:
                ours[name] = summary(ours[name]["first_s"], ours_times, what)
                ours[name].update(after() if after is not None else {})
            if peer_on:
                peers[name] = summary(peers[name]["first_s"], peer_times, peers[name]["what"])
                peer.ask("drop")
            for side, got in (("peer", peers.get(name)), ("ours", ours[name])):
                if got is not None:
                    say(
                        f"{side} {name}: "
                        + (
                            f"failed: {got['error']}"
                            if "error" in got
                            else f"{got['img_s']:.2f} img/s, first call {got['first_s']:.1f} s"
                        )
                    )
            call = None  # the model dies before the next one is built
    return ours, peers


# ============================================================================ peers (child)
def _import_torchvision() -> tuple[Any, str]:
    """torchvision, and how its C ops fared (see the module docstring)."""
    try:
        import torchvision

        return torchvision, "registered (C extension loaded)"
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
        first_error = str(exc)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    torchvision = importlib.import_module("torchvision")
    return torchvision, (
        f"tolerated: C ops absent ({first_error}); op-registration modules stubbed, "
        "models are pure Python and call none of those ops"
    )


def import_peers() -> tuple[dict, dict]:
    """{torch, torchvision, GradCAM, Target} (None where missing) and meta notes."""
    mods: dict[str, Any] = {"torch": None, "torchvision": None, "GradCAM": None, "Target": None}
    notes: dict[str, Any] = {}
    try:
        import torch

        mods["torch"] = torch
        mods["torchvision"], notes["torchvision_ops"] = _import_torchvision()
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        mods["GradCAM"], mods["Target"] = GradCAM, ClassifierOutputTarget
    except Exception as exc:  # noqa: BLE001
        notes["missing"] = f"{type(exc).__name__}: {exc}"
    for dist in ("torch", "torchvision", "grad-cam", "opencv-python-headless", "numpy"):
        try:
            notes[dist] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001
            notes[dist] = None
    if mods["torch"] is not None:
        notes["mkldnn"] = bool(mods["torch"].backends.mkldnn.is_available())
    return mods, notes


def peer_net(tv, arch: str, cfg: dict):
    """A torchvision model, 2 classes, random weights; narrow ones in a dry run."""
    if not cfg["dry_run"]:
        return getattr(tv.models, arch)(weights=None, num_classes=2)
    if arch == "resnet50":
        block = tv.models.resnet.Bottleneck
        return tv.models.resnet.ResNet(block, [3, 4, 6, 3], num_classes=2, width_per_group=8)
    return tv.models.DenseNet(4, (6, 12, 24, 16), num_init_features=8, num_classes=2)


def peer_makers(mods: dict, cfg: dict) -> dict:
    """workload -> (arch, precision) -> (call, what), torch side."""
    torch, tv = mods["torch"], mods["torchvision"]
    size = cfg["image"]

    def autocast(precision):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def train(arch, precision):
        net = peer_net(tv, arch, cfg).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x, y = torch.randn(BATCH, 3, size, size), torch.randint(0, 2, (BATCH,))

        def call():
            opt.zero_grad(set_to_none=True)
            with autocast(precision):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()

        return call, f"torchvision eager train step, Adam, {precision} (autocast for bf16)"

    def infer(arch, precision):
        net = peer_net(tv, arch, cfg).eval()
        x = torch.randn(BATCH, 3, size, size)

        def call():
            with torch.inference_mode(), autocast(precision):
                return net(x)

        return call, f"torchvision eval() forward under inference_mode, {precision}"

    def gradcam(arch, precision):
        if mods["GradCAM"] is None:
            raise RuntimeError("pytorch_grad_cam not importable")
        net, layer = cam_target(torch, peer_net(tv, arch, cfg).eval(), arch)
        cam = mods["GradCAM"](model=net, target_layers=[layer])
        x = torch.randn(BATCH, 3, size, size)
        targets = [mods["Target"](i % 2) for i in range(BATCH)]

        def call():
            with autocast(precision):
                return cam(input_tensor=x, targets=targets)  # numpy (B, H, W)

        return call, f"pytorch-grad-cam GradCAM, {precision} (autocast for bf16)"

    return {"train": train, "infer": infer, "gradcam": gradcam}


def cam_target(torch, net, arch: str):
    """(model, layer) for pytorch-grad-cam: ResNet50's layer4; DenseNet121 with its final
    ReLU out of place (torchvision's in-place one corrupts hooks on `features`)."""
    if arch == "resnet50":
        return net, net.layer4

    class OutOfPlace(torch.nn.Module):
        def __init__(self, dense):
            super().__init__()
            self.features, self.classifier = dense.features, dense.classifier
            self.relu = torch.nn.ReLU(inplace=False)

        def forward(self, x):
            pooled = torch.nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), 1)
            return self.classifier(torch.flatten(pooled, 1))

    wrapped = OutOfPlace(net)
    return wrapped, wrapped.relu


def peer_server(args: argparse.Namespace) -> None:
    """The child process: answers one JSON line per request line on stdin (`PeerProcess`).

    {"op": "notes"} -> the peers' versions; {"op": "build", arch, workload, precision} ->
    builds that workload, makes its first call and warm-up calls: {"first_s", "what"} or
    {"error"}; {"op": "call"} -> {"s": seconds of one call}; {"op": "drop"} -> {}. Anything
    else the child prints goes to stderr, so that stdout carries only the answers.
    """
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cfg = settings(args)
    mods, notes = import_peers()
    if mods["torchvision"] is not None:
        mods["torch"].set_num_threads(args.peer_threads)
        mods["torch"].manual_seed(0)
        notes["threads"] = mods["torch"].get_num_threads()
    makers = peer_makers(mods, cfg) if mods["torchvision"] is not None else None
    call = None
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {}
        try:
            if request["op"] == "notes":
                reply = notes
            elif request["op"] == "build":
                call = None
                if makers is None:
                    raise RuntimeError(f"peers not importable: {notes.get('missing')}")
                call, what = makers[request["workload"]](request["arch"], request["precision"])
                reply = {"first_s": warm_up(call, cfg["warmup"]), "what": what}
            elif request["op"] == "call":
                reply = {"s": timed(call)}
            elif request["op"] == "drop":
                call = None
        except Exception as exc:  # noqa: BLE001
            call, reply = None, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


class PeerProcess:
    """The peers' child process (`peer_server`): one request, one answer, one call at a time."""

    def __init__(self, args: argparse.Namespace):
        cmd = [args.peer_python, os.path.abspath(__file__), "--_peer_server"]
        cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}"]
        cmd += [f"--image_size={settings(args)['image']}", f"--peer_threads={args.peer_threads}"]
        cmd += ["--dry_run"] * args.dry_run + ["--bf16"] * args.bf16
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.peer_site:
            env["PYTHONPATH"] = os.pathsep.join(
                [args.peer_site] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            )
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.notes = self.ask("notes")

    def ask(self, op: str, **fields: Any) -> dict:
        """The child's answer to one request; {"error"} once the child has gone."""
        if self.proc.poll() is not None:
            return {"error": f"peer process exited with {self.proc.returncode}"}
        try:
            self.proc.stdin.write(json.dumps(dict(fields, op=op)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError as exc:
            return {"error": f"peer process unreachable: {exc}"}
        if not line:
            return {"error": f"peer process exited with {self.proc.wait()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ============================================================================ ours (JAX)
_COMPILE: dict[str, float] = {}


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event in COMPILE_EVENTS:
        name = COMPILE_EVENTS[event]
        _COMPILE[name] = _COMPILE.get(name, 0.0) + duration


def setup_jax(args: argparse.Namespace):
    """XLA_FLAGS (before JAX loads), the compile cache (off unless --cache_dir), listeners."""
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path[:0] = [p for p in (ROOT, BENCH) if p not in sys.path]
    import gpu  # benchmarks/gpu.py: build_train, _jax_setup
    import jax

    import xmedjax  # noqa: F401  (before any JAX computation: xmedjax/host_memory.py)

    if args.cache_dir:
        gpu._jax_setup(args.cache_dir)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    return jax


def ours_makers(cfg: dict, mesh) -> dict:
    """workload -> (arch, precision) -> (call, what), our side (the public API)."""
    import gpu
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from xmedjax import train_state as ts
    from xmedjax.explain import grad_cam
    from xmedjax.input_pipeline import to_global_array
    from xmedjax.models import create_model

    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, cfg["image"], cfg["image"], 3)).astype(np.float32)

    def model(arch, precision):
        build = lambda: create_model(arch, 2, dtype=jnp.dtype(precision), width=cfg["width"])  # noqa: E731
        return nnx.jit(build)()

    def train(arch, precision):
        step, state, data = gpu.build_train(arch, precision, BATCH, cfg, mesh)
        held = [state]

        def call():
            held[0], metrics = step(held[0], data)
            jax.block_until_ready(metrics["loss"])

        return call, f"train_state.jit_train_step (Adam, NaN guard, donated state), {precision}"

    def infer(arch, precision):
        mdef, state = ts.create_train_state(model(arch, precision), ts.make_optimizer("adam", 1e-4))
        state = ts.place_state(state, mesh)
        extra = {"label": np.zeros(BATCH, np.int32), "valid": np.ones(BATCH, np.int32)}
        batch = to_global_array(dict(extra, image=images, index=np.arange(BATCH)), mesh)
        step = ts.jit_eval_step(mdef, state, mesh)
        return (
            lambda: jax.block_until_ready(step(state, batch)["logits"]),
            f"train_state.jit_eval_step logits, {precision}",
        )

    def gradcam(arch, precision):
        net, x = model(arch, precision), jnp.asarray(images)
        targets = jnp.arange(BATCH, dtype=jnp.int32) % 2
        return (
            lambda: np.asarray(grad_cam(net, x, targets).maps),
            f"explain.grad_cam, maps copied to a numpy array, {precision}",
        )

    return {"train": train, "infer": infer, "gradcam": gradcam}


def run_arch(arch: str, cfg: dict, peer: PeerProcess | None) -> tuple[dict, dict]:
    """(ours, peers) for one architecture; each of our entries also gets its compile split."""
    from xmedjax import mesh as mesh_lib

    return run_pairs(
        ours_makers(cfg, mesh_lib.make_mesh()),
        peer,
        arch,
        cfg,
        before=_COMPILE.clear,
        after=lambda: {"compile": dict(_COMPILE)},
    )


# ============================================================================ the JSON
def row(ours: float | None, peer: float | None, unit: str) -> dict:
    """One benchmarks entry; ratio > 1 means ours is better."""
    ratio = None
    if ours and peer:
        ratio = ours / peer if unit == "img/s" else peer / ours
    return {"ours": ours, "peer": peer, "ratio": ratio, "unit": unit}


def assemble(ours: dict, peers: dict, cfg: dict) -> tuple[dict, dict]:
    """(benchmarks, details): every name of both architectures, null where a side did not run."""
    rows: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for arch in ARCHS:
        for precision in cfg["precisions"]:
            first_calls = {}
            for workload in WORKLOADS:
                name = key(arch, workload, precision)
                o, p = ours.get(name, {}), peers.get(name, {})
                rows[name] = row(o.get("img_s"), p.get("img_s"), "img/s")
                first = row(o.get("first_s"), p.get("first_s"), "s")
                first_calls[compile_key(arch, workload, precision)] = first
                details[name] = {"ours": o, "peer": p}
            rows.update(first_calls)
    return rows, details


def cpu_info() -> dict:
    """The CPU's model name, cores and the instruction sets that matter here."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and not flags:
                    model = value.strip()
                elif name.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "model": model,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
    }


def versions(names: tuple[str, ...]) -> dict:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in names:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def host_malloc() -> dict:
    """Our side's allocator setting (xmedjax/host_memory.py); the peer's glibc environment."""
    ours = sys.modules.get("xmedjax.host_memory")
    names = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    return {
        "ours": ours.STATUS if ours else "xmedjax not imported",
        "ours_huge_pages": ours.HUGE_PAGES if ours else "xmedjax not imported",
        "ours_dispatch": getattr(ours, "DISPATCH", "xmedjax not imported"),
        "environment": {k: os.environ[k] for k in names if k in os.environ},
    }


def meta(args: argparse.Namespace, cfg: dict, peers: dict, loads: dict, t0: float) -> dict:
    cores = os.cpu_count() or 1
    return {
        "dry_run": args.dry_run,
        "cpu": cpu_info(),
        "load_average": loads,
        "quiet_machine": loads["start"][0] < 0.75 * cores,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "argv": sys.argv[1:],
        "settings": dict(cfg, peer_threads=args.peer_threads, cache_dir=args.cache_dir),
        "versions": versions(("jax", "jaxlib", "flax", "optax", "numpy")),
        "host_malloc": host_malloc(),
        "peer": peers.get("_notes", {}) if not args.skip_peers else {"skipped": True},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
    }


def write_json(args: argparse.Namespace, result: dict) -> None:
    """Atomic write of --out (a run killed half-way leaves the last whole version)."""
    if not args.out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)


def print_table(rows: dict) -> None:
    print(f"\n{'NAME':34s} {'ours':>9s} {'peer':>9s} {'ratio':>7s}  unit", flush=True)
    for name, r in rows.items():
        cells = [
            "n/a" if r[k] is None else f"{r[k]:.2f}" + ("x" if k == "ratio" else "")
            for k in ("ours", "peer", "ratio")
        ]
        print(f"{name:34s} {cells[0]:>9s} {cells[1]:>9s} {cells[2]:>7s}  {r['unit']}")
    print("ratio = how many times better ours is (ours/peer for img/s, peer/ours for s)\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._peer_server:
        peer_server(args)
        return
    cfg, loads, t0 = settings(args), {"start": load()}, time.perf_counter()
    if loads["start"][0] >= 0.75 * (os.cpu_count() or 1):
        say(f"note: load average {loads['start']} on {os.cpu_count()} cores: not a measurement")
    jax = setup_jax(args)
    ours: dict = {}
    peers: dict = {"_notes": {}}
    peer = None if args.skip_peers else PeerProcess(args)
    if peer is not None:
        peers["_notes"].update(peer.notes)
    try:
        for arch in args.archs:
            loads[arch] = load()
            got_ours, got_peers = run_arch(arch, cfg, peer)
            ours.update(got_ours)
            peers.update(got_peers)
            jax.clear_caches()
            rows, details = assemble(ours, peers, cfg)
            write_json(
                args,
                {
                    "meta": dict(
                        meta(args, cfg, peers, loads, t0), complete=False, details=details
                    ),
                    "benchmarks": rows,
                },
            )
    finally:
        if peer is not None:
            peer.close()
    loads["end"] = load()
    rows, details = assemble(ours, peers, cfg)
    result_meta = dict(meta(args, cfg, peers, loads, t0), complete=True, details=details)
    write_json(args, {"meta": result_meta, "benchmarks": rows})
    print_table(rows)
    if not result_meta["quiet_machine"]:
        say(
            f"NOT A MEASUREMENT: load average {loads['start']} at the start on {os.cpu_count()} cores"
        )
    say(f"done in {result_meta['wall_s']:.0f} s" + (f", wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
