"""Data failures end in one line naming the file and the fix, and never lose a dataset.

A rebuild killed at any moment (kill -9 mid-write, a failing writer, a failing commit) leaves
the previous prepared dataset whole; a dataset whose records are missing or corrupted says
which file and how to rebuild; a one-class dataset is refused at build and before training;
an empty class folder is said on the console; the data_prep commands end in one line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from data_prep import build, builder, dataset_format
from data_prep.phantoms import build_phantom_dataset
from xmedjax import input_pipeline as ip
from xmedjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"train": 16, "val": 8, "test": 8}
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _fingerprint(data_dir: str) -> dict[str, list[tuple[str, str]]]:
    """Per split, (id, sha1 of the image bytes) of every record: equal means whole and same."""
    info = dataset_format.read_dataset_info(data_dir)
    out = {}
    for split in info.splits:
        src = dataset_format.PreparedSource(data_dir, split)
        out[split] = [
            (src[i]["id"].decode(), hashlib.sha1(src[i]["image"]).hexdigest())
            for i in range(len(src))
        ]
    return out


def _phantoms(out: str, seed: int = 0, counts=None) -> str:
    return build_phantom_dataset(out, "brain", counts or COUNTS, size=16, seed=seed, progress=False)


# A child that rebuilds OUT slowly (each example's encoding sleeps), so the parent can kill it
# while the array_record files are being written.
SLOW_REBUILD = """
import sys, time
from data_prep import builder
from data_prep.phantoms import build_phantom_dataset
encode = builder.XmedPrepared._encode
def slow(self, ex):
    time.sleep(0.05)
    return encode(self, ex)
builder.XmedPrepared._encode = slow
build_phantom_dataset(sys.argv[1], "brain", {"train": 400, "val": 8, "test": 8}, size=16,
                      seed=7, progress=False)
