"""`python -m xmedjax.compare` and `runs.load_trained`: read-only over trained runs."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from test_explain_run import FAST, SIZE, dataset, model  # noqa: F401 (fixtures)
from test_train import ROOT, phantom_dir, tiny_config  # noqa: F401 (fixture)

from xmedjax import compare, config_checks, runs, train
from xmedjax.input_pipeline import Preprocess


def test_compare_models_markdown_table(model, dataset):  # noqa: F811
    graphdef, state = model
    entry = dict(
        graphdef=graphdef,
        state=state,
        data_dir=dataset,
        preprocess=Preprocess(SIZE, 1, "unit"),
    )
    other_state = jax.tree.map(lambda v: v * 0.9, state)
    results = compare.compare_models(
        [dict(entry, label="resnet50 a"), dict(entry, label="resnet50 b", state=other_state)],
        n_images=8,
        methods=("gradcam", "scorecam", "random"),
        method_opts=FAST,
        steps=4,
    )
    assert results["resnet50 a"]["meta"]["cam_layer"] == "layer1"
    text = compare.markdown_table(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].count("resnet50 a") == len(compare.COLUMNS) and rows[0].count(
        "resnet50 b"
    ) == len(compare.COLUMNS)
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["gradcam", "scorecam", "random"]
    assert "best pointing game" in text


def _snapshot(root: str) -> dict[str, object]:
    """Every file (sha256 of its bytes, mtime) and every folder ("dir") under root."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (digest, os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, phantom_dir) -> list[str]:  # noqa: F811
    """Two one-epoch runs: phantoms built inside the first workdir, shared ones for the second."""
    root = tmp_path_factory.mktemp("runs")
    workdirs = []
    for name, data_dir, seed in (("a", "", 0), ("b", phantom_dir, 1)):
        config = tiny_config(data_dir, **{"training.max_epochs": 1, "training.seed": seed})
        workdirs.append(str(root / name))
        train.fit(runs.build_run(config, workdirs[-1]))
    return workdirs


@pytest.mark.slow
def test_compare_command_leaves_the_runs_untouched(trained_runs, tmp_path):
    before = {w: _snapshot(w) for w in trained_runs}
    assert any(k.startswith("data/phantoms_") for k in before[trained_runs[0]])
    out = str(tmp_path / "cmp" / "table.md")
    args = [
        f"--workdirs={','.join(trained_runs)}",
        "--images=4",
        "--methods=gradcam,random",
        f"--out={out}",
        f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir or ''}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "xmedjax.compare", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for w in trained_runs:
        assert _snapshot(w) == before[w], w
    text = open(out).read()
    assert "Made by `python -m xmedjax.compare --workdirs=" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    labels = ["resnet50", "resnet50 (b)"]
    header = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert header == ["method"] + [f"{x} {short}" for x in labels for _, short in compare.COLUMNS]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["gradcam", "random"]
    scores = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert sorted(scores) == labels
    assert all(scores[k]["meta"]["n_images"] == 4 for k in labels)


@pytest.mark.slow
def test_load_trained_is_read_only_and_validates(trained_runs, tmp_path):
    workdir = trained_runs[0]
    before = _snapshot(workdir)
    trained = runs.load_trained(workdir)
    assert _snapshot(workdir) == before
    assert trained.step == 4 and trained.label_names == ("notumor", "tumor")
    assert trained.data_dir == runs.phantom_dir(trained.config, workdir)
    leaves = jax.tree.leaves(trained.state)
    assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
    net = nnx.merge(trained.graphdef, trained.state)
    net.eval()
    assert net(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 2)
    entry = compare.model_entry(trained)
    assert (entry["label"], entry["preprocess"]) == ("resnet50", Preprocess(32, 1, "imagenet"))

    missing = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match=f"{missing} is not a training run"):
        runs.load_trained(missing)
    assert not os.path.exists(missing)

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    with pytest.raises(FileNotFoundError, match=f"{untrained} has no best checkpoint"):
        runs.load_trained(str(untrained))
    assert sorted(os.listdir(untrained)) == ["config.json"]

    saved = json.load(open(os.path.join(workdir, "config.json")))
    saved["model"]["arch"] = "vgg16"
    (untrained / "config.json").write_text(json.dumps(saved))
    with pytest.raises(
        config_checks.ConfigError, match=r"untrained/config.json: config.model.arch"
    ):
        runs.load_trained(str(untrained))


def test_explain_package_does_not_import_training_modules():
    banned = {f"xmedjax.{m}" for m in ("train", "runs", "modes", "compare", "main")}
    package = os.path.join(ROOT, "xmedjax", "explain")
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(package, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                continue
            assert not found & banned, (name, found & banned)


@pytest.mark.slow
def test_a_trained_run_initialises_a_new_model(trained_runs):
    """config.init.checkpoint=WORKDIR (transfer from another task) loads the run's best
    weights, BatchNorm statistics included, and leaves the run untouched."""
    source = trained_runs[1]
    before = _snapshot(source)
    trained = runs.load_trained(source)
    config = tiny_config("")
    fresh = runs.build_model(config, num_classes=2)
    runs.init_weights(fresh, source, head="strict")
    want = nnx.to_pure_dict(trained.state)
    got = nnx.to_pure_dict(nnx.state(fresh))
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    assert flat_want
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, value in flat_want:
        np.testing.assert_array_equal(np.asarray(got_leaves[path]), np.asarray(value))
    assert _snapshot(source) == before
