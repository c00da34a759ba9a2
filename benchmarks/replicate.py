"""The paper's experiments on the real data: four models (+ the 4-class brain DenseNet121).

    python benchmarks/replicate.py --data_root=prepared --out=docs/results.json \
        [--models=brain_densenet121,brain_resnet50,...] [--parallel=2] [--budget_s=330] \
        [--bench_json=$OUT/benchmarks.json] [--cache_dir=.jax_cache] [--override=training.max_epochs=20]
    python benchmarks/replicate.py --dry_run --out=/tmp/results.json   # tiny phantoms, CPU

Each model is one run of the project's own command, in a child process,

    python -m xmedjax.main --config=configs/<config>.py --workdir=<workdir_root>/<model> \
        --config.data.data_dir=<data_root>/<dataset> --config.runtime.compilation_cache_dir=<cache_dir> \
        --config.runtime.progress_bar=False

that is `xmedjax.modes.train_and_evaluate` with the paper's hyper-parameters (configs/default.py:
Adam 1e-4, batch 32, up to 50 epochs, early stopping on val loss with patience 10, the
Keras-style augmentation), FROM SCRATCH: no ImageNet weights are available to us, so these
numbers are not the paper's transfer-learning setting. The run evaluates its best checkpoint
on val and the official test split (threshold chosen on val) and writes Grad-CAM maps of
every test image (WORKDIR/heatmaps/). The leak-free figures come from the same predictions,
restricted to the prepared `test_dedup` split's ids (test images without an exact or near
copy, or a patient, in train/val), with the same val threshold and bootstrap.

Datasets whose prepared folder is missing under --data_root are skipped (a device call
carries one dataset at a time), and results merge into an existing --out, so calls that
carry different datasets fill one docs/results.json. A run cut by --budget_s gets SIGTERM,
saves its latest checkpoint and is marked "preempted": rerun the same command (same
--workdir_root, warm machine) to resume it.

results.json: {"replication": {MODEL: {accuracy, accuracy_dedup, auc_roc, auc_roc_dedup, f1,
f1_dedup, average_precision, average_precision_dedup, ci95, ci95_dedup, n_test, n_test_dedup,
wall_s, epochs, status, ...}}, "replication_meta": {...}, "benchmarks": {...}}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "dry_run", False, "tiny phantom datasets built in a temporary folder, tiny models, CPU"
)
flags.DEFINE_list("models", [], "models to run (default: every model whose dataset is present)")
flags.DEFINE_string(
    "data_root", "prepared", "folder holding brain_binary/, brain_4class/, chest_xray/"
)
flags.DEFINE_string("workdir_root", "runs/replicate", "one work directory per model below this")
flags.DEFINE_string("out", "docs/results.json", "results JSON (merged into when it exists)")
flags.DEFINE_string("bench_json", "", "benchmarks/gpu.py output to merge under 'benchmarks'")
flags.DEFINE_integer("parallel", 2, "models trained at once (processes sharing the GPU)")
flags.DEFINE_float(
    "budget_s", 0.0, "SIGTERM every run still going after this many seconds (0 = none)"
)
flags.DEFINE_string("cache_dir", ".jax_cache", "persistent compilation cache shared by the runs")
flags.DEFINE_float(
    "eval_reserve_s",
    60.0,
    "seconds of --budget_s kept for evaluating the best checkpoint of runs cut by the budget",
)
flags.DEFINE_list(
    "override", [], "extra config overrides KEY=VALUE for every run (e.g. training.max_epochs=20)"
)
flags.DEFINE_bool("fresh", False, "delete each model's work directory first (default: resume)")
flags.DEFINE_string("copy_logs_to", "", "also copy each run's log here (e.g. $OUT)")

# model -> (config file, prepared dataset folder)
MODELS = {
    "brain_densenet121": ("configs/brain_densenet.py", "brain_binary"),
    "chest_densenet121": ("configs/chest_densenet.py", "chest_xray"),
    "brain_resnet50": ("configs/brain_resnet.py", "brain_binary"),
    "chest_resnet50": ("configs/chest_resnet.py", "chest_xray"),
    "brain4_densenet121": ("configs/brain4_densenet.py", "brain_4class"),
}
PAPER_FOUR = ("brain_resnet50", "brain_densenet121", "chest_resnet50", "chest_densenet121")
HEADLINE = ("accuracy", "auc_roc", "f1", "average_precision", "sensitivity", "specificity")

# tiny settings for --dry_run (the shape of tests/test_train.py's tiny config)
DRY_OVERRIDES = (
    "model.width=0.0625",
    "data.image_size=32",
    "training.batch_size=8",
    "training.eval_batch_size=16",
    "training.max_epochs=1",
    "evaluate.bootstrap_samples=20",
    "explain.quality=False",
    "explain.batch_size=16",
    "training.log_every_steps=1",
)


def log(msg: str) -> None:
    print(f"[replicate.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- dry-run data
def make_dry_run_data(
    root: str,
    size: int = 32,
    datasets: tuple[str, ...] = ("brain_binary", "brain_4class", "chest_xray"),
) -> str:
    """Tiny raw folders in the Kaggle layouts (phantoms), prepared by prepare_gpu_data.sh.

    Two train images are copied into test, so test_dedup is smaller than test.
    """
    from data_prep.phantoms import write_phantom_folder

    raw = os.path.join(root, "raw")
    # brain: Training/Testing with glioma/meningioma/pituitary (tumour phantoms, round robin) and notumor
    tmp = write_phantom_folder(
        os.path.join(root, "ph_brain"), "brain", {"train": 72, "test": 24}, size=size, seed=1
    )
    for split, dst_split in (("train", "Training"), ("test", "Testing")):
        for c in ("glioma", "meningioma", "notumor", "pituitary"):
            os.makedirs(os.path.join(raw, "brain_tumor_mri", dst_split, c), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(tmp, split, "notumor"))):
            shutil.copy(
                os.path.join(tmp, split, "notumor", name),
                os.path.join(
                    raw, "brain_tumor_mri", dst_split, "notumor", name.replace(".png", ".jpg")
                ),
            )
        for i, name in enumerate(sorted(os.listdir(os.path.join(tmp, split, "tumor")))):
            c = ("glioma", "meningioma", "pituitary")[i % 3]
            shutil.copy(
                os.path.join(tmp, split, "tumor", name),
                os.path.join(raw, "brain_tumor_mri", dst_split, c, name.replace(".png", ".jpg")),
            )
    # chest: train/val/test with NORMAL/PNEUMONIA
    tmp = write_phantom_folder(
        os.path.join(root, "ph_chest"),
        "chest",
        {"train": 64, "val": 8, "test": 24},
        size=size,
        seed=2,
    )
    shutil.copytree(tmp, os.path.join(raw, "chest_xray"))
    for ds, train, test in (
        ("brain_tumor_mri", "Training", "Testing"),
        ("chest_xray", "train", "test"),
    ):
        for c in sorted(os.listdir(os.path.join(raw, ds, train)))[:2]:
            src_dir = os.path.join(raw, ds, train, c)
            name = sorted(os.listdir(src_dir))[0]
            shutil.copy(os.path.join(src_dir, name), os.path.join(raw, ds, test, c, "leak_" + name))
    prepared = os.path.join(root, "prepared")
    env = dict(
        os.environ,
        SRC=raw,
        OUT=prepared,
        SIZE=str(size),
        WHEELS="0",
        PY=sys.executable,
        ONLY=",".join(datasets),
    )
    subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "prepare_gpu_data.sh")],
        env=env,
        check=True,
        cwd=ROOT,
    )
    return prepared


# ----------------------------------------------------------------------------- one run
def run_command(
    model: str, data_root: str, workdir: str, cache_dir: str, overrides: list[str]
) -> list[str]:
    config, dataset = MODELS[model]
    cmd = [
        sys.executable,
        "-m",
        "xmedjax.main",
        f"--config={os.path.join(ROOT, config)}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={os.path.abspath(os.path.join(data_root, dataset))}",
        "--config.runtime.progress_bar=False",
    ]
    if cache_dir:
        cmd.append(f"--config.runtime.compilation_cache_dir={os.path.abspath(cache_dir)}")
    cmd += [f"--config.{o}" for o in overrides]
    return cmd


def dedup_metrics(
    workdir: str, data_dir: str, metrics_json: dict, bootstrap: int, seed: int
) -> dict:
    """Metrics of the official test predictions restricted to the test_dedup split's ids."""
    import numpy as np

    from xmedjax import input_pipeline, metrics

    info = input_pipeline.read_dataset_info(data_dir)
    if "test_dedup" not in info.splits:
        return {"note": f"{data_dir} has no test_dedup split (build with --dedup_test)"}
    source = input_pipeline.PreparedSource(data_dir, "test_dedup")
    ids = set()
    for i in range(len(source)):
        rid = source[i]["id"]
        ids.add(rid.decode() if isinstance(rid, bytes) else str(rid))
    with np.load(os.path.join(workdir, "predictions", "test.npz"), allow_pickle=False) as z:
        keep = np.array([str(i) in ids for i in z["ids"]])
        labels, probs = z["labels"][keep], z["probabilities"][keep]
    threshold = (metrics_json.get("test") or {}).get("threshold")
    result = metrics.classification_metrics(
        labels,
        probs,
        threshold=0.5 if threshold is None else threshold,
        label_names=info.label_names,
        bootstrap_samples=bootstrap,
        seed=seed,
    )
    result["ids_matched"] = int(keep.sum())
    result["ids_in_split"] = len(ids)
    return result


