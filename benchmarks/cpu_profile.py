"""Where the CPU time of one train step goes: ours (XLA:CPU thunks) or the peer's (aten ops).

    python benchmarks/cpu_profile.py --arch=resnet50 [--image_size=224] [--steps=3]
        [--out_dir=/tmp/xmedjax_cpu_profile] [--xla_flags=...] [--width=1.0]
    python benchmarks/cpu_profile.py --side=peer --arch=resnet50 --peer_site=/tmp/xmedjax-cpu-peers

Ours: the batch-8 float32 train step of benchmarks/gpu.py's `build_train` (the public
`train_state.jit_train_step`), compiled once (its optimised HLO written to OUT_DIR), two
warm-up steps, then --steps steps under `jax.profiler.trace`. Each XLA:CPU thunk in the trace
is an instruction of the HLO's entry computation; the summary groups them by what they
compute (convolutions forward/backward, BatchNorm reductions, elementwise, layout copies, the
Adam update, the NaN guard, ...) using the instruction, the ops fused into it and the source
line JAX recorded for them. Times are per step, summed over thunks: the thunk executor runs
independent thunks on both cores at once, so the sum can exceed the step's wall time.

Peer (`--side=peer`): torchvision's eager train step (cpu.py's peer) under torch.profiler,
self CPU time per aten op, grouped the same way where the op names allow.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(BENCH), BENCH) if p not in sys.path]

INSTR = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.-]+) = .*? (?P<op>[a-z][\w-]*)\((?P<rest>.*)$")
HEADER = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[\w.-]+) .*\{$")
MOVES = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "reverse"}
PIECES = {"concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad"}
STATEMENTS = (  # text of a train_step source line -> category
    ("tx.update", "Adam update (tx.update, apply_updates)"),
    ("apply_updates", "Adam update (tx.update, apply_updates)"),
    ("jnp.where", "NaN guard: where(finite, new, old) over the whole state"),
    ("isfinite", "finite check, grad norm, accuracy"),
    ("tree.norm", "finite check, grad norm, accuracy"),
    ("argmax", "finite check, grad norm, accuracy"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("ours", "peer"), default="ours")
    p.add_argument("--arch", choices=("resnet50", "densenet121"), default="resnet50")
    p.add_argument(
        "--program",
        choices=("train", "infer"),
        default="train",
        help="the train step, or the eval step's forward (peer: eval() under inference_mode)",
    )
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0, help="ours only: create_model's width")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--out_dir", default="/tmp/xmedjax_cpu_profile")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS")
    p.add_argument("--peer_site", default=os.environ.get("XMEDJAX_PEER_SITE", ""))
    p.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    p.add_argument(
        "--compile_only", action="store_true", help="ours: compile seconds and thunk counts only"
    )
    return p.parse_args(argv)


# ============================================================================ the HLO
def parse_hlo(text: str) -> tuple[dict[str, list[dict]], str]:
    """{computation: [instruction]} and the entry computation's name."""
    comps: dict[str, list[dict]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = HEADER.match(line)
        if head and not line.startswith(" "):
            current = head["name"]
            comps[current] = []
            entry = current if head["entry"] else entry
        elif line == "}":
            current = None
        elif current is not None and (m := INSTR.match(line)):
            calls = re.search(r"calls=%([\w.-]+)", m["rest"])
            frame = re.search(r"stack_frame_id=(\d+)", m["rest"])
            op_name = re.search(r'op_name="([^"]*)"', m["rest"])
            window = re.search(r"window=\{size=(\d+)", m["rest"])
            comps[current].append(
                {
                    "name": m["name"],
                    "op": m["op"],
                    "calls": calls[1] if calls else None,
                    "frame": int(frame[1]) if frame else None,
                    "op_name": op_name[1] if op_name else "",
                    "window": int(window[1]) if window else 0,
                    "backend": backend_of(m["op"], m["rest"]),
                }
            )
    return comps, entry


def backend_of(op: str, rest: str) -> str:
    """How XLA:CPU runs an instruction: a library fusion (__ynn_fusion, __xnn_fusion,
    __onednn_fusion), a custom call's target, or the fusion kind / opcode."""
    lib = re.search(r'"kind":"(__\w+)"', rest)
    if lib:
        return lib[1]
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    if target:
        return f"custom-call {target[1]}"
    kind = re.search(r"kind=(k\w+)", rest)
    return f"fusion {kind[1]}" if op == "fusion" and kind else op


def parse_frames(text: str) -> dict[int, tuple[str, str, int]]:
    """stack_frame_id -> (file, function, line) of the frame itself (innermost user code)."""
    section, tables = "", collections.defaultdict(dict)
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            section = "" if not line.strip() else section
        elif section and (m := re.match(r"^(\d+) (.*)$", line)):
            tables[section][int(m[1])] = m[2].strip().strip('"')
    files, funcs, locs = tables["FileNames"], tables["FunctionNames"], tables["FileLocations"]
    out = {}
    for frame_id, body in tables["StackFrames"].items():
        loc = locs.get(int(re.search(r"file_location_id=(\d+)", body)[1]), "")
        fields = dict(re.findall(r"(\w+)=(\d+)", loc))
        if fields:
            out[frame_id] = (
                files.get(int(fields["file_name_id"]), "?"),
                funcs.get(int(fields["function_name_id"]), "?"),
                int(fields["line"]),
            )
    return out


def body_ops(comps: dict, name: str | None, seen: set | None = None) -> list[dict]:
    """Every instruction of a computation and of the computations it calls."""
    seen = set() if seen is None else seen
    if not name or name in seen:
        return []
    seen.add(name)
    out = []
    for ins in comps.get(name, []):
        out.append(ins)
        out.extend(body_ops(comps, ins["calls"], seen))
    return out


def statement(frames: dict, ins: dict) -> str:
    """A category from the train_step statement an instruction came from ('' = the model)."""
    file, func, line = frames.get(ins["frame"], ("", "", 0))
    if file.endswith("guarded_update.py"):
        if func == "_finite_and_norm":
            return "finite check, grad norm, accuracy"
        return "optimiser update with its NaN guard (guarded_update)"
    if func == "train_step.<locals>.<lambda>":
        return "NaN guard: where(finite, new, old) over the whole state"
    if func.startswith("_all_finite"):
        return "finite check, grad norm, accuracy"
    if func in ("cross_entropy",):
        return "loss (cross-entropy)"
    if func != "train_step":
        return ""
    text = linecache.getline(file, line)
    return next((cat for needle, cat in STATEMENTS if needle in text), "")


def conv_kind(conv: dict) -> str:
    """Forward, input-gradient or kernel-gradient convolution.

    Backward convolutions carry "transpose(" in their op_name, or none (XLA rewrote them);
    a kernel gradient's window is the activation's spatial size (>= 7), an input
    gradient's the kernel's (1 or 3; the stem's input gradient is never needed).
    """
    if conv["op_name"] and "transpose(" not in conv["op_name"]:
        return "conv forward"
    return (
        "conv backward: kernel gradient" if conv["window"] >= 7 else "conv backward: input gradient"
    )


def categorise(ins: dict, comps: dict, frames: dict) -> str:
    """What one entry instruction (one thunk) computes."""
    ops = [ins] + body_ops(comps, ins["calls"])
    kinds = {o["op"] for o in ops}
    if "convolution" in kinds:
        return conv_kind(next(o for o in ops if o["op"] == "convolution"))
    if "dot" in kinds:
        return "dense (dot)"
    if ins["op"] == "fusion" and "dynamic-update-slice" in kinds and "reduce" not in kinds:
        # kernel_grad's shifted output gradients for 3x3 kernel gradients; their source
        # line is wherever the gradient they shift came from (often the loss).
        return "dynamic-update-slice fusions (3x3 kernel gradients' shifted inputs)"
    found = [s for s in (statement(frames, o) for o in ops) if s]
    if found:
        return collections.Counter(found).most_common(1)[0][0]
    if kinds & {"reduce-window", "select-and-scatter"}:
        return "reduce-window: max-pool fwd/bwd (argmax form), XLA-split reductions"
    if kinds - {"fusion"} <= MOVES:
        return "layout: transpose / copy / reverse"
    if kinds & PIECES and kinds - {"fusion"} <= MOVES | PIECES:
        return "concatenate / slice / pad"
    if "transpose" in kinds and "reduce" not in kinds:
        return (
            "transposed copies for the kernel-gradient convs (BatchNorm apply, ReLU redone inside)"
        )
    if "reduce" in kinds:
        return "reductions in the model (BatchNorm statistics fwd+bwd, bias grads)"
    return "elementwise in the model (BatchNorm apply, ReLU, adds; fwd+bwd)"


NOT_THUNKS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def structure(entry_ops: list[dict]) -> dict[str, int]:
    """How many entry instructions (thunks) each backend runs, most first."""
    counts = collections.Counter(i["backend"] for i in entry_ops if i["op"] not in NOT_THUNKS)
    return dict(counts.most_common())


def compile_summary(hlo_text: str) -> dict:
    """--compile_only: the program's shape, no timing: thunks per category and backend."""
    comps, entry = parse_hlo(hlo_text)
    frames = parse_frames(hlo_text)
    thunks = [i for i in comps[entry] if i["op"] not in NOT_THUNKS]
    cats = collections.Counter(categorise(i, comps, frames) for i in thunks)
    return {
        "thunks": len(thunks),
        "backends": structure(comps[entry]),
        "categories": [{"category": c, "thunks": n} for c, n in cats.most_common()],
    }


# ============================================================================ the trace
def trace_ops(folder: str, names: set[str]) -> dict[str, list[float]]:
    """Instruction name -> [total ms, count] over the newest trace under folder."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True))
    with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            totals[e["name"]][0] += e.get("dur", 0.0) / 1000.0
            totals[e["name"]][1] += 1
    return totals


def summarise(hlo_text: str, trace_dir: str, steps: int) -> dict:
    """Per category and per instruction: ms per step, count, share of the thunks' time."""
    comps, entry = parse_hlo(hlo_text)
    frames = parse_frames(hlo_text)
    entry_ops = {ins["name"]: ins for ins in comps[entry]}
    totals = trace_ops(trace_dir, set(entry_ops))
    all_ms = sum(t[0] for t in totals.values()) or 1.0
    cats: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    top = []
    for name, (ms, _) in totals.items():
        cat = categorise(entry_ops[name], comps, frames)
        cats[cat][0] += ms / steps
        cats[cat][1] += 1
        top.append({"name": name, "category": cat, "ms_per_step": ms / steps})
    return {
        "thunk_ms_per_step": all_ms / steps,
        "thunks_traced": len(totals),
        "entry_instructions": len(entry_ops),
        "backends": structure(comps[entry]),
        "categories": sorted(
            (
                {"category": c, "ms_per_step": v[0], "thunks": v[1], "share": v[0] * steps / all_ms}
                for c, v in cats.items()
            ),
            key=lambda r: -r["ms_per_step"],
        ),
        "top": sorted(top, key=lambda r: -r["ms_per_step"]),
    }


# ============================================================================ the two sides
def profile_ours(args: argparse.Namespace) -> dict:
    """Compile, warm up and trace our train step; the summary (and files under out_dir)."""
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import gpu  # benchmarks/gpu.py
    import jax

    from xmedjax import mesh as mesh_lib

    jax.config.update("jax_enable_compilation_cache", False)
    sz = {"width": args.width, "image": args.image_size}
    mesh = mesh_lib.make_mesh()
    step, state, data = gpu.build_train(args.arch, "float32", 8, sz, mesh)
    if args.program == "infer":
        step, data = eval_program(args.arch, state, data, mesh, sz)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    with open(os.path.join(args.out_dir, f"{args.arch}_{args.program}_step.hlo.txt"), "w") as f:
        f.write(hlo)
    if args.compile_only:
        return dict(compile_summary(hlo), compile_s=compile_s)

    def run():
        nonlocal state
        if args.program == "infer":
            return compiled(state, data)["logits"]
        state, metrics = compiled(state, data)
        return metrics

    for _ in range(2):
        jax.block_until_ready(run())
    t0 = time.perf_counter()
    trace_dir = os.path.join(args.out_dir, f"{args.arch}_{args.program}_trace")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            jax.block_until_ready(run())
    wall = (time.perf_counter() - t0) / args.steps
    cost = gpu._cost(compiled)
    out = summarise(hlo, trace_dir, args.steps)
    out.update(
        compile_s=compile_s, step_wall_ms=wall * 1000, gflop_per_step=cost.get("flops", 0) / 1e9
    )
    return out


def eval_program(arch: str, state, data: dict, mesh, sz: dict):
    """cpu.py's inference workload: `train_state.jit_eval_step` and its batch."""
    import numpy as np
    from flax import nnx

    from xmedjax import train_state as ts
    from xmedjax.input_pipeline import to_global_array
    from xmedjax.models import create_model

    mdef = ts.create_train_state(
        nnx.jit(lambda: create_model(arch, 2, width=sz["width"]))(),
        ts.make_optimizer("adam", 1e-4),
    )[0]
    n = data["image"].shape[0]
    host = {
        "image": np.asarray(data["image"]),
        "label": np.zeros(n, np.int32),
        "valid": np.ones(n, np.int32),
        "index": np.arange(n),
    }
    return ts.jit_eval_step(mdef, state, mesh), to_global_array(host, mesh)


PEER_GROUPS = (  # aten op name fragment -> category (first match)
    ("convolution_backward", "conv backward"),
    ("conv", "conv forward"),
    ("batch_norm", "BatchNorm (native kernels, fwd+bwd)"),
    ("addmm", "dense (dot)"),
    ("mm", "dense (dot)"),
    ("pool", "pooling"),
    ("threshold_backward", "elementwise (ReLU, adds)"),
    ("relu", "elementwise (ReLU, adds)"),
    ("add", "elementwise (ReLU, adds)"),
    ("cat", "concatenate / slice / pad"),
    ("copy", "layout: transpose / copy / reverse"),
)


def peer_category(event) -> str:
    """An aten event's group; everything under Optimizer.step is the Adam update."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "Adam update (Optimizer.step, for-each loop on a CPU)"
        if parent.name.startswith("Optimizer.zero_grad"):
            return "other"
        parent = parent.cpu_parent
    return next((c for frag, c in PEER_GROUPS if frag in event.name), "other")


def profile_peer(args: argparse.Namespace) -> dict:
    """torch.profiler over cpu.py's peer train step: self CPU ms per aten op and per group."""
    if args.peer_site:
        sys.path.insert(0, args.peer_site)
    import cpu

    mods, notes = cpu.import_peers()
    torch = mods["torch"]
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = {"image": args.image_size, "dry_run": False}
    call, _ = cpu.peer_makers(mods, cfg)[args.program](args.arch, "float32")
    for _ in range(2):
        call()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            call()
    wall = (time.perf_counter() - t0) / args.steps
    per_op: dict[str, float] = collections.defaultdict(float)
    cats: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        ms = event.self_cpu_time_total / 1000.0 / args.steps
        per_op[event.name] += ms
        cats[peer_category(event)] += ms
    ops = sorted(((n, ms) for n, ms in per_op.items() if ms > 0), key=lambda o: -o[1])
    total = sum(cats.values()) or 1.0
    return {
        "peer": notes,
        "step_wall_ms": wall * 1000,
        "self_ms_per_step": total,
        "categories": [
            {"category": c, "ms_per_step": ms, "share": ms / total}
            for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])
        ],
        "top": [{"name": n, "ms_per_step": ms} for n, ms in ops],
    }


