"""One command at a time per work directory: an advisory lock on WORKDIR/.lock.

    with workdir_lock.hold(workdir):   # every mode of python -m xmedjax.main
        ...

`hold` takes an exclusive `fcntl.flock` on WORKDIR/.lock for the block. The kernel drops
it when the holder exits in any way (kill -9 included), so a crashed command never leaves
the directory stuck; the file itself stays (it names the last holder) and is never deleted:
deleting it while held would let a second command lock a new file. A second command on a
busy directory stops at once with `WorkdirBusy`, one line naming the directory and the
holder's pid. Right after taking the lock, checkpoint saves that an earlier command left
unfinished (`*.orbax-checkpoint-tmp*`) are removed: no command can be writing them.

Several processes (one run over hosts or GPUs): process 0 alone takes the lock (the file
is written by process 0 only, like everything outside checkpoints/) and tells the others
the outcome, so every process of a second launch stops with the same line. The lock is
re-entrant within a process. Paths with a scheme (gs://) are not locked (no flock there).
Read-only tools (`runs.load_trained`, `python -m xmedjax.compare`) take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import IO

LOCK_FILE = ".lock"

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_held: dict[str, list] = {}  # real path -> [open lock file, depth]


class WorkdirBusy(RuntimeError):
    """Another command holds the work directory; one line naming it and the holder's pid."""


def lock_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), LOCK_FILE)


def _holder(f: IO[str]) -> dict:
    """What the holder wrote into the lock file ({} when nothing readable yet)."""
    for _ in range(20):  # the holder writes its pid right after locking
        f.seek(0)
        text = f.read().strip()
        if text:
            try:
                return json.loads(text)
            except ValueError:
                return {}
        time.sleep(0.05)
    return {}


def _busy_message(workdir: str, holder: dict) -> str:
    pid = holder.get("pid")
    who = f"pid {pid}" if pid else "pid unknown"
    host = holder.get("host")
    if host and host != socket.gethostname():
        who += f" on {host}"
    if holder.get("started"):
        who += f", started {holder['started']}"
    return (
        f"{workdir} is in use by another command ({who}); wait for it to end, or use "
        "another --workdir"
    )


def _acquire(workdir: str) -> tuple[IO[str] | None, str | None]:
    """(open locked file, None), (None, why busy), or (None, None) where flock is unsupported."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _busy_message(workdir, _holder(f))
        f.close()
        return None, message
    except OSError as err:
        f.close()
        if err.errno not in _UNSUPPORTED:
            raise
        print(
            f"warning: {path}: file locks are not supported here ({os.strerror(err.errno)}); "
            "running without the work-directory lock",
            file=sys.stderr,
            flush=True,
        )
        return None, None
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    f.seek(0)
    f.truncate()
    f.write(json.dumps(me) + "\n")
    f.flush()
    return f, None


def _share_outcome(busy: str | None) -> str | None:
    """Process 0's outcome on every process (`busy` is ignored on the others)."""
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return busy
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    text = (busy or "").encode()[:4096] if jax.process_index() == 0 else b""
    buf = np.zeros(4096, np.uint8)
    buf[: len(text)] = np.frombuffer(text, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    shared = bytes(buf[buf != 0]).decode(errors="replace")
    return shared or None


def _clean_interrupted_saves(workdir: str) -> None:
    from xmedjax import checkpointing  # noqa: PLC0415

    removed = checkpointing.remove_interrupted_saves(workdir)
    if removed:
        print(
            f"removed {len(removed)} unfinished checkpoint save(s) of an earlier command: "
            + ", ".join(removed),
            flush=True,
        )


def _lock_here(workdir: str) -> tuple[IO[str] | None, BaseException | None, str | None]:
    """Process 0's attempt: (locked file, its error, the line every process stops with)."""
    f = None
    try:
        f, busy = _acquire(workdir)
        if f is not None:
            _clean_interrupted_saves(workdir)  # before the other processes go on
    except OSError as err:  # a read-only or missing parent folder: the others stop too
        from xmedjax.cli_errors import describe  # noqa: PLC0415

        if f is not None:
            f.close()
        return None, err, describe(err)
    return f, None, busy


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds WORKDIR's lock for the block (creating WORKDIR); WorkdirBusy if another has it."""
    remote = "://" in workdir
    workdir = os.path.abspath(os.path.expanduser(workdir))
    key = os.path.realpath(workdir)
    if remote or key in _held:  # not lockable, or this process holds it already
        _held.setdefault(key, [None, 0])[1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
            if not _held[key][1]:
                del _held[key]
        return
    import jax  # noqa: PLC0415

    f, error, busy = _lock_here(workdir) if jax.process_index() == 0 else (None, None, None)
    busy = _share_outcome(busy)
    if error is not None:
        raise error
    if busy:
        raise WorkdirBusy(busy)
    _held[key] = [f, 1]
    try:
        yield
    finally:
        del _held[key]
        if f is not None:
            f.close()  # releases the flock


__all__ = ["LOCK_FILE", "WorkdirBusy", "hold", "lock_path"]