def epoch_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "epoch":
                out.append(rec)
    return out


def gather(
    model: str, workdir: str, data_dir: str, status: str, wall_s: float, bootstrap: int
) -> dict:
    """The results.json entry of one finished (or failed/preempted) run."""
    entry: dict = {
        "status": status,
        "wall_s": round(wall_s, 1),
        "from_scratch": True,
        "config": MODELS[model][0],
        "data_dir": data_dir,
        "workdir": workdir,
    }
    epochs = epoch_records(workdir)
    if epochs:
        entry["epochs"] = epochs[-1].get("epoch")
        entry["best_val_loss"] = min(
            (e["val_loss"] for e in epochs if e.get("val_loss") is not None), default=None
        )
        entry["train_wall_s"] = (
            round(epochs[-1]["time"] - epochs[0]["time"], 1) if len(epochs) > 1 else None
        )
    path = os.path.join(workdir, "metrics.json")
    if not (status == "ok" or "evaluated" in status) or not os.path.isfile(path):
        return entry
    with open(path) as f:
        m = json.load(f)
    test = m.get("test") or {}
    for k in HEADLINE:
        entry[k] = test.get(k)
    entry["ci95"] = test.get("ci95")
    entry["n_test"] = test.get("n")
    entry["threshold"] = test.get("threshold")
    entry["val_accuracy"] = (m.get("val") or {}).get("accuracy")
    entry["checkpoint_step"] = m.get("checkpoint_step")
    sb = m.get("shortcut_baseline")
    if isinstance(sb, dict):
        entry["shortcut_baseline"] = {
            k: v for k, v in sb.items() if not isinstance(v, (dict, list))
        }
    try:
        seed = 0
        cfg_path = os.path.join(workdir, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            seed = cfg.get("training", {}).get("seed", 0)
            entry["image_size"] = cfg.get("data", {}).get("image_size")
            entry["dtype"] = cfg.get("model", {}).get("dtype")
            entry["width"] = cfg.get("model", {}).get("width")
        dd = dedup_metrics(workdir, data_dir, m, bootstrap, seed)
        for k in HEADLINE:
            entry[f"{k}_dedup"] = dd.get(k)
        entry["ci95_dedup"] = dd.get("ci95")
        entry["n_test_dedup"] = dd.get("n")
        if "note" in dd:
            entry["dedup_note"] = dd["note"]
    except Exception as exc:  # noqa: BLE001 - keep the official figures
        entry["dedup_note"] = f"failed: {type(exc).__name__}: {exc}"
    heat = os.path.join(workdir, "heatmaps")
    entry["heatmaps"] = sorted(os.listdir(heat)) if os.path.isdir(heat) else []
    return entry


# ----------------------------------------------------------------------------- orchestration
def load_json(path: str) -> dict:
    if path and os.path.isfile(path):
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError:
                return {}
    return {}


def write_results(path: str, replication: dict, meta: dict, bench: dict | None) -> None:
    out = load_json(path)
    out.setdefault("replication", {}).update(replication)
    out.setdefault("replication_meta", {}).update(meta)
    if bench:
        out["benchmarks"] = bench.get("benchmarks", {})
        out["benchmarks_meta"] = bench.get("meta", {})
    out.setdefault("benchmarks", {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)


def main(argv):
    del argv
    t_start = time.time()
    data_root, overrides = FLAGS.data_root, list(FLAGS.override)
    workdir_root, cache_dir = FLAGS.workdir_root, FLAGS.cache_dir
    tmp_root = None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    # This process only reads records and computes metrics: keep JAX here off the GPU, which the runs share.
    os.environ["JAX_PLATFORMS"] = "cpu"
    if FLAGS.dry_run:
        tmp_root = tempfile.mkdtemp(prefix="xmedjax_replicate_dry_")
        log(f"dry run: tiny phantom datasets in {tmp_root}")
        wanted_models = [m.strip() for m in FLAGS.models if m.strip() in MODELS] or list(MODELS)
        data_root = make_dry_run_data(
            tmp_root, datasets=tuple(sorted({MODELS[m][1] for m in wanted_models}))
        )
        workdir_root = os.path.join(tmp_root, "runs")
        cache_dir = cache_dir if FLAGS["cache_dir"].present else os.path.join(tmp_root, "jax_cache")
        overrides = list(DRY_OVERRIDES) + overrides
        env["JAX_PLATFORMS"] = "cpu"
        if not FLAGS["out"].present:
            FLAGS.out = os.path.join(tempfile.gettempdir(), "xmedjax_replicate_dry_results.json")
    models = [m.strip() for m in FLAGS.models if m.strip()] or list(MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"replicate.py: unknown --models {unknown}; choose from {list(MODELS)}")
    skipped = {
        m: f"dataset {os.path.join(data_root, MODELS[m][1])} not present (not carried in this call?)"
        for m in models
        if not os.path.isfile(os.path.join(data_root, MODELS[m][1], "xmedjax_dataset.json"))
    }
    todo = [m for m in MODELS if m in models and m not in skipped]  # MODELS order: DenseNets first
    for m, why in skipped.items():
        log(f"skip {m}: {why}")
    parallel = max(1, FLAGS.parallel)
    if not FLAGS.dry_run and parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.2f}")
    bootstrap = 20 if FLAGS.dry_run else 1000
    for o in overrides:
        if o.startswith("evaluate.bootstrap_samples="):
            bootstrap = int(o.split("=", 1)[1])

    running: dict[str, dict] = {}
    results: dict[str, dict] = {}
    queue = list(todo)
    deadline = t_start + max(0.0, FLAGS.budget_s - FLAGS.eval_reserve_s) if FLAGS.budget_s else None
    terminated = False
    while queue or running:
        while queue and len(running) < parallel and not terminated:
            m = queue.pop(0)
            workdir = os.path.abspath(os.path.join(workdir_root, m))
            if FLAGS.fresh and os.path.isdir(workdir):
                shutil.rmtree(workdir)
            os.makedirs(workdir, exist_ok=True)
            cmd = run_command(m, data_root, workdir, cache_dir, overrides)
            logf = open(os.path.join(workdir, "replicate_log.txt"), "a")  # noqa: SIM115
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
            running[m] = {"proc": proc, "t0": time.time(), "workdir": workdir, "log": logf}
            log(f"start {m} (pid {proc.pid}): {' '.join(cmd[2:])}")
        if deadline is not None and time.time() > deadline and running and not terminated:
            terminated = True
            for m, r in running.items():
                log(
                    f"budget reached: SIGTERM {m} (it saves its latest checkpoint; rerun to resume)"
                )
                r["proc"].send_signal(signal.SIGTERM)
            for m in queue:
                results[m] = {"status": "not started: time budget", "from_scratch": True}
            queue.clear()
        for m in list(running):
            r = running[m]
            rc = r["proc"].poll()
            if rc is None:
                if (
                    terminated
                    and time.time() - r["t0"] > 0
                    and deadline is not None
                    and time.time() > deadline + 90
                ):
                    r["proc"].kill()
                continue
            r["log"].close()
            wall = time.time() - r["t0"]
            status = (
                "ok"
                if rc == 0
                else ("preempted: rerun to resume" if rc == 143 else f"failed (exit {rc})")
            )
            data_dir = os.path.abspath(os.path.join(data_root, MODELS[m][1]))
            if rc == 143 and os.path.isdir(os.path.join(r["workdir"], "checkpoints", "best")):
                # cut by the budget: evaluate the best checkpoint so far (figures of an unfinished run)
                cmd = run_command(m, data_root, r["workdir"], cache_dir, overrides) + [
                    "--config.mode=evaluate"
                ]
                with open(os.path.join(r["workdir"], "replicate_log.txt"), "a") as logf:
                    logf.write(f"$ {' '.join(cmd)}\n")
                    logf.flush()
                    try:
                        erc = subprocess.run(
                            cmd,
                            cwd=ROOT,
                            env=env,
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            timeout=max(30.0, FLAGS.eval_reserve_s),
                            check=False,
                        ).returncode
                    except subprocess.TimeoutExpired:
                        erc = -1
                if erc == 0:
                    status = "preempted: best checkpoint so far evaluated; rerun to resume"
            results[m] = gather(m, r["workdir"], data_dir, status, wall, bootstrap)
            log(
                f"done {m}: {status} in {wall:.0f} s; test acc {results[m].get('accuracy')}, "
                f"dedup acc {results[m].get('accuracy_dedup')}, AUC {results[m].get('auc_roc')}"
            )
            if rc != 0:
                with open(os.path.join(r["workdir"], "replicate_log.txt")) as f:
                    tail = f.read()[-3000:]
                log(f"{m} log tail:\n{tail}")
            if FLAGS.copy_logs_to:
                os.makedirs(FLAGS.copy_logs_to, exist_ok=True)
                shutil.copy(
                    os.path.join(r["workdir"], "replicate_log.txt"),
                    os.path.join(FLAGS.copy_logs_to, f"{m}.log"),
                )
            del running[m]
            meta = {
                "data_root": os.path.abspath(data_root),
                "parallel": parallel,
                "overrides": overrides,
                "dry_run": FLAGS.dry_run,
                "from_scratch": "no ImageNet weights are available to us",
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_results(FLAGS.out, {m: results[m]}, meta, None)
        time.sleep(0.5)

    wall = time.time() - t_start
    four = [m for m in PAPER_FOUR if results.get(m, {}).get("status") == "ok"]
    meta = {
        "wall_s_this_command": round(wall, 1),
        "models_this_command": todo,
        "skipped": skipped,
        "parallel": parallel,
        "overrides": overrides,
        "dry_run": FLAGS.dry_run,
        "from_scratch": "no ImageNet weights are available to us",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if len(four) == 4 and set(PAPER_FOUR) <= set(todo):
        meta["four_model_wall_s"] = round(wall, 1)
    try:  # never initialise a GPU backend in this process (its runs hold the GPU)
        meta["device"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        meta["device"] = "cpu" if FLAGS.dry_run else "unknown"
    bench = load_json(FLAGS.bench_json) if FLAGS.bench_json else None
    write_results(FLAGS.out, results, meta, bench)
    print(
        f"\n{'model':22s} {'status':12s} {'acc':>6s} {'acc_dd':>6s} {'AUC':>6s} {'AUC_dd':>6s} {'F1':>6s} "
        f"{'AP':>6s} {'n':>5s} {'n_dd':>5s} {'wall':>6s}",
        flush=True,
    )

    def f(v):
        return "  n/a" if v is None else f"{v:6.3f}"

    for m in todo:
        r = results.get(m, {})
        print(
            f"{m:22s} {r.get('status', '?')[:12]:12s} {f(r.get('accuracy'))} {f(r.get('accuracy_dedup'))} "
            f"{f(r.get('auc_roc'))} {f(r.get('auc_roc_dedup'))} {f(r.get('f1'))} {f(r.get('average_precision'))} "
            f"{r.get('n_test', '-')!s:>5s} {r.get('n_test_dedup', '-')!s:>5s} {r.get('wall_s', 0):6.0f}",
            flush=True,
        )
    log(f"wrote {FLAGS.out}; wall {wall:.0f} s (from scratch: no ImageNet weights)")
    if tmp_root and not os.environ.get("XMEDJAX_KEEP_DRY_RUN"):
        shutil.rmtree(tmp_root, ignore_errors=True)
    bad = [m for m in todo if results.get(m, {}).get("status") != "ok"]
    if bad and FLAGS.dry_run:
        sys.exit(f"replicate.py: dry run failed for {bad}")


if __name__ == "__main__":
    app.run(main)