def print_summary(side: str, arch: str, out: dict, top: int) -> None:
    if "step_wall_ms" not in out:  # --compile_only
        print(f"\n{side} {arch}: compile {out['compile_s']:.1f} s, {out['thunks']} thunks")
        print(f"  backends: {out['backends']}")
        for r in out["categories"]:
            print(f"  {r['thunks']:6d}  {r['category']}")
        return
    print(f"\n{side} {arch}: step wall {out['step_wall_ms']:.0f} ms", flush=True)
    for r in out["categories"]:
        print(f"  {r['ms_per_step']:9.1f} ms  {100 * r['share']:5.1f}%  {r['category']}")
    print("  top ops (ms per step):")
    for r in out["top"][:top]:
        print(f"  {r['ms_per_step']:9.1f} ms  {r['name'][:60]:60s} {r.get('category', '')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    out = profile_ours(args) if args.side == "ours" else profile_peer(args)
    out.update(side=args.side, arch=args.arch, load_average=list(os.getloadavg()))
    out.update(argv=sys.argv[1:], xla_flags=os.environ.get("XLA_FLAGS", ""))
    out.update(program=args.program)
    path = os.path.join(args.out_dir, f"{args.side}_{args.arch}_{args.program}_profile.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print_summary(args.side, args.arch, out, args.top)
    print(f"\nwrote {path} (load average {out['load_average']})", flush=True)


if __name__ == "__main__":
    main()
