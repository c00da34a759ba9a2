"""Training end to end on tiny phantoms: the demo config's path, the NaN guard, evaluate/predict modes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import PIL.Image
import pytest
from absl import flags

from xmedjax import checkpointing, config_checks, modes, runs, train
from xmedjax import train_state as ts

flags.FLAGS.mark_as_parsed()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_COUNTS = {"train": 32, "val": 16, "test": 16}


def tiny_config(data_dir: str = "", **overrides):
    """configs/demo.py shrunk to seconds: 32 px, width 1/16, 4 steps per epoch."""
    spec = importlib.util.spec_from_file_location(
        "cfg_demo", os.path.join(ROOT, "configs", "demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.phantom_counts = dict(TINY_COUNTS)
    c.data.data_dir = data_dir
    c.data.image_size = 32
    c.model.width = 0.0625
    c.training.batch_size = 8
    c.training.eval_batch_size = 16
    c.training.max_epochs = 2
    c.training.checkpoint_every_steps = 3
    c.evaluate.bootstrap_samples = 20
    c.explain.quality = False
    c.explain.batch_size = 16
    c.runtime.progress_bar = False
    c.runtime.compilation_cache_dir = jax.config.jax_compilation_cache_dir or ""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_checks.validate(c)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> str:
    from data_prep.phantoms import build_phantom_dataset

    return build_phantom_dataset(
        str(tmp_path_factory.mktemp("phantoms")), "brain", dict(TINY_COUNTS), size=32, seed=0
    )


@pytest.mark.slow
def test_demo_config_end_to_end(tmp_path, phantom_dir):
    workdir = str(tmp_path / "run")
    config = tiny_config(phantom_dir)
    results = modes.train_and_evaluate(config, workdir)
    saved = json.load(open(os.path.join(workdir, "metrics.json")))
    assert saved["val"]["accuracy"] == results["val"]["accuracy"]
    for split in ("val", "test"):
        for key in (
            "accuracy",
            "auc_roc",
            "f1",
            "average_precision",
            "sensitivity",
            "specificity",
            "confusion_matrix",
            "ci95",
            "per_class",
        ):
            assert key in saved[split], (split, key)
        assert saved[split]["n"] == TINY_COUNTS[split]
    assert saved["val"]["threshold"] == saved["test"]["threshold"]
    assert "shortcut_baseline" in saved
    page = open(os.path.join(workdir, "report.html")).read()
    assert page.count("data:image/png;base64,") >= 4 and 'src="http' not in page
    heat = np.load(os.path.join(workdir, "heatmaps", "test_gradcam.npz"))
    for key in ("ids", "labels", "predictions", "probabilities", "targets", "raw", "maps"):
        assert key in heat.files, key
    assert heat["maps"].shape == (TINY_COUNTS["test"], 32, 32)
    assert len(set(heat["ids"].tolist())) == TINY_COUNTS["test"]
    # The maps explain the predictions of metrics.json (val-chosen threshold), not a plain argmax.
    pred = np.load(os.path.join(workdir, "predictions", "test.npz"))
    order = np.argsort(heat["index"])
    np.testing.assert_array_equal(heat["index"][order], pred["index"])
    np.testing.assert_array_equal(heat["predictions"][order], pred["predictions"])
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1, 2]
    assert any(
        name.startswith("events.out.tfevents")
        for name in os.listdir(os.path.join(workdir, "tensorboard"))
    )
    mgr = checkpointing.RunCheckpoints(workdir)
    assert mgr.latest_step() == 8 and mgr.best_step() in (4, 8)
    mgr.close()

    # Rerunning a finished run goes straight to evaluation; evaluate and predict modes reuse the best checkpoint.
    before = saved["test"]
    again = modes.evaluate(tiny_config(phantom_dir, mode="evaluate"), workdir)
    assert (
        again["test"]["accuracy"] == before["accuracy"]
        and again["test"]["auc_roc"] == before["auc_roc"]
    )
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(
            (np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)
        ).save(folder / f"{i}.png")
    out = modes.predict(
        tiny_config(phantom_dir, mode="predict", **{"predict.folder": str(folder)}), workdir
    )
    assert out is not None


class _Poisoned:
    """A train iterator whose batch number `bad` (1-based) holds a NaN pixel."""

    def __init__(self, inner, bad: int):
        self.inner, self.bad, self.count = inner, bad, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count == self.bad:
            batch["image"] = batch["image"].copy()
            batch["image"][0, 0, 0, 0] = np.nan
        return batch

    def get_state(self):
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):
        pass


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, phantom_dir):
    from xmedjax import input_pipeline

    workdir = str(tmp_path / "nan")
    config = tiny_config(phantom_dir)
    run = runs.build_run(config, workdir)
    inner = input_pipeline.make_train_iterator(
        phantom_dir,
        "train",
        global_batch_size=8,
        preprocess=input_pipeline.Preprocess(32, 1, "imagenet"),
        seed=0,
    )
    with pytest.raises(
        train.NonFiniteError,
        match=r"step 5: loss or gradients are not finite .* the last good "
        r"checkpoint is step 4",
    ):
        train.fit(run, train_iterator=_Poisoned(inner, bad=5))
    mgr = checkpointing.RunCheckpoints(workdir)
    assert mgr.latest_step() == 4  # step 3 (every 3) and 4 (epoch end); nothing after the bad step
    mgr.close()


def test_train_step_is_pure_and_guards_nonfinite_values():
    from xmedjax import mesh as mesh_lib
    from xmedjax.models import create_model

    model = create_model("resnet50", 2, in_channels=1, width=0.0625)
    mdef, state = ts.create_train_state(model, ts.make_optimizer("adam", 1e-3))
    mesh = mesh_lib.make_mesh()
    state = ts.place_state(state, mesh)
    step = ts.jit_train_step(mdef, state, mesh, class_weights=np.array([1.0, 3.0], np.float32))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32) % 2,
    }
    s1, m1 = step(state, batch)
    assert bool(m1["finite"]) and int(s1.step) == 1
    ref = jax.device_get(s1)
    s2, _ = step(s1, batch)
    again = jax.device_get(s2)
    bad = dict(batch, image=batch["image"].copy())
    bad["image"][3, 5, 5, 0] = np.inf
    s3, m3 = step(s2, bad)
    assert not bool(m3["finite"]) and int(s3.step) == 2
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(jax.device_get(s3))):
        np.testing.assert_array_equal(a, b)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(again.params))
    )
    s4 = ts.set_learning_rate(s3, 1e-5)
    assert abs(ts.learning_rate(s4) - 1e-5) < 1e-12


def test_init_checkpoint_loads_converted_weights(tmp_path, phantom_dir):
    from flax import nnx

    from xmedjax.models import create_model
    from xmedjax.models.weights_io import save_weights

    source = create_model("resnet50", 2, in_channels=1, width=0.0625, seed=7)
    weights = save_weights(
        source, str(tmp_path / "weights"), {"arch": "resnet50", "num_classes": 2, "in_channels": 1}
    )
    config = tiny_config(phantom_dir, **{"init.checkpoint": weights, "init.head": "strict"})
    model = runs.build_model(config, 2)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(source)), nnx.to_flat_state(nnx.state(model)), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path)
        )
    fresh = runs.build_model(tiny_config(phantom_dir), 2)
    assert not np.array_equal(
        np.asarray(nnx.state(fresh)["fc"]["kernel"].get_value()),
        np.asarray(nnx.state(source)["fc"]["kernel"].get_value()),
    )


def test_plateau_and_early_stopping_schedules():
    t = tiny_config("/unused").training
    t.reduce_on_plateau_patience, t.reduce_on_plateau_factor, t.min_learning_rate = 2, 0.5, 0.2
    t.early_stopping_patience, t.early_stopping_min_delta = 4, 0.01
    loop = train.LoopState(learning_rate=1.0)
    lrs, stops, messages = [], [], []
    for epoch, val_loss in enumerate(
        [1.0, 0.9, 0.95, 0.92, 0.895, 0.899, 0.898, 0.897, 0.896], start=1
    ):
        loop = train.update_schedules(dataclasses.replace(loop, epoch=epoch), val_loss, t)
        lrs.append(loop.learning_rate)
        stops.append(loop.stop)
        messages.append(loop.stop_message)
    # plateau (best 0.9 at epoch 2): epochs 3, 4 -> halve; 0.895 is a new best at 5; 6, 7 -> halve; 8, 9 -> floor
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2]
    # early stopping needs > 0.01 improvement: best stays 0.9 (epoch 2); 4 epochs later (6) it stops
    assert stops[:5] == [None] * 5 and stops[5] is train.StopReason.EARLY_STOPPING
    assert messages[:5] == [None] * 5 and messages[5] == "early stopping after epoch 6"


def test_loop_state_json_round_trip_and_legacy_checkpoints():
    record = {"epoch": 1, "step": 4, "train_loss": 0.7, "val_loss": 0.6, "learning_rate": 1e-3}
    loop = train.LoopState(
        learning_rate=1e-3,
        epoch=2,
        stop=train.StopReason.MAX_STEPS,
        stop_step=8,
        best_step=4,
        best_value=0.6,
        history=(record, dict(record, epoch=2, step=8)),
    )
    saved = json.loads(json.dumps(loop.to_json()))  # what Orbax's JsonSave/JsonRestore do
    assert saved["stop"] == "max_steps" and train.LoopState.from_json(saved) == loop
    # A loop item written before LoopState: the stop reason was a "finished" string.
    legacy = {k: v for k, v in saved.items() if k not in ("stop", "stop_step")}
    restored = train.LoopState.from_json(dict(legacy, finished="reached 8 steps"))
    assert restored == loop and restored.stop_message == "reached 8 steps"
    early = train.LoopState.from_json(dict(legacy, finished="early stopping after epoch 2"))
    assert early.stop is train.StopReason.EARLY_STOPPING
    assert early.stop_message == "early stopping after epoch 2"
    assert train.LoopState.from_json(dict(legacy, finished=None)).stop is None


def test_modes_without_a_checkpoint_stop_before_creating_anything(tmp_path):
    from test_configs import _main

    missing = tmp_path / "typo"
    for mode, extra in (("evaluate", {}), ("explain", {}), ("predict", {"predict.folder": "."})):
        config = tiny_config("", mode=mode, **extra)  # phantoms would be built in the workdir
        with pytest.raises(FileNotFoundError, match=f"^{missing} has no best checkpoint") as err:
            modes.MODES[mode](config, str(missing))
        assert "\n" not in str(err.value)
        assert not missing.exists()
    res = _main("--config=configs/demo.py", f"--workdir={missing}", "--config.mode=evaluate")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {missing} has no best checkpoint (nothing under "), last
    assert not missing.exists()


def test_a_checkpoint_of_another_model_is_named_in_one_line(tmp_path, phantom_dir):
    import shutil

    from xmedjax import input_pipeline

    workdir = str(tmp_path / "run")
    train.fit(runs.build_run(tiny_config(phantom_dir, **{"training.max_epochs": 1}), workdir))
    config_json = os.path.join(workdir, "config.json")
    saved = open(config_json).read()
    other = {"model.arch": "densenet121", "data.image_size": 64, "model.dtype": "bfloat16"}
    with pytest.raises(config_checks.ConfigError) as err:
        modes.evaluate(tiny_config(phantom_dir, mode="evaluate", **other), workdir)
    assert str(err.value) == (
        f"{workdir} holds checkpoints of another model: saved "
        "config.model.arch='resnet50' (this config: 'densenet121'), "
        "config.model.dtype='float32' (this config: 'bfloat16'), "
        "config.data.image_size=32 (this config: 64); "
        "use the saved values, or another --workdir for a new run"
    )
    assert open(config_json).read() == saved  # the check runs before config.json is written

    three = str(tmp_path / "three_classes")
    shutil.copytree(phantom_dir, three)
    info_path = os.path.join(three, input_pipeline.INFO_FILE)
    info = json.load(open(info_path))
    info.update(num_classes=3, label_names=[*info["label_names"], "other"])
    json.dump(info, open(info_path, "w"))
    with pytest.raises(
        config_checks.ConfigError,
        match=r"saved num_classes \(of the dataset\)=2 \(this config: 3\); use the saved",
    ):
        runs.build_run(tiny_config(three), workdir)  # resuming (mode train) is checked too
    with pytest.raises(
        config_checks.ConfigError, match=r"saved config.model.width=0.0625 \(this config: 0.125\)"
    ):
        runs.load_trained(workdir, tiny_config(phantom_dir, **{"model.width": 0.125}))
    assert open(config_json).read() == saved
