"""Every failure of a command is one line naming the file and what to do (cli_errors), the
traceback only under --verbosity=1 or in a log file; writes name their file when the disk is
full; xmedjax.convert with a missing or garbage file ends in one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging  # noqa: F401 (defines --verbosity)

from data_prep.dataset_format import DatasetError
from xmedjax import cli_errors, json_io, logging_utils
from xmedjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _run(exc: BaseException, capsys, **kwargs) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of a command whose main raises `exc`."""

    @cli_errors.one_line_errors("cmd", **kwargs)
    def main() -> None:
        raise exc

    with pytest.raises(SystemExit) as end:
        main()
    return end.value.code, capsys.readouterr().err.strip().splitlines()


def test_expected_errors_are_one_line(capsys, tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", "/w/metrics.json")
    assert _run(full, capsys) == (
        1,
        ["cmd: error: No space left on device: /w/metrics.json (free some disk space, then rerun)"],
    )
    denied = PermissionError(errno.EACCES, "Permission denied", "/w")
    code, lines = _run(denied, capsys)
    assert code == 1 and lines == [
        "cmd: error: Permission denied: /w (make it writable (or readable) or choose another folder)"
    ]
    assert _run(ConfigError("config.x must be > 0"), capsys) == (
        1,
        ["cmd: config error: config.x must be > 0"],
    )
    # An expected error raised as the cause of another (a Grain worker's re-raise, say).
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = DatasetError("/d/x.array_record: corrupted; rebuild it")
    assert _run(wrapped, capsys) == (1, ["cmd: error: /d/x.array_record: corrupted; rebuild it"])
    assert _run(ValueError("bad flag"), capsys, expected=(ValueError,)) == (
        1,
        ["cmd: error: bad flag"],
    )
    assert _run(KeyboardInterrupt(), capsys) == (130, ["cmd: interrupted"])


def test_a_bug_is_one_line_with_its_traceback_in_a_log_file(capsys, tmp_path):
    log = str(tmp_path / "errors.log")
    code, lines = _run(ZeroDivisionError("division by zero"), capsys, log_file=log)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("cmd: internal error: ZeroDivisionError: division by zero")
    assert f"traceback in {log}" in lines[0]
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text
    # Without a log file, a new one in the temp folder.
    code, lines = _run(KeyError("k"), capsys)
    where = lines[0].split("traceback in ")[1].split(";")[0]
    assert os.path.isfile(where) and "KeyError" in open(where).read()
    os.remove(where)


def test_verbosity_1_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.setattr(flags.FLAGS, "verbosity", 1)
    code, lines = _run(FileNotFoundError(errno.ENOENT, "No such file", "/x"), capsys)
    assert code == 1 and lines[0].startswith("Traceback") and lines[-1].startswith("cmd: error:")


def test_writes_name_their_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC and, like a full disk, names no file."""
    target = str(tmp_path / "metrics.json")
    monkeypatch.setattr(json_io, "open", lambda *a, **k: open("/dev/full", "w"), raising=False)
    with pytest.raises(OSError) as err:
        json_io.write_json(target, {"a": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == target
    assert not os.path.exists(target)
    monkeypatch.undo()
    writer = logging_utils.MetricWriter(str(tmp_path), tensorboard=False)
    writer._jsonl = open("/dev/full", "w", buffering=1)
    with pytest.raises(OSError) as err:
        writer.write(1, {"loss": 0.5})
    assert err.value.filename == os.path.join(str(tmp_path), "metrics.jsonl")
    assert "metrics.jsonl" in cli_errors.describe(err.value)


def _convert(tmp_path, src: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "xmedjax.convert",
        "--arch=resnet50",
        f"--src={src}",
        f"--out={tmp_path / 'out'}",
        *extra,
    ]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["missing.safetensors", "garbage.safetensors", "garbage.pth"])
def test_convert_with_a_missing_or_garbage_file_is_one_line(tmp_path, name):
    src = tmp_path / name
    if name.startswith("garbage"):
        src.write_bytes(b"<html>404 Not Found</html>" * 10)
    res = _convert(tmp_path, str(src))
    assert res.returncode == 1, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith("xmedjax.convert: error: ") and str(src) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_convert_verbosity_1_shows_the_traceback(tmp_path):
    res = _convert(tmp_path, str(tmp_path / "missing.pth"), "--verbosity=1")
    assert res.returncode == 1 and "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("xmedjax.convert: error: ")
