"""Multi-host correctness with local processes (the TPU-pod code path, on CPU).

Two processes on localhost, each with 2 fake CPU devices, joined by
`jax.distributed.initialize` (gloo CPU collectives):
- float64 SGD steps on phantom batches read through the input pipeline give the same
  parameters as one process with 4 devices on the same global batches, and each process
  reads a disjoint half of every global batch;
- `python -m xmedjax.main` trains, checkpoints and evaluates; only process 0 writes
  metrics, reports and heatmaps; the checkpoint the two processes wrote restores in one.
(float64: a freshly initialised narrow ResNet with BatchNorm over tiny batches amplifies
float32 rounding so much that one device and four already part after two steps.)
Not covered here: TPU hardware, a real network between hosts, gs:// paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_prep.phantoms import build_phantom_dataset

pytestmark = pytest.mark.slow  # every test here shares one expensive fixture

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    for key in ("XMEDJAX_COORDINATOR_ADDRESS", "XMEDJAX_NUM_PROCESSES", "XMEDJAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def _start(args: list[str], devices: int, log) -> subprocess.Popen:
    # Output to files, not pipes: a full pipe would stall a process inside a collective.
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        env=_env(devices),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: dict, root) -> None:
    for proc in procs.values():
        proc.wait(timeout=600)
    failed = {n: p.returncode for n, p in procs.items() if p.returncode}
    assert not failed, "\n".join(
        f"{n} (exit {rc}):\n{(root / f'{n}.log').read_text()[-3000:]}" for n, rc in failed.items()
    )


def _main_flags(data_dir: str, workdir: str) -> list[str]:
    return [
        f"--config={os.path.join(HERE, '..', 'configs', 'demo.py')}",
        f"--workdir={workdir}",
        "--config.data.dataset=prepared",
        f"--config.data.data_dir={data_dir}",
        "--config.model.width=0.0625",
        "--config.training.batch_size=8",
        "--config.training.eval_batch_size=8",
        f"--config.training.max_steps={STEPS}",
        "--config.training.checkpoint_every_steps=2",
        "--config.evaluate.bootstrap_samples=20",
        "--config.explain.quality=False",
        "--config.runtime.progress_bar=False",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data_dir = build_phantom_dataset(
        str(root / "data"),
        kind="brain",
        counts={"train": 48, "val": 16, "test": 16},
        size=64,
        seed=0,
    )
    two, one = str(root / "two"), str(root / "one")
    port, port2 = _free_port(), _free_port()
    procs = {}
    for pid in range(2):
        procs[f"steps{pid}"] = _start(
            [
                "steps",
                str(root / "steps2"),
                data_dir,
                str(STEPS),
                f"127.0.0.1:{port}",
                "2",
                str(pid),
            ],
            2,
            open(root / f"steps{pid}.log", "w"),
        )
    procs["steps_single"] = _start(
        ["steps", str(root / "steps1"), data_dir, str(STEPS)],
        4,
        open(root / "steps_single.log", "w"),
    )
    _wait(procs, root)
    procs = {}
    for pid in range(2):
        flags = _main_flags(data_dir, two) + [
            "--config.runtime.distributed=on",
            f"--config.runtime.coordinator_address=127.0.0.1:{port2}",
            "--config.runtime.num_processes=2",
            f"--config.runtime.process_id={pid}",
        ]
        procs[f"main{pid}"] = _start(
            ["main", str(root / f"writes{pid}.txt"), "--", *flags],
            2,
            open(root / f"main{pid}.log", "w"),
        )
    _wait(procs, root)
    return {"root": root, "data_dir": data_dir, "two": two, "one": one}


def test_two_processes_compute_the_same_train_steps_as_one(runs):
    root = runs["root"]
    two, one = np.load(root / "steps2.npz"), np.load(root / "steps1.npz")
    meta = [json.loads((root / f"steps2.p{i}.json").read_text()) for i in range(2)]
    single = json.loads((root / "steps1.p0.json").read_text())
    assert [m["processes"] for m in meta] == [2, 2] and meta[0]["devices"] == single["devices"] == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-9)
    leaves = [k for k in one.files if k.startswith("leaf")]
    assert len(leaves) > 100 and set(leaves) == {k for k in two.files if k.startswith("leaf")}
    for key in leaves:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-7, atol=1e-9, err_msg=key)


def test_each_process_reads_a_disjoint_half_of_every_batch(runs):
    root = runs["root"]
    halves = [json.loads((root / f"steps2.p{i}.json").read_text())["digests"] for i in range(2)]
    whole = json.loads((root / "steps1.p0.json").read_text())["digests"]
    for step in range(STEPS):
        first, second = halves[0][step], halves[1][step]
        assert len(first) == len(second) == 4
        assert not set(first) & set(second)
        assert first + second == whole[step]  # process 0 holds the first half of the global batch


def test_only_process_zero_writes_reports_and_heatmaps(runs):
    def outputs(pid):
        paths = (runs["root"] / f"writes{pid}.txt").read_text().split()
        return [p for p in paths if p.startswith(runs["two"]) and "/checkpoints/" not in p]

    first, second = outputs(0), outputs(1)
    for name in ("metrics.json", "report.html", "heatmaps/test_gradcam.npz"):
        assert any(name in p for p in first), (
            name,
            first,
        )  # (heatmaps are written to a temp name first)
        assert os.path.isfile(os.path.join(runs["two"], name))
    assert second == [], f"process 1 wrote {second}"
    ckpt = os.path.join(runs["two"], "checkpoints", "latest", str(STEPS), "data_iter")
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_a_checkpoint_written_by_two_processes_restores_in_one(runs):
    os.remove(os.path.join(runs["two"], "metrics.json"))
    cmd = [
        sys.executable,
        "-m",
        "xmedjax.main",
        *_main_flags(runs["data_dir"], runs["two"]),
        "--config.mode=evaluate",
    ]
    out = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(runs["two"], "metrics.json")) as f:
        metrics = json.load(f)
    assert {"accuracy", "auc_roc", "ci95"} <= set(metrics["test"])
