"""Ours against the peers, in one run on one GPU: train, inference, Grad-CAM, compile, input.

    python benchmarks/gpu.py --out=$OUT/benchmarks.json [--data_dir=prepared/brain_binary]
        [--only=resnet50,densenet121,input] [--torch_compile] [--budget_s=330]
    python benchmarks/gpu.py --dry_run --out=/tmp/bench.json   # tiny sizes on CPU, checks the code

What one run measures (224x224x3 synthetic inputs, 2 classes, Adam lr 1e-4; img/s after
warm-up, device synchronised: `block_until_ready` for ours, `torch.cuda.synchronize` for
the peers):

  ours (xmedjax)                                   peer, same run
  train_step bs32 float32                          torchvision eager fp32 bs32
  train_step bs32 bfloat16                         torchvision eager bf16+channels_last bs32
  train_step bs256 bfloat16                        torchvision eager bf16+channels_last bs256
                                                   (torch.compile bf16+CL only with --torch_compile;
                                                    else anchors.md's figure, marked as such)
  eval forward bs256 bfloat16                      torchvision inference bf16+CL bs256
  grad_cam_fn bs32 / bs256, bf16 and fp32 models,  pytorch-grad-cam 1.5.7 GradCAM fp32 (ResNet50
  maps copied to host memory                       layer4; DenseNet121 an out-of-place ReLU after
                                                   `features`, see ../shared/parity/README.md)
  (NAME_gradcam_bsN: ours bf16, as the naive port anchors.md reports; NAME_gradcam_bsN_fp32: ours fp32)
  cold compile of train_step bs256 bf16            torch.compile's first step (flag) or anchors.md
  the same compile with the persistent cache warm  (a second process reading this run's cache)
  input pipeline img/s (decode+augment, host CPUs) -

JSON (`--out`): {"meta": {...}, "benchmarks": {NAME: {"ours", "peer", "ratio", "unit",
"ours_what", "peer_what", "peer_source"}}}. `ratio` is always "how many times better ours
is": ours/peer for throughputs (img/s), peer/ours for times (s). A peer that cannot run
(torch, torchvision or pytorch_grad_cam missing, or skipped) is null and printed "n/a".

The peers run first, in a child process that exits before JAX touches the GPU, so the two
frameworks never hold GPU memory at the same time. Ours compiles the cold train step alone
(timed), then compiles that architecture's other programs in parallel threads (XLA's
compiler releases the GIL), then times them one after the other.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "dry_run",
    False,
    "tiny sizes on CPU (width 0.125, 32 px, batches 2/4): checks the code, "
    "measures nothing meaningful",
)
flags.DEFINE_list(
    "only",
    [],
    "subset: resnet50, densenet121, input, peers (peers alone), ours (ours alone), "
    "compile (cold/warm compile only); empty = everything",
)
flags.DEFINE_string("out", "", "JSON output file")
flags.DEFINE_string(
    "data_dir", "", "prepared dataset for the input-pipeline benchmark ('' = skip it)"
)
flags.DEFINE_bool(
    "torch_compile", False, "also time torch.compile (bf16+CL, bs256): minutes of compiling"
)
flags.DEFINE_integer("warmup", 5, "untimed steps")
flags.DEFINE_integer("steps", 20, "timed steps (train/inference); Grad-CAM at bs256 uses a quarter")
flags.DEFINE_float(
    "budget_s", 0.0, "stop starting new workloads after this many seconds (0 = no limit)"
)
flags.DEFINE_string(
    "cache_dir",
    "",
    "persistent compilation cache ('' = a fresh temporary folder, so the first compile is cold)",
)
flags.DEFINE_bool(
    "parallel_compile", True, "compile each architecture's programs in parallel threads"
)
flags.DEFINE_float("input_seconds", 8.0, "seconds per input-pipeline setting")
flags.DEFINE_list(
    "programs",
    [],
    "subset of our programs besides the cold-compiled train step: train_fp32_small, "
    "train_bf16_small, infer, gradcam_fp32_small, gradcam_fp32_large, gradcam_bf16_small, "
    "gradcam_bf16_large (empty = all)",
)
flags.DEFINE_bool(
    "cold_compile",
    True,
    "time the cold compile of the bs256 bf16 train step first (false: only "
    "--programs, e.g. for a profile)",
)
flags.DEFINE_string(
    "profile_dir",
    "",
    "after timing, trace 3 more calls of each program with jax.profiler here "
    "(view with TensorBoard/XProf)",
)
# internal: child-process modes
flags.DEFINE_string("_peer_out", "", "internal: run the peers only and write their JSON here")
flags.DEFINE_string(
    "_compile_probe", "", "internal: compile one train step in this process, print JSON"
)

ARCHS = ("resnet50", "densenet121")

# ../shared/anchors.md, one H100 80GB, 2026-11-26 (used only where the same-run peer is not measured).
ANCHORS = {
    "resnet50_torch_compile_bs256_bf16": 5582.0,
    "densenet121_torch_compile_bs256_bf16": 3081.0,
    "resnet50_torch_compile_first_step_s": 55.0,
    "densenet121_torch_compile_first_step_s": 157.0,
    "flax_imagenet_resnet50_bs256_bf16": 5651.0,
}


def sizes(dry_run: bool) -> dict:
    """Image size, batches, width and step counts for a real run or a dry run."""
    if dry_run:
        return {
            "image": 32,
            "small": 2,
            "large": 4,
            "width": 0.125,
            "warmup": 1,
            "steps": 2,
            "dry_run": True,
        }
    return {
        "image": 224,
        "small": 32,
        "large": 256,
        "width": 1.0,
        "warmup": FLAGS.warmup,
        "steps": FLAGS.steps,
        "dry_run": False,
    }


def wanted(part: str) -> bool:
    only = [o.strip() for o in FLAGS.only if o.strip()]
    if not only:
        return True
    if part in ARCHS:
        return part in only or not (set(only) & set(ARCHS))
    return part in only


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - (time.perf_counter() - self.t0)

    def spent(self) -> bool:
        return self.left() <= 0


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================== peers (torch)
def run_peers(sz: dict, archs: tuple[str, ...], torch_compile: bool, budget: Budget) -> dict:
    """Every torch/torchvision/pytorch-grad-cam workload; returns {key: value or None, "_notes": ...}."""
    out: dict[str, Any] = {"_notes": {}}
    try:
        import torch
        import torchvision
    except Exception as exc:  # noqa: BLE001
        out["_notes"]["torch"] = f"unavailable: {type(exc).__name__}: {exc}"
        return out
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except Exception as exc:  # noqa: BLE001
        GradCAM = None  # noqa: N806
        out["_notes"]["pytorch_grad_cam"] = f"unavailable: {type(exc).__name__}: {exc}"
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    out["_notes"]["torch"] = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}"
    )
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any], batch: int, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return batch * steps / (time.perf_counter() - t0)

    def make(arch):
        if sz["dry_run"]:  # narrow torchvision models: the same code path in seconds on a CPU
            if arch == "resnet50":
                from torchvision.models.resnet import Bottleneck, ResNet

                return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=2, width_per_group=8).to(dev)
            return torchvision.models.DenseNet(
                growth_rate=4, block_config=(6, 12, 24, 16), num_init_features=8, num_classes=2
            ).to(dev)
        return getattr(torchvision.models, arch)(weights=None, num_classes=2).to(dev)

    def train_rate(arch, batch, bf16, compiled=False):
        model = make(arch).train()
        fmt = torch.channels_last if bf16 else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, sz["image"], sz["image"], device=dev).to(memory_format=fmt)
        y = torch.randint(0, 2, (batch,), device=dev)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step_eager():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

        step = step_eager
        first = None
        if compiled:
            step = torch.compile(step_eager)
            t0 = time.perf_counter()
            step()
            sync()
            first = time.perf_counter() - t0
        rate = timed(step, batch, sz["warmup"], sz["steps"])
        if cuda:  # the model and optimiser die with this frame
            torch.cuda.empty_cache()
        return rate, first

    def infer_rate(arch, batch):
        model = make(arch).eval().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, sz["image"], sz["image"], device=dev).to(
            memory_format=torch.channels_last
        )

        def fwd():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
                return model(x)

        rate = timed(fwd, batch, sz["warmup"], sz["steps"])
        if cuda:
            torch.cuda.empty_cache()
        return rate

    class DenseNetOutOfPlace(torch.nn.Module):
        """densenet121's forward with its final ReLU out of place (hooks on `features` see the real map)."""

        def __init__(self, net):
            super().__init__()
            self.features, self.relu, self.classifier = (
                net.features,
                torch.nn.ReLU(inplace=False),
                net.classifier,
            )

        def forward(self, x):
            out = torch.nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), (1, 1))
            return self.classifier(torch.flatten(out, 1))

    def gradcam_rate(arch, batch):
        net = make(arch).eval()
        if arch == "densenet121":
            net = DenseNetOutOfPlace(net)
            layer = net.relu
        else:
            layer = net.layer4
        cam = GradCAM(model=net, target_layers=[layer])
        x = torch.randn(batch, 3, sz["image"], sz["image"], device=dev)
        targets = [ClassifierOutputTarget(int(t)) for t in torch.randint(0, 2, (batch,))]

        def run():
            return cam(input_tensor=x, targets=targets)  # numpy (B, H, W) on the host

        steps = sz["steps"] if batch <= sz["small"] else max(2, sz["steps"] // 4)
        rate = timed(run, batch, min(2, sz["warmup"]), steps)
        if cuda:
            torch.cuda.empty_cache()
        return rate

    for arch in archs:
        jobs = [
            (
                f"{arch}_train_bs{sz['small']}_fp32",
                lambda a=arch: train_rate(a, sz["small"], False)[0],
            ),
            (
                f"{arch}_train_bs{sz['small']}_bf16cl",
                lambda a=arch: train_rate(a, sz["small"], True)[0],
            ),
            (
                f"{arch}_train_bs{sz['large']}_bf16cl",
                lambda a=arch: train_rate(a, sz["large"], True)[0],
            ),
            (f"{arch}_infer_bs{sz['large']}_bf16cl", lambda a=arch: infer_rate(a, sz["large"])),
        ]
        if GradCAM is not None:
            jobs += [
                (f"{arch}_gradcam_bs{b}_fp32", lambda a=arch, b=b: gradcam_rate(a, b))
                for b in (sz["small"], sz["large"])
            ]
        for key, job in jobs:
            if budget.spent():
                out["_notes"][key] = "skipped: time budget"
                out[key] = None
                continue
            t0 = time.perf_counter()
            try:
                out[key] = float(job())
            except Exception as exc:  # noqa: BLE001 - one failed peer must not lose the others
                out[key] = None
                out["_notes"][key] = f"failed: {type(exc).__name__}: {exc}"
            log(f"peer {key}: {out[key]} img/s ({time.perf_counter() - t0:.1f} s)")
        if torch_compile and cuda and not budget.spent():
            key = f"{arch}_train_bs{sz['large']}_bf16cl_compile"
            try:
                rate, first = train_rate(arch, sz["large"], True, compiled=True)
                out[key], out[f"{key}_first_step_s"] = float(rate), float(first)
            except Exception as exc:  # noqa: BLE001
                out[key] = None
                out["_notes"][key] = f"failed: {type(exc).__name__}: {exc}"
            log(f"peer {key}: {out.get(key)} img/s, first step {out.get(key + '_first_step_s')} s")
    return out


def peers_in_child(sz: dict, archs: tuple[str, ...], budget: Budget) -> dict:
    """Runs `run_peers` in a child process (torch's GPU memory is gone when it exits)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peers.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--_peer_out={path}",
            f"--only={','.join(archs)}",
            f"--warmup={FLAGS.warmup}",
            f"--steps={FLAGS.steps}",
            f"--torch_compile={FLAGS.torch_compile}",
            f"--dry_run={FLAGS.dry_run}",
        ]
        if budget.seconds:
            cmd.append(f"--budget_s={max(1.0, budget.left())}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0 or not os.path.isfile(path):
            return {"_notes": {"peers": f"peer process exited with {proc.returncode}"}}
        with open(path) as f:
            return json.load(f)


# =============================================================================== ours (JAX)
def _jax_setup(cache_dir: str):
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    for key, value in (
        ("jax_persistent_cache_min_compile_time_secs", 0.0),
        ("jax_persistent_cache_min_entry_size_bytes", 0),
    ):
        try:  # cache everything (the options' names have moved between JAX versions)
            jax.config.update(key, value)
        except Exception as exc:  # noqa: BLE001
            log(f"note: could not set {key}: {exc}")
    return jax


def build_train(arch: str, dtype_name: str, batch: int, sz: dict, mesh):
    """(lowered-ready jitted step, state, batch) for our train step."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from xmedjax import train_state as ts
    from xmedjax.input_pipeline import to_global_array
    from xmedjax.models import create_model

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    model = nnx.jit(
        lambda: create_model(arch, 2, in_channels=3, dtype=dtype, seed=0, width=sz["width"])
    )()
    mdef, state = ts.create_train_state(model, ts.make_optimizer("adam", 1e-4))
    state = ts.place_state(state, mesh)
    rng = np.random.default_rng(0)
    host = {
        "image": rng.standard_normal((batch, sz["image"], sz["image"], 3), np.float32),
        "label": rng.integers(0, 2, batch).astype(np.int32),
    }
    data = to_global_array(host, mesh)
    fn = ts.jit_train_step(mdef, state, mesh)
    return fn, state, data


def compile_probe(arch: str, sz: dict) -> dict:
    """Trace+lower+compile our bs-large bf16 train step once; returns the seconds of each."""
    from xmedjax import mesh as mesh_lib

    mesh = mesh_lib.make_mesh()
    fn, state, data = build_train(arch, "bfloat16", sz["large"], sz, mesh)
    t0 = time.perf_counter()
    lowered = fn.lower(state, data)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def compile_probe_in_child(arch: str, cache_dir: str) -> dict | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--_compile_probe={arch}",
        f"--cache_dir={cache_dir}",
        f"--dry_run={FLAGS.dry_run}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    log(f"compile probe for {arch} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return None


def trace_summary(folder: str, top: int = 40) -> list[dict]:
    """Total time per op name on the device (or all) lanes of the newest *.trace.json.gz under folder."""
    import glob
    import gzip

    files = sorted(
        glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        return []
    try:
        with gzip.open(files[-1], "rt") as f:
            trace = json.load(f)
    except Exception:  # noqa: BLE001
        return []
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    pid_names = {
        e.get("pid"): str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {p for p, n in pid_names.items() if "gpu" in n.lower() or "device" in n.lower()}
    totals: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or (device_pids and e.get("pid") not in device_pids):
            continue
        t = totals.setdefault(str(e.get("name")), [0.0, 0])
        t[0] += float(e.get("dur", 0.0)) / 1000.0
        t[1] += 1
    rows = sorted(
        ({"name": k, "ms": v[0], "count": v[1]} for k, v in totals.items()), key=lambda r: -r["ms"]
    )
    return rows[:top]


def _cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program ({} if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _time_jax(fn: Callable[[], Any], batch: int, warmup: int, steps: int) -> float:
    import jax

    out = None
    for _ in range(warmup):
        out = fn()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return batch * steps / (time.perf_counter() - t0)


def run_ours(arch: str, sz: dict, budget: Budget, results: dict, notes: dict) -> None:
    """Our workloads for one architecture; fills results[key] (img/s, or seconds for compiles)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from xmedjax import mesh as mesh_lib
    from xmedjax import train_state as ts
    from xmedjax.explain import grad_cam_fn
    from xmedjax.input_pipeline import to_global_array
    from xmedjax.models import create_model

    mesh = mesh_lib.make_mesh()
    small, large = sz["small"], sz["large"]
    rng = np.random.default_rng(1)

    # 1. cold compile of the bs-large bf16 train step, alone (the cache folder is fresh)
    programs: dict[str, dict] = {}
    if FLAGS.cold_compile:
        fn, state, data = build_train(arch, "bfloat16", large, sz, mesh)
        t0 = time.perf_counter()
        lowered = fn.lower(state, data)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        results[f"{arch}_compile_train_bs{large}_bf16_cold_s"] = t2 - t0
        notes[f"{arch}_compile_train_bs{large}_bf16_cold_s"] = (
            f"trace+lower {t1 - t0:.1f} s, XLA compile {t2 - t1:.1f} s"
        )
        log(
            f"ours {arch}: cold compile of train bs{large} bf16 {t2 - t0:.1f} s (lower {t1 - t0:.1f} s)"
        )
        programs[f"{arch}_train_bs{large}_bf16"] = {
            "compiled": compiled,
            "args": [state, data],
            "batch": large,
            "kind": "train",
        }
    if "compile" in FLAGS.only:
        return

    # 2. every other program of this architecture, compiled in parallel threads
    specs = []
    for dtype_name, batch in (("float32", small), ("bfloat16", small)):
        specs.append(
            (
                f"{arch}_train_bs{batch}_{'fp32' if dtype_name == 'float32' else 'bf16'}",
                dtype_name,
                batch,
            )
        )

    def lower_train(name, dtype_name, batch):
        f, s, d = build_train(arch, dtype_name, batch, sz, mesh)
        return name, f.lower(s, d), [s, d], batch, "train"

    def model_split(dtype):
        model = nnx.jit(
            lambda: create_model(arch, 2, in_channels=3, dtype=dtype, seed=0, width=sz["width"])
        )()
        model.eval()
        return nnx.split(model)

    def lower_infer():
        model = nnx.jit(
            lambda: create_model(
                arch, 2, in_channels=3, dtype=jnp.bfloat16, seed=0, width=sz["width"]
            )
        )()
        mdef, st = ts.create_train_state(model, ts.make_optimizer("adam", 1e-4))
        st = ts.place_state(st, mesh)
        host = {
            "image": rng.standard_normal((large, sz["image"], sz["image"], 3), np.float32),
            "label": np.zeros(large, np.int32),
            "valid": np.ones(large, np.int32),
            "index": np.arange(large, dtype=np.int32),
        }
        d = to_global_array(host, mesh)
        f = ts.jit_eval_step(mdef, st, mesh)
        return f"{arch}_infer_bs{large}_bf16", f.lower(st, d), [st, d], large, "infer"

    def lower_cam(batch, dtype, tag):
        graphdef, st = model_split(dtype)
        images = jnp.asarray(rng.standard_normal((batch, sz["image"], sz["image"], 3), np.float32))
        targets = jnp.asarray(rng.integers(0, 2, batch).astype(np.int32))
        lowered_cam = grad_cam_fn.lower(graphdef, st, images, targets)
        return (
            f"{arch}_gradcam_bs{batch}_{tag}",
            lowered_cam,
            [st, images, targets],
            batch,
            "gradcam",
        )

    named_jobs = {
        "train_fp32_small": lambda: lower_train(*specs[0]),
        "train_bf16_small": lambda: lower_train(*specs[1]),
        "infer": lower_infer,
    }
    if not FLAGS.cold_compile:
        named_jobs["train_bf16_large"] = lambda: lower_train(
            f"{arch}_train_bs{large}_bf16", "bfloat16", large
        )
    for tag, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        for size_name, b in (("small", small), ("large", large)):
            named_jobs[f"gradcam_{tag}_{size_name}"] = lambda b=b, dtype=dtype, tag=tag: lower_cam(
                b, dtype, tag
            )
    chosen = [p.strip() for p in FLAGS.programs if p.strip()] or [
        k for k in named_jobs if k != "train_bf16_large"
    ]
    unknown = sorted(set(chosen) - set(named_jobs))
    if unknown:
        raise ValueError(f"--programs: unknown {unknown}; choose from {sorted(named_jobs)}")
    jobs = [named_jobs[p] for p in chosen]

    t0 = time.perf_counter()
    # Tracing/lowering holds the GIL: do it in this thread; XLA compiles in the pool.
    lowered_all = []
    for job in jobs:
        if budget.spent():
            notes[f"{arch}_programs"] = "some programs skipped: time budget"
            break
        try:
            lowered_all.append(job())
        except Exception as exc:  # noqa: BLE001
            notes[f"{arch}_lower_{len(lowered_all)}"] = f"failed: {type(exc).__name__}: {exc}"
            log(f"ours {arch}: lowering failed: {exc}")
    workers = max(1, len(lowered_all)) if FLAGS.parallel_compile else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {
            name: (pool.submit(low.compile), args, batch, kind)
            for name, low, args, batch, kind in lowered_all
        }
        for name, (fut, args, batch, kind) in futures.items():
            try:
                programs[name] = {
                    "compiled": fut.result(),
                    "args": args,
                    "batch": batch,
                    "kind": kind,
                }
            except Exception as exc:  # noqa: BLE001
                notes[name] = f"compile failed: {type(exc).__name__}: {exc}"
                log(f"ours {name}: compile failed: {exc}")
    results[f"{arch}_compile_other_programs_wall_s"] = time.perf_counter() - t0
    log(
        f"ours {arch}: {len(lowered_all)} more programs lowered+compiled in {time.perf_counter() - t0:.1f} s "
        f"({'parallel' if FLAGS.parallel_compile else 'serial'})"
    )

    # 3. time each program (one after the other)
    for name, prog in programs.items():
        if budget.spent():
            notes[name] = "skipped: time budget"
            continue
        c, args, batch, kind = prog["compiled"], prog["args"], prog["batch"], prog["kind"]
        steps = sz["steps"] if batch <= small or kind != "gradcam" else max(2, sz["steps"] // 2)
        try:
            if kind == "train":
                holder = {"state": args[0]}

                def step(c=c, data=args[1], holder=holder):
                    holder["state"], metrics = c(holder["state"], data)
                    return metrics["loss"]

                rate = _time_jax(step, batch, sz["warmup"], steps)
            elif kind == "infer":
                rate = _time_jax(lambda c=c, a=args: c(*a)["logits"], batch, sz["warmup"], steps)
            else:  # Grad-CAM: maps copied to host memory, as pytorch-grad-cam returns them

                def cam(c=c, a=args):
                    return np.asarray(jax.device_get(c(*a).maps))

                rate = _time_jax(cam, batch, min(2, sz["warmup"]), steps)
            results[name] = rate
            cost = _cost(c)
            if cost:  # XLA's own count: achieved FLOP/s and bytes/s against the card's roofline
                results[f"{name}_gflop_per_img"] = cost.get("flops", 0.0) / batch / 1e9
                results[f"{name}_mbytes_per_img"] = cost.get("bytes accessed", 0.0) / batch / 1e6
                notes[f"{name}_achieved"] = (
                    f"{cost.get('flops', 0.0) / batch * rate / 1e12:.1f} TFLOP/s, "
                    f"{cost.get('bytes accessed', 0.0) / batch * rate / 1e9:.0f} GB/s (XLA cost "
                    "analysis x measured rate)"
                )
            log(
                f"ours {name}: {rate:.1f} img/s"
                + (f" ({notes.get(name + '_achieved')})" if cost else "")
            )
            if FLAGS.profile_dir:
                fn_once = {
                    "train": lambda: step(),
                    "infer": lambda c=c, a=args: c(*a)["logits"],
                }.get(kind, lambda c=c, a=args: c(*a).maps)
                with jax.profiler.trace(os.path.join(FLAGS.profile_dir, name)):
                    out = None
                    for _ in range(3):
                        out = fn_once()
                    jax.block_until_ready(out)
                log(f"ours {name}: profile in {os.path.join(FLAGS.profile_dir, name)}")
                top = trace_summary(os.path.join(FLAGS.profile_dir, name))
                if top:
                    notes[f"{name}_profile_top"] = top
                    print(
                        "\n".join(
                            f"    {t['ms']:9.3f} ms {t['count']:5d}x  {t['name'][:100]}"
                            for t in top[:25]
                        ),
                        flush=True,
                    )
        except Exception as exc:  # noqa: BLE001
            notes[name] = f"run failed: {type(exc).__name__}: {exc}"
            log(f"ours {name}: failed: {exc}")
    programs.clear()


def run_input(data_dir: str, sz: dict, budget: Budget, results: dict, notes: dict) -> None:
    """Our Grain pipeline (decode + the paper's augmentation + batch) at the model size."""
    from xmedjax import augment, input_pipeline

    cpus = os.cpu_count() or 1
    for workers in sorted({0, min(8, max(1, cpus // 2))} if not FLAGS.dry_run else {0}):
        if budget.spent():
            notes[f"input_pipeline_w{workers}"] = "skipped: time budget"
            continue
        key = f"input_pipeline_bs{sz['small']}_w{workers}"
        try:
            it = input_pipeline.make_train_iterator(
                data_dir,
                "train",
                global_batch_size=sz["small"],
                preprocess=input_pipeline.Preprocess(sz["image"], 3, "imagenet"),
                augment=augment.PAPER_DEFAULTS,
                seed=0,
                worker_count=workers,
                shard_index=0,
                shard_count=1,
            )
            next(it)
            n, t0 = 0, time.perf_counter()
            seconds = 1.0 if FLAGS.dry_run else FLAGS.input_seconds
            while time.perf_counter() - t0 < seconds:
                n += next(it)["image"].shape[0]
            results[key] = n / (time.perf_counter() - t0)
            notes[key] = (
                f"{workers} Grain worker process(es), {cpus} CPUs, {data_dir}, paper augmentation"
            )
            log(f"ours {key}: {results[key]:.0f} img/s")
        except Exception as exc:  # noqa: BLE001
            notes[key] = f"failed: {type(exc).__name__}: {exc}"
            log(f"input pipeline failed: {exc}")


# =============================================================================== table
def assemble(ours: dict, peers: dict, sz: dict, archs: tuple[str, ...]) -> dict:
    """NAME -> {ours, peer, ratio, ...}; the issue's eight names plus the rest."""
    s, L = sz["small"], sz["large"]  # noqa: N806
    rows: dict[str, dict] = {}

    def row(name, our_key, peer_value, ours_what, peer_what, source="same run", lower_better=False):
        # canonical names (bs32 / bs256) also in a dry run, whose real batches are in "batch"
        name = name.replace(f"_bs{s}", "_bs32") if f"_bs{s}" in name and s != 32 else name
        name = name.replace(f"_bs{L}", "_bs256") if f"_bs{L}" in name and L != 256 else name
        o = ours.get(our_key)
        p = peer_value
        ratio = None
        if o is not None and p is not None and o > 0 and p > 0:
            ratio = (p / o) if lower_better else (o / p)
        batch = L if f"bs{L}" in our_key else (s if f"bs{s}" in our_key else None)
        rows[name] = {
            "ours": o,
            "peer": p,
            "ratio": ratio,
            "unit": "s" if lower_better else "img/s",
            "batch": batch,
            "image_size": sz["image"],
            "ours_what": ours_what,
            "peer_what": peer_what,
            "peer_source": source if p is not None else "n/a",
        }

    for a in archs:
        # the names (bs32 = fp32 vs torch eager fp32; bs256 = bf16 vs eager bf16+CL)
        row(
            f"{a}_train_bs{L}_bf16",
            f"{a}_train_bs{L}_bf16",
            peers.get(f"{a}_train_bs{L}_bf16cl"),
            f"train_step bs{L} bf16",
            f"torchvision eager bf16+channels_last bs{L}",
        )
        row(
            f"{a}_train_bs{s}",
            f"{a}_train_bs{s}_fp32",
            peers.get(f"{a}_train_bs{s}_fp32"),
            f"train_step bs{s} fp32",
            f"torchvision eager fp32 bs{s}",
        )
        # Grad-CAM headline: our bf16-compute model (as the anchors' naive port the issue cites) against
        # pytorch-grad-cam in fp32 (it has no bf16 mode); the like-for-like fp32 rows follow.
        row(
            f"{a}_gradcam_bs{s}",
            f"{a}_gradcam_bs{s}_bf16",
            peers.get(f"{a}_gradcam_bs{s}_fp32"),
            f"grad_cam_fn bs{s} bf16 model, maps to host",
            f"pytorch-grad-cam 1.5.7 GradCAM bs{s} fp32",
        )
        row(
            f"{a}_gradcam_bs{L}",
            f"{a}_gradcam_bs{L}_bf16",
            peers.get(f"{a}_gradcam_bs{L}_fp32"),
            f"grad_cam_fn bs{L} bf16 model, maps to host",
            f"pytorch-grad-cam 1.5.7 GradCAM bs{L} fp32",
        )
        # more
        row(
            f"{a}_train_bs{s}_bf16",
            f"{a}_train_bs{s}_bf16",
            peers.get(f"{a}_train_bs{s}_bf16cl"),
            f"train_step bs{s} bf16",
            f"torchvision eager bf16+channels_last bs{s}",
        )
        comp = peers.get(f"{a}_train_bs{L}_bf16cl_compile")
        anchor = ANCHORS.get(f"{a}_torch_compile_bs256_bf16") if not FLAGS.dry_run else None
        row(
            f"{a}_train_bs{L}_bf16_vs_torch_compile",
            f"{a}_train_bs{L}_bf16",
            comp if comp is not None else anchor,
            f"train_step bs{L} bf16",
            f"torch.compile bf16+channels_last bs{L}",
            source="same run" if comp is not None else "anchors.md (other run, same card kind)",
        )
        if a == "resnet50":
            row(
                f"{a}_train_bs{L}_bf16_vs_flax_imagenet",
                f"{a}_train_bs{L}_bf16",
                None if FLAGS.dry_run else ANCHORS["flax_imagenet_resnet50_bs256_bf16"],
                f"train_step bs{L} bf16",
                "flax examples/imagenet bs256 bf16",
                source="anchors.md (other run, same card kind)",
            )
        row(
            f"{a}_infer_bs{L}_bf16",
            f"{a}_infer_bs{L}_bf16",
            peers.get(f"{a}_infer_bs{L}_bf16cl"),
            f"eval forward bs{L} bf16",
            f"torchvision inference bf16+channels_last bs{L}",
        )
        row(
            f"{a}_gradcam_bs{s}_fp32",
            f"{a}_gradcam_bs{s}_fp32",
            peers.get(f"{a}_gradcam_bs{s}_fp32"),
            f"grad_cam_fn bs{s} fp32 model, maps to host",
            f"pytorch-grad-cam 1.5.7 GradCAM bs{s} fp32",
        )
        row(
            f"{a}_gradcam_bs{L}_fp32",
            f"{a}_gradcam_bs{L}_fp32",
            peers.get(f"{a}_gradcam_bs{L}_fp32"),
            f"grad_cam_fn bs{L} fp32 model, maps to host",
            f"pytorch-grad-cam 1.5.7 GradCAM bs{L} fp32",
        )
        first = peers.get(f"{a}_train_bs{L}_bf16cl_compile_first_step_s")
        anchor_first = ANCHORS.get(f"{a}_torch_compile_first_step_s") if not FLAGS.dry_run else None
        row(
            f"{a}_compile_cold",
            f"{a}_compile_train_bs{L}_bf16_cold_s",
            first if first is not None else anchor_first,
            f"cold trace+lower+compile of train_step bs{L} bf16",
            f"torch.compile first step bs{L} bf16+CL",
            source="same run" if first is not None else "anchors.md (other run, same card kind)",
            lower_better=True,
        )
        row(
            f"{a}_compile_warm_cache",
            f"{a}_compile_train_bs{L}_bf16_warm_s",
            ours.get(f"{a}_compile_train_bs{L}_bf16_cold_s"),
            "same compile, second process, persistent cache warm",
            "our own cold compile",
            source="same run",
            lower_better=True,
        )
    for key, value in ours.items():
        if key.startswith("input_pipeline"):
            rows[key] = {
                "ours": value,
                "peer": None,
                "ratio": None,
                "unit": "img/s",
                "ours_what": "Grain decode+augment+batch",
                "peer_what": "-",
                "peer_source": "n/a",
            }
    return rows


def fmt(v, unit="img/s") -> str:
    if v is None:
        return "n/a"
    return f"{v:,.1f}" if unit == "s" else f"{v:,.0f}"


def print_table(rows: dict) -> None:
    print(
        f"\n{'NAME':48s} {'ours':>10s} {'peer':>10s} {'ratio':>7s}  unit   peer source", flush=True
    )
    for name, r in rows.items():
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(
            f"{name:48s} {fmt(r['ours'], r['unit']):>10s} {fmt(r['peer'], r['unit']):>10s} {ratio:>7s}  "
            f"{r['unit']:5s}  {r['peer_source']}",
            flush=True,
        )
    print(
        "ratio = how many times better ours is (ours/peer for img/s, peer/ours for seconds)\n",
        flush=True,
    )


# =============================================================================== main
def main(argv):
    del argv
    sz = sizes(FLAGS.dry_run)
    budget = Budget(FLAGS.budget_s)
    if FLAGS.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The compile-probe child runs while this process holds its arrays: no process may grab 75% of the GPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if FLAGS._peer_out:  # child: peers only
        archs = tuple(a for a in ARCHS if wanted(a))
        res = run_peers(sz, archs, FLAGS.torch_compile and not FLAGS.dry_run, budget)
        with open(FLAGS._peer_out, "w") as f:
            json.dump(res, f)
        return
    if FLAGS._compile_probe:  # child: one compile, cache as given
        _jax_setup(FLAGS.cache_dir)
        print("PROBE " + json.dumps(compile_probe(FLAGS._compile_probe, sz)), flush=True)
        return

    t_start = time.perf_counter()
    archs = tuple(a for a in ARCHS if wanted(a))
    only = set(FLAGS.only)
    peers: dict = {"_notes": {}}
    if archs and "ours" not in only and "compile" not in only:
        log(f"peers ({', '.join(archs)}) in a child process")
        peers = peers_in_child(sz, archs, budget)
    cache_dir = FLAGS.cache_dir or tempfile.mkdtemp(prefix="xmedjax_bench_cache_")
    fresh = not os.path.isdir(cache_dir) or not os.listdir(cache_dir)
    jax = _jax_setup(cache_dir)
    ours: dict = {}
    notes: dict = {}
    if not fresh:
        notes["compile"] = (
            f"cache folder {cache_dir} was not empty: the 'cold' compiles may be cache hits"
        )
    if "peers" not in only:
        # order: ResNet50, the input pipeline (cheap), DenseNet121 (the longest compiles) last
        steps = (
            [a for a in archs if a == "resnet50"]
            + ["input"]
            + [a for a in archs if a != "resnet50"]
        )
        for arch in steps:
            if arch == "input":
                if FLAGS.data_dir and wanted("input") and not budget.spent():
                    run_input(FLAGS.data_dir, sz, budget, ours, notes)
                continue
            if budget.spent():
                notes[arch] = "skipped: time budget"
                continue
            write_json(ours, peers, notes, sz, archs, t_start, final=False)
            run_ours(arch, sz, budget, ours, notes)
            if not FLAGS.cold_compile:
                jax.clear_caches()
                continue
            # the warm-cache compile is one of the figures: measured even just past the budget
            probe = compile_probe_in_child(arch, cache_dir)
            if probe is not None:
                ours[f"{arch}_compile_train_bs{sz['large']}_bf16_warm_s"] = probe["total_s"]
                notes[f"{arch}_compile_train_bs{sz['large']}_bf16_warm_s"] = (
                    f"second process: trace+lower {probe['lower_s']:.1f} s, compile (cache) {probe['compile_s']:.1f} s"
                )
                log(f"ours {arch}: warm-cache compile {probe['total_s']:.1f} s in a second process")
            jax.clear_caches()
            write_json(ours, peers, notes, sz, archs, t_start, final=False)
    write_json(ours, peers, notes, sz, archs, t_start, final=True)


def write_json(
    ours: dict,
    peers: dict,
    notes: dict,
    sz: dict,
    archs: tuple[str, ...],
    t_start: float,
    final: bool,
) -> None:
    """The table (final only) and the JSON; also called after each phase, so a run killed by
    the device call's limit still leaves what it measured."""
    import jax

    rows = assemble(ours, peers, sz, archs)
    if final:
        print_table(rows)
    dev = jax.devices()[0]
    meta = {
        "complete": final,
        "dry_run": FLAGS.dry_run,
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "sizes": sz,
        "wall_s": time.perf_counter() - t_start,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "peer_notes": peers.get("_notes", {}),
        "notes": notes,
        "raw_ours": ours,
        "raw_peers": {k: v for k, v in peers.items() if k != "_notes"},
        "anchors": ANCHORS,
    }
    try:
        import flax

        meta["flax"] = flax.__version__
    except ImportError:
        pass
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        tmp = FLAGS.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "benchmarks": rows}, f, indent=2)
        os.replace(tmp, FLAGS.out)
        if final:
            log(f"wrote {FLAGS.out} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    app.run(main)
