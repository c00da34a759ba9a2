"""Config files and validation: one-line errors naming the key, before anything compiles."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from xmedjax import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(name: str):
    path = os.path.join(ROOT, "configs", name)
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_every_config_validates_and_documents_its_command():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {
        "default.py",
        "demo.py",
        "brain_densenet.py",
        "brain_resnet.py",
        "chest_densenet.py",
        "chest_resnet.py",
        "brain4_densenet.py",
    } <= names
    for path in CONFIGS:
        name = os.path.basename(path)
        config = load(name)
        if name == "default.py":  # names no dataset on purpose
            with pytest.raises(config_checks.ConfigError, match="config.data.data_dir"):
                config_checks.validate(config)
            continue
        config_checks.validate(config)
        doc = open(path).read().split('"""')[1]
        assert f"python -m xmedjax.main --config=configs/{name}" in doc, name
    paper = load("brain_densenet.py")
    assert (
        paper.optimizer.name,
        paper.optimizer.learning_rate,
        paper.training.batch_size,
        paper.data.image_size,
    ) == ("adam", 1e-4, 32, 224)
    assert dict(paper.augment) == {
        "rotation_range": 20.0,
        "width_shift_range": 0.1,
        "height_shift_range": 0.1,
        "zoom_range": 0.1,
        "horizontal_flip": True,
    }


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate must be > 0, got -1.0"),
        ("optimizer.name", "adagrad", "config.optimizer.name must be one of adam, adamw, sgd"),
        ("model.arch", "vgg16", "config.model.arch must be one of"),
        ("model.dtype", "float16", "config.model.dtype must be one of float32, bfloat16"),
        ("training.batch_size", 0, "config.training.batch_size must be > 0"),
        ("training.batch_size", 2.5, "config.training.batch_size must be an integer"),
        ("data.channels", 2, "config.data.channels must be 1 or 3"),
        ("data.image_size", 16, "config.data.image_size must be >= 32"),
        ("augment.width_shift_range", 1.5, "config.augment.width_shift_range must be in [0, 1)"),
        (
            "training.reduce_on_plateau_factor",
            1.0,
            "config.training.reduce_on_plateau_factor must be in (0, 1)",
        ),
        ("explain.methods", ("gradcam", "nosuchcam"), "unknown method 'nosuchcam'"),
        ("init.checkpoint", "/no/such/weights", "config.init.checkpoint must be a folder"),
        ("mode", "serve", "config.mode must be one of train, evaluate, explain, predict"),
        (
            "training.class_weighting",
            "inverse",
            "config.training.class_weighting must be one of none, balanced",
        ),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    config = load("demo.py")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.validate(config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_and_missing_keys():
    config = load("demo.py")
    config.optimizer.lr = 0.1
    with pytest.raises(
        config_checks.ConfigError,
        match=r"config.optimizer.lr is not a known key \(known under "
        r"config.optimizer: learning_rate, momentum, name, weight_decay\)",
    ):
        config_checks.validate(config)
    config = load("demo.py")
    del config.training["seed"]
    with pytest.raises(config_checks.ConfigError, match="config.training.seed is missing"):
        config_checks.validate(config)
    config = load("demo.py")
    config.data.phantom_counts = {"train": 64, "val": 16}
    with pytest.raises(
        config_checks.ConfigError,
        match="config.data.phantom_counts must give a count for split 'test'",
    ):
        config_checks.validate(config)


def _main(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "xmedjax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_reports_bad_values_and_missing_data_in_one_line(tmp_path):
    res = _main(
        "--config=configs/demo.py", f"--workdir={tmp_path}/w", "--config.optimizer.learning_rate=-1"
    )
    assert res.returncode != 0
    assert (
        res.stderr.strip().splitlines()[-1]
        == "config error: config.optimizer.learning_rate must be > 0, got -1.0"
    )
    assert not os.path.exists(tmp_path / "w")  # stopped before anything was built
    res = _main(
        "--config=configs/brain_densenet.py",
        f"--workdir={tmp_path}/w2",
        f"--config.data.data_dir={tmp_path}/nodata",
    )
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no prepared dataset at") and "python -m data_prep.build" in last