"""


def test_rebuild_killed_mid_write_leaves_the_old_dataset_whole(tmp_path):
    out = _phantoms(str(tmp_path / "prep"))
    before = _fingerprint(out)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_REBUILD, out], env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    pattern = os.path.join(out, builder.STAGING_PREFIX + "*", "**", "*.array_record*")
    while not glob.glob(pattern, recursive=True):  # TFDS is writing the new records
        assert proc.poll() is None, "the rebuild ended before it could be killed"
        assert time.time() < deadline, "the rebuild never started writing"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert glob.glob(os.path.join(out, builder.STAGING_PREFIX + "*"))  # the kill's leftovers
    assert _fingerprint(out) == before
    # The next build replaces the dataset and removes what the killed one left.
    _phantoms(out, seed=3)
    assert _fingerprint(out) != before
    left = sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n)))
    assert len(left) == 1 and left[0].startswith(builder.RECORDS_PREFIX), left


def test_failing_writer_or_commit_leaves_the_old_dataset_whole(tmp_path, monkeypatch):
    out = _phantoms(str(tmp_path / "prep"))
    before = _fingerprint(out)
    encode, calls = builder.XmedPrepared._encode, []

    def failing(self, ex):
        calls.append(1)
        if len(calls) == 10:
            raise OSError(28, "No space left on device")
        return encode(self, ex)

    monkeypatch.setattr(builder.XmedPrepared, "_encode", failing)
    with pytest.raises(OSError, match="No space left"):
        _phantoms(out, seed=5)
    assert _fingerprint(out) == before
    assert not glob.glob(os.path.join(out, builder.STAGING_PREFIX + "*"))  # cleaned up
    monkeypatch.setattr(builder.XmedPrepared, "_encode", encode)

    def failing_commit(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder, "write_info", failing_commit)
    with pytest.raises(OSError, match="No space left"):
        _phantoms(out, seed=5)
    assert _fingerprint(out) == before


def test_an_older_layout_is_read_and_replaced(tmp_path):
    """Datasets built before records_dir (DIR/xmedjax_prepared/1.0.0) still read; a rebuild
    removes their records only after the new ones are committed."""
    out = _phantoms(str(tmp_path / "prep"))
    info = dataset_format.read_info(out)
    records = info.pop(dataset_format.RECORDS_KEY)
    os.rename(
        os.path.join(out, records, dataset_format.TFDS_NAME),
        os.path.join(out, dataset_format.TFDS_NAME),
    )
    os.rmdir(os.path.join(out, records))
    dataset_format.write_info(out, info)
    before = _fingerprint(out)
    assert len(before["train"]) == COUNTS["train"]
    _phantoms(out, seed=1)
    assert not os.path.exists(os.path.join(out, dataset_format.TFDS_NAME))
    assert _fingerprint(out) != before


def test_missing_or_corrupted_records_name_the_file_and_the_fix(tmp_path):
    raw = str(tmp_path / "raw")
    _two_class_folder(raw)
    out = str(tmp_path / "prep")
    build.prepare("folder", raw, out, val_fraction=0.0, progress=False, workers=1)
    info = dataset_format.read_info(out)
    files = glob.glob(os.path.join(dataset_format.records_path(out, info), "*train.array_record*"))
    assert len(files) == 1
    data = bytearray(open(files[0], "rb").read())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a Riegeli block header
    open(files[0], "wb").write(bytes(data))
    with pytest.raises(dataset_format.DatasetError) as err:
        _fingerprint(out)
    msg = str(err.value)
    assert "\n" not in msg and files[0] in msg and "python -m data_prep.build" in msg, msg
    assert f"--src={os.path.abspath(raw)}" in msg and f"--out={out}" in msg, msg
    # Through a Grain train iterator (read threads) the same error arrives.
    it = ip.make_train_iterator(
        out, "train", global_batch_size=4, preprocess=ip.Preprocess(16, 1, "imagenet")
    )
    with pytest.raises(dataset_format.DatasetError, match="array_record"):
        for _ in range(8):
            next(it)
    # The info file points at records that are gone (a deleted or interrupted build).
    os.rename(dataset_format.records_path(out, info), str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as err:
        dataset_format.PreparedSource(out, "train")
    msg = str(err.value)
    assert "\n" not in msg and "is incomplete" in msg and "python -m data_prep.build" in msg, msg


def _two_class_folder(root: str, classes=("cat", "dog"), n: int = 4) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(1000 * (split == "test") + 100 * c + i)
                small = rng.integers(0, 256, (4, 5), dtype=np.uint8)
                img = PIL.Image.fromarray(small).resize((24, 20), PIL.Image.BICUBIC)
                img.save(os.path.join(root, split, name, f"{i:03d}.png"))


def test_one_class_is_refused_at_build_and_empty_class_folders_are_said(tmp_path, capsys):
    raw = str(tmp_path / "raw")
    _two_class_folder(raw, classes=("cat",))
    os.makedirs(os.path.join(raw, "train", "dog"))  # an empty class folder
    out = str(tmp_path / "prep")
    with pytest.raises(build.BuildError) as err:
        build.prepare("folder", raw, out, val_fraction=0.0, progress=False, workers=1)
    msg = str(err.value)
    assert "\n" not in msg and "one class only" in msg and "'cat' (4 images)" in msg, msg
    assert not os.path.exists(os.path.join(out, dataset_format.INFO_FILE))
    console = capsys.readouterr().err
    assert "empty class" in console and "train/dog" in console, console


def test_one_class_dataset_is_refused_before_training(tmp_path):
    # A two-class dataset passes (counts from the info file) ...
    ok = _phantoms(str(tmp_path / "ok"))
    assert dataset_format.split_class_counts(ok, "train") == [8, 8]
    ip.check_trainable(ok, "train")
    # ... a one-class one, as an older data_prep wrote it (no counts: labels are read), fails.
    one = str(tmp_path / "one")
    spec = builder.DatasetSpec(
        name="one",
        label_names=["only"],
        channels=1,
        has_masks=False,
        size=8,
        splits={"train": list(range(4)), "val": list(range(2))},
        to_example=lambda i: builder.Example(np.full((8, 8), i, np.uint8), 0, f"x{i}"),
    )
    builder.write_prepared(spec, one, progress=False)
    info = dataset_format.read_info(one)
    del info["class_counts"]
    dataset_format.write_info(one, info)
    with pytest.raises(ConfigError) as err:
        ip.check_trainable(one, "train")
    msg = str(err.value)
    assert "\n" not in msg and "config.data.data_dir=" in msg and "one class only" in msg, msg


def _cli(module: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_data_prep_commands_end_in_one_line(tmp_path):
    raw = str(tmp_path / "raw")
    _two_class_folder(raw, classes=("cat",))
    os.makedirs(os.path.join(raw, "train", "dog"))
    out = str(tmp_path / "prep")
    res = _cli("data_prep.build", "--dataset=folder", f"--src={raw}", f"--out={out}", cwd=ROOT)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("data_prep.build: error: the train split of"), res.stderr
    assert "Traceback" not in res.stderr and "note: empty class" in res.stderr, res.stderr
    res = _cli("data_prep.audit", f"--src={tmp_path / 'nothing'}", f"--out={out}", cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"data_prep.audit: error: --src={tmp_path / 'nothing'} is not a directory"
    ]
    # --verbosity=1 shows the traceback as well.
    res = _cli("data_prep.audit", f"--src={tmp_path / 'nothing'}", f"--out={out}", "-v=1", cwd=ROOT)
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_write_info_is_atomic(tmp_path, monkeypatch):
    out = str(tmp_path)
    dataset_format.write_info(out, {"a": 1})

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        dataset_format.write_info(out, {"a": 2})
    assert json.load(open(os.path.join(out, dataset_format.INFO_FILE))) == {"a": 1}
    assert os.listdir(out) == [dataset_format.INFO_FILE]
