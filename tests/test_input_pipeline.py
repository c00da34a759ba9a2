"""The Grain input pipeline on a tiny phantom dataset."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
from absl import flags

from data_prep import phantoms
from xmedjax import augment
from xmedjax import input_pipeline as ip

flags.FLAGS.mark_as_parsed()  # Grain workers expect parsed absl flags

AUG = dict(
    rotation_range=20,
    width_shift_range=0.1,
    height_shift_range=0.1,
    zoom_range=0.1,
    horizontal_flip=True,
)
COUNTS = {"train": 24, "val": 8, "test": 13}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return phantoms.build_phantom_dataset(
        str(tmp_path_factory.mktemp("ph")), "brain", COUNTS, size=32, seed=0
    )


def _train(data_dir, **kw):
    args = dict(
        global_batch_size=8,
        preprocess=ip.Preprocess(24, 1, "unit"),
        augment=AUG,
        seed=0,
        shard_index=0,
        shard_count=1,
    )
    args.update(kw)
    return ip.make_train_iterator(data_dir, "train", **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_info_and_errors(data_dir, tmp_path):
    info = ip.read_dataset_info(data_dir)
    assert info.splits == COUNTS and info.has_masks and info.channels == 1
    assert info.num_classes == 2 and info.size == 32
    assert ip.num_examples(data_dir, "test") == 13
    assert ip.steps_per_epoch(data_dir, "train", 8) == 3
    with pytest.raises(FileNotFoundError, match="python -m data_prep.build"):
        ip.read_dataset_info(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="test_dedup"):
        ip.make_eval_iterator(
            data_dir,
            "test_dedup",
            global_batch_size=4,
            preprocess=ip.Preprocess(24, 1, "unit"),
            shard_index=0,
            shard_count=1,
        )


def test_train_batches_shapes_and_seed(data_dir):
    b = next(_train(data_dir, preprocess=ip.Preprocess(24, 3, "imagenet")))
    assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].shape == (8, 24, 24)
    first = _take(_train(data_dir), 4)
    assert _same(first, _take(_train(data_dir), 4))
    assert not _same(first, _take(_train(data_dir, seed=1), 4))


def test_epochs_cover_examples_and_reshuffle(data_dir):
    # No augmentation + unit normalisation: images identify examples.
    it = _train(data_dir, augment=None)
    epochs = []
    for _ in range(2):
        batches = _take(it, 3)  # 24 examples / 8 = 3 steps per epoch
        imgs = np.concatenate([b["image"] for b in batches])
        epochs.append([hash(x.tobytes()) for x in imgs])
    assert len(set(epochs[0])) == 24 and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]


def test_checkpoint_restore(data_dir):
    it = _train(data_dir)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 4)  # crosses an epoch boundary
    fresh = _train(data_dir)
    fresh.set_state(state)
    assert _same(expected, _take(fresh, 4))


def test_shards_partition_the_global_batch(data_dir):
    whole = _take(_train(data_dir), 3)
    parts = [_take(_train(data_dir, shard_index=i, shard_count=2), 3) for i in range(2)]
    for s in range(3):
        for k in whole[s]:
            assert np.array_equal(whole[s][k], np.concatenate([parts[0][s][k], parts[1][s][k]]))


def test_deterministic_across_worker_counts(data_dir):
    # The only test that starts Grain worker processes (~4 s each start).
    a = _take(_train(data_dir, worker_count=0), 4)
    b = _take(_train(data_dir, worker_count=2), 4)
    assert _same(a, b)


@pytest.mark.parametrize("shards", [1, 2])
def test_eval_sees_every_example_once(data_dir, shards):
    seen, ids = [], []
    for p in range(shards):
        ev = ip.make_eval_iterator(
            data_dir,
            "test",
            global_batch_size=4,
            preprocess=ip.Preprocess(24, 1, "unit"),
            shard_index=p,
            shard_count=shards,
        )
        batches = list(ev)
        assert len(batches) == len(ev) == 4  # ceil(13 / 4)
        for b in batches:
            assert b["image"].shape[0] == 4 // shards
            assert np.all(b["index"][b["valid"]] >= 0) and np.all(b["index"][~b["valid"]] == -1)
            assert np.all(b["mask"][~b["valid"]] == 0)
            seen.extend(b["index"][b["valid"]].tolist())
            ids.extend(b["id"][b["valid"]].tolist())
    assert sorted(seen) == list(range(13))
    assert len(set(ids)) == 13
    # Fixed order: a second pass is identical.
    ev = ip.make_eval_iterator(
        data_dir,
        "test",
        global_batch_size=4,
        preprocess=ip.Preprocess(24, 1, "unit"),
        shard_index=0,
        shard_count=1,
    )
    assert _same(list(ev), list(ev))


def test_load_examples_matches_eval(data_dir):
    ex = ip.load_examples(data_dir, "test", [2, 0], preprocess=ip.Preprocess(24, 1, "unit"))
    assert ex["image"].shape == (2, 24, 24, 1) and ex["mask"].shape == (2, 24, 24)
    ev = list(
        ip.make_eval_iterator(
            data_dir,
            "test",
            global_batch_size=4,
            preprocess=ip.Preprocess(24, 1, "unit"),
            shard_index=0,
            shard_count=1,
        )
    )
    assert np.array_equal(ex["image"][1], ev[0]["image"][0])
    assert ex["id"][0] == ev[0]["id"][2]


def test_normalization_and_channels(data_dir):
    u = ip.load_examples(data_dir, "val", [0], preprocess=ip.Preprocess(32, 1, "unit"))["image"]
    g = ip.load_examples(data_dir, "val", [0], preprocess=ip.Preprocess(32, 3, "imagenet"))["image"]
    assert u.min() >= 0 and u.max() <= 1
    for c in range(3):
        want = (u[..., 0] - ip.IMAGENET_MEAN[c]) / ip.IMAGENET_STD[c]
        np.testing.assert_allclose(g[..., c], want, atol=1e-5)
    grey_preprocess = ip.Preprocess(32, 1, "imagenet")
    grey = ip.load_examples(data_dir, "val", [0], preprocess=grey_preprocess)["image"]
    np.testing.assert_allclose(grey[..., 0], (u[..., 0] - 0.449) / 0.226, atol=1e-3)


def test_augment_keeps_masks_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), np.float32)
    mask[10:25, 5:20] = 1.0
    mask[30:36, 40:48] = 1.0
    image = (mask * 255).astype(np.uint8)
    params = augment.AugmentParams.from_mapping(AUG)
    moved = 0
    for _ in range(20):
        t = augment.sample_transform(rng, params, 32)
        img, m = augment.warp([image, mask], t, 32)
        np.testing.assert_allclose(img / 255.0, m, atol=2.0 / 255 + 1e-6)  # 2 roundings
        plain = augment.warp([mask], None, 32)[0]
        moved += not np.allclose(plain, m, atol=0.1)
    assert moved >= 15  # the transform really does move things


def test_augmented_batches_keep_lesion_under_mask(data_dir):
    b = next(_train(data_dir, augment=AUG))
    img, m = b["image"][..., 0], b["mask"]
    pos = m.reshape(len(m), -1).max(1) > 0.5
    assert pos.any()
    for i in np.nonzero(pos)[0]:
        inside = img[i][m[i] > 0.9].mean()
        tissue = np.median(img[i][(m[i] < 0.01) & (img[i] > 0.1)])
        assert inside > tissue + 0.08
    assert np.all(b["label"][pos] == 1)


def test_to_global_array(data_dir):
    import jax

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    ev = ip.make_eval_iterator(
        data_dir,
        "test",
        global_batch_size=jax.device_count() * 2,
        preprocess=ip.Preprocess(24, 1, "unit"),
        shard_index=0,
        shard_count=1,
    )
    batch = next(iter(ev))
    g = ip.to_global_array(batch, mesh)
    assert "id" not in g and set(g) >= {"image", "label", "mask", "valid", "index"}
    assert g["image"].shape == batch["image"].shape
    np.testing.assert_array_equal(np.asarray(g["label"]), batch["label"])


def test_user_files_png_and_dicom(tmp_path):
    a = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    os.makedirs(tmp_path / "sub")
    PIL.Image.fromarray(a).save(tmp_path / "sub" / "x.png")
    (tmp_path / "readme.txt").write_text("no")
    import pydicom

    ct = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    if ct:
        import shutil

        shutil.copy(ct, tmp_path / "ct.dcm")
    files = ip.list_image_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == (["ct.dcm"] if ct else []) + ["x.png"]
    for f in files:
        x = ip.load_image_file(f, preprocess=ip.Preprocess(16, 3, "unit"))
        assert x.shape == (16, 16, 3) and x.dtype == np.float32
        assert 0 <= x.min() <= x.max() <= 1 and x.std() > 0


def test_flip_only_mirrors_and_configdict_accepted():
    import ml_collections

    cfg = ml_collections.ConfigDict({"horizontal_flip": True, "rotation_range": 0.0})
    params = augment.AugmentParams.from_mapping(cfg)
    assert params == augment.AugmentParams(horizontal_flip=True)
    assert augment.AugmentParams.from_mapping({}) is None
    with pytest.raises(ValueError, match="unknown augment key"):
        augment.AugmentParams.from_mapping({"shear_range": 0.2})
    a = (np.arange(20 * 30) % 251).astype(np.uint8).reshape(20, 30)
    plain = augment.warp([a], None, 16)[0]
    np.testing.assert_array_equal(augment.warp([a], np.eye(3), 16)[0], plain)
    rng = np.random.default_rng(0)
    outs = [augment.warp([a], augment.sample_transform(rng, params, 16), 16)[0] for _ in range(16)]
    flipped = [o for o in outs if not np.array_equal(o, plain)]
    assert 3 <= len(flipped) <= 13
    for o in flipped:
        assert np.abs(o.astype(int) - plain[:, ::-1].astype(int)).max() <= 1


_MULTI_DEVICE = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
from xmedjax import input_pipeline as ip
d = sys.argv[1]
mesh = jax.make_mesh((8,), ("data",))
it = ip.make_train_iterator(d, "train", global_batch_size=16, preprocess=ip.Preprocess(24, 1, "unit"),
                            augment=None, seed=0)
b = next(it)
g = ip.to_global_array(b, mesh)
assert g["image"].shape == (16, 24, 24, 1), g["image"].shape
assert len(g["image"].sharding.device_set) == 8
shard = g["image"].addressable_shards[3]
np.testing.assert_array_equal(np.asarray(shard.data), b["image"][6:8])
print("ok")
"""


def test_to_global_array_on_eight_fake_devices(data_dir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "multi.py"
    script.write_text(_MULTI_DEVICE)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, str(script), data_dir],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_orbax_checkpoint_of_iterator(data_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    it = _train(data_dir)
    _take(it, 2)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    fresh = _train(data_dir)
    mngr.restore(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(fresh)))
    assert _same(expected, _take(fresh, 2))


def test_preprocess_validates_and_reads_the_config():
    from ml_collections import ConfigDict

    config = ConfigDict({"data": {"image_size": 64, "channels": 1, "normalization": "unit"}})
    pre = ip.Preprocess.from_config(config)
    assert pre == ip.Preprocess(64, 1, "unit") and pre.shape == (64, 64, 1)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ip.Preprocess(64, 2, "unit")
    with pytest.raises(ValueError, match="normalization must be one of"):
        ip.Preprocess(64, 1, "zscore")
    with pytest.raises(ValueError, match="image_size must be positive"):
        ip.Preprocess(0, 1, "unit")
