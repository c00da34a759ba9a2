"""One command per work directory (xmedjax.workdir_lock): a second one stops at once with
one line naming the directory and the holder's pid; a lock left by a kill -9'ed process
does not block; unfinished checkpoint saves are removed under the lock; with several
processes, process 0 locks and every process learns the outcome."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_configs import _main

from xmedjax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

# Another command holding the lock (what workdir_lock writes, without importing JAX).
HOLDER = """
import fcntl, json, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
f = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(json.dumps({"pid": os.getpid()})); f.flush()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """(workdir, process) of another process holding the lock of tmp_path/w."""
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield workdir, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _busy_line(workdir: str, pid: int) -> str:
    return (
        f"{workdir} is in use by another command (pid {pid}); wait for it to end, or use "
        "another --workdir"
    )


def test_a_second_command_on_a_busy_workdir_stops_at_once(holder):
    workdir, proc = holder
    res = _main("--config=configs/demo.py", f"--workdir={workdir}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [f"error: {_busy_line(workdir, proc.pid)}"]
    assert os.listdir(workdir) == [".lock"]  # no phantoms, no config.json, no checkpoints
    with pytest.raises(workdir_lock.WorkdirBusy) as err:  # the same in-process
        with workdir_lock.hold(workdir):
            pass
    assert str(err.value) == _busy_line(workdir, proc.pid)


def test_a_lock_left_by_a_killed_process_does_not_block(holder, capsys):
    workdir, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.load(open(workdir_lock.lock_path(workdir)))["pid"] == proc.pid  # still there
    with workdir_lock.hold(workdir):
        with workdir_lock.hold(workdir):  # re-entrant in one process
            mine = json.load(open(workdir_lock.lock_path(workdir)))
        assert mine["pid"] == os.getpid() and mine["argv"] == sys.argv
        res = subprocess.run(
            [sys.executable, "-c", HOLDER.replace("LOCK_EX)", "LOCK_EX | fcntl.LOCK_NB)"), workdir],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1 and "BlockingIOError" in res.stderr  # held by this process
    with workdir_lock.hold(workdir):  # released at the end of the block
        pass
    assert capsys.readouterr().out == ""


def test_unfinished_checkpoint_saves_are_removed_under_the_lock(tmp_path, capsys):
    workdir = tmp_path / "w"
    latest, best = workdir / "checkpoints" / "latest", workdir / "checkpoints" / "best"
    stale = [
        latest / "5.orbax-checkpoint-tmp-1722000000" / "state",
        latest / "6.orbax-checkpoint-tmp",
        best / "4.orbax-checkpoint-tmp-17",
    ]
    kept = [latest / "3" / "state", latest / "4.damaged", best / "3"]
    for path in stale + kept:
        path.mkdir(parents=True)
        (path / "data").write_bytes(b"x")
    with workdir_lock.hold(str(workdir)):
        assert all(p.exists() for p in kept)
        assert not any(
            (latest / n).exists()
            for n in ("5.orbax-checkpoint-tmp-1722000000", "6.orbax-checkpoint-tmp")
        )
        assert not (best / "4.orbax-checkpoint-tmp-17").exists()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("removed 3 unfinished checkpoint save(s)"), out


def test_remote_work_directories_are_not_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with workdir_lock.hold("gs://bucket/runs/demo"):  # no flock on gs://: nothing created
        with workdir_lock.hold("gs://bucket/runs/demo"):
            pass
    assert os.listdir(tmp_path) == []


# Two processes of one launch (jax.distributed on CPU) try the lock of WORKDIR.
DISTRIBUTED = """
import sys
from xmedjax import mesh, workdir_lock
workdir, address, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
mesh.initialize_distributed("on", address, 2, pid)
try:
    with workdir_lock.hold(workdir):
        print("held", flush=True)
except workdir_lock.WorkdirBusy as err:
    print("busy:", err, flush=True)
"""


def _two_processes(workdir: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED, workdir, address, str(pid)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def test_several_processes_share_process_0s_outcome(holder):
    workdir, proc = holder
    busy = f"busy: {_busy_line(workdir, proc.pid)}"
    assert _two_processes(workdir) == [busy, busy]
    proc.kill()
    proc.wait(timeout=30)
    assert _two_processes(workdir) == ["held", "held"]
