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
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")
)


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
    from xmedjax.intensity import INTENSITY_KEYS

    assert dict(paper.augment) == {
        "rotation_range": 20.0,
        "width_shift_range": 0.1,
        "height_shift_range": 0.1,
        "zoom_range": 0.1,
        "horizontal_flip": True,
        **dict.fromkeys(INTENSITY_KEYS, 0.0),  # the paper has no intensity augmentation
        "lesion_erase_prob": 0.0,  # nor counterfactual lesions
        "lesion_paste_prob": 0.0,
        "lesion_negative_class": "",
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


def test_every_config_imports_as_a_package_module():
    import importlib

    for path in CONFIGS:
        name = os.path.basename(path)[:-3]
        module = importlib.import_module(f"configs.{name}")
        assert module.get_config().to_dict() == load(f"{name}.py").to_dict(), name
        source = open(path).read()
        assert "importlib" not in source and "spec_from_file_location" not in source, name
    assert config_checks.default_config().to_dict() == load("default.py").to_dict()


def _python(code: str, *, cwd: str, pythonpath: str, timeout: int = 60):
    env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


VALIDATE_DEMO = (
    "import sys, configs.demo\n"
    "from xmedjax import config_checks\n"
    "config_checks.validate(configs.demo.get_config())\n"
)


def test_validation_loads_neither_jax_nor_flax(tmp_path):
    code = VALIDATE_DEMO + (
        "heavy = sorted(m for m in ('jax', 'flax', 'xmedjax.models', 'xmedjax.explain') "
        "if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import xmedjax.names\n"
        "assert 'numpy' not in sys.modules\n"
        "print('ok')\n"
    )
    res = _python(code, cwd=str(tmp_path), pythonpath=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_names_are_what_the_code_implements():
    import numpy as np

    from xmedjax import input_pipeline, modes, names
    from xmedjax import train_state as ts
    from xmedjax.explain import run
    from xmedjax.models import ARCHITECTURES

    assert tuple(modes.MODES) == names.MODES
    assert sorted(ARCHITECTURES) == sorted(names.ARCHS)
    assert run.QUALITY_METHODS == names.QUALITY_METHODS == names.SALIENCY_METHODS
    for name in names.OPTIMIZERS:
        ts.make_optimizer(name, 1e-3)
    for normalization in names.NORMALIZATIONS:
        assert input_pipeline.to_float(np.zeros((2, 2), np.uint8), 3, normalization).shape == (
            2,
            2,
            3,
        )
    assert config_checks.explain_methods() == names.SALIENCY_METHODS


def test_a_built_wheel_ships_the_configs_and_validates_them(tmp_path):
    """A non-editable install (the wheel, unpacked into a --target dir) runs the configs."""
    import shutil
    import zipfile

    src = _mkdir(tmp_path / "src")  # a copy: building in the checkout would leave build/ there
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for package in ("xmedjax", "data_prep", "configs"):
        shutil.copytree(
            os.path.join(ROOT, package),
            src / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), "."],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("xmedjax-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"configs/{os.path.basename(p)}" for p in CONFIGS} | {"configs/__init__.py"}
    assert configs <= shipped, sorted(configs - shipped)
    target = tmp_path / "target"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    outside = _mkdir(tmp_path / "elsewhere")
    code = VALIDATE_DEMO + (
        "import os, xmedjax\n"
        "print(os.path.dirname(os.path.dirname(configs.demo.__file__)))\n"
        "print(os.path.dirname(os.path.dirname(xmedjax.__file__)))\n"
    )
    res = _python(code, cwd=str(outside), pythonpath=str(target))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(target), str(target)]  # not the checkout's copies


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
