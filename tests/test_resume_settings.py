"""Changed settings on resume (runs.RESUMABLE): each key is applied or refused, said in one
line, and the run's record stays true (config.json = the config trained, resumes.jsonl =
one line per resumed train command). Evaluate/explain/predict never rewrite config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_resume import _TermAt
from test_train import phantom_dir, tiny_config  # noqa: F401 (fixture)

from xmedjax import checkpointing, config_checks, input_pipeline, modes, runs, train
from xmedjax import train_state as ts

ONE_EPOCH = {"training.max_epochs": 1, "training.checkpoint_every_steps": 1}  # 4 steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_dir) -> str:  # noqa: F811
    """A finished 4-step run (demo learning rate 2e-3)."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.fit(runs.build_run(tiny_config(phantom_dir, **ONE_EPOCH), workdir))
    return workdir


def _copy(workdir: str, tmp_path) -> str:
    return shutil.copytree(workdir, str(tmp_path / "run"))


def _read(workdir: str, name: str) -> str:
    return open(os.path.join(workdir, name)).read()


def _resumes(workdir: str) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(workdir, runs.RESUMES_FILE))]


def test_a_new_learning_rate_applies_and_more_epochs_extend(trained, phantom_dir, tmp_path, capsys):  # noqa: F811
    work = _copy(trained, tmp_path)
    old = tiny_config(phantom_dir).optimizer.learning_rate
    new = old / 2
    overrides = dict(ONE_EPOCH, **{"training.max_epochs": 2, "optimizer.learning_rate": new})
    config = tiny_config(phantom_dir, **overrides)
    run = runs.build_run(config, work)
    assert run.changes == {"optimizer.learning_rate": (old, new), "training.max_epochs": (1, 2)}
    loop = train.fit(run)
    out = capsys.readouterr().out
    assert (
        f"resumed from {checkpointing.checkpoint_dir(work)} at step 4 with changed settings: "
        f"optimizer.learning_rate {old!r} -> {new!r} (applied: the learning rate is now "
        f"{new:g}, was {old:g}), training.max_epochs 1 -> 2\n"
    ) in out, out
    assert "extending a finished run from step 4 to 8 steps" in out
    assert loop.stop_step == 8 and loop.learning_rate == loop.base_learning_rate == new
    assert ts.learning_rate(run.state) == pytest.approx(new, rel=1e-6)
    assert [h["learning_rate"] for h in loop.history] == [old, new]
    saved = json.loads(_read(work, runs.CONFIG_FILE))  # the config actually trained
    assert saved["optimizer"]["learning_rate"] == new and saved["training"]["max_epochs"] == 2
    assert [(r["step"], r["changes"]) for r in _resumes(work)] == [
        (4, {"optimizer.learning_rate": [old, new], "training.max_epochs": [1, 2]})
    ]
    # The same command again: nothing changed, said and recorded as such.
    run = runs.build_run(config, work)
    assert run.changes == {}
    loop = train.fit(run)
    out = capsys.readouterr().out
    assert f"resumed from {checkpointing.checkpoint_dir(work)} at step 8\n" in out
    assert ts.learning_rate(run.state) == pytest.approx(new, rel=1e-6)
    assert [(r["step"], r["changes"]) for r in _resumes(work)][1:] == [(8, {})]


def test_a_new_learning_rate_applies_even_if_the_first_resume_was_killed_before_saving(
    trained,
    phantom_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    work = _copy(trained, tmp_path)
    old = tiny_config(phantom_dir).optimizer.learning_rate
    config = tiny_config(phantom_dir, **dict(ONE_EPOCH, **{"optimizer.learning_rate": 1e-4}))
    runs.build_run(config, work)  # config.json now says 1e-4; killed before any save
    run = runs.build_run(config, work)
    assert run.changes == {}  # config.json alone would miss it; the checkpoint does not
    train.fit(run)
    assert "optimizer.learning_rate 0.002 -> 0.0001 (applied" in capsys.readouterr().out
    assert ts.learning_rate(run.state) == pytest.approx(1e-4, rel=1e-6)
    assert _resumes(work)[-1]["changes"] == {"optimizer.learning_rate": [old, 1e-4]}


@pytest.mark.parametrize(
    "key, value",
    [
        ("training.batch_size", 16),  # the Grain iterator's position and steps per epoch
        ("training.seed", 1),  # the data order and augmentation draws
        ("augment.rotation_range", 5.0),
        ("optimizer.name", "sgd"),  # another optimiser state
        ("training.best_metric", "val_auc_roc"),  # the saved best would not compare
        ("data.val_split", "test"),
        ("init.head", "strict"),
    ],
)
def test_changes_a_resumed_run_cannot_make_are_refused_in_one_line(
    trained,
    phantom_dir,  # noqa: F811
    key,
    value,
):
    before = {n: _read(trained, n) for n in os.listdir(trained) if n.endswith(".json")}
    config = tiny_config(phantom_dir, **dict(ONE_EPOCH, **{key: value}))
    node = json.loads(_read(trained, runs.CONFIG_FILE))
    for part in key.split("."):
        node = node[part]
    with pytest.raises(config_checks.ConfigError) as err:
        runs.build_run(config, trained)
    assert str(err.value) == (
        f"{trained} was trained with other settings, which a resumed run cannot change: "
        f"saved config.{key}={node!r} (this config: {value!r}); rerun with the saved values, "
        "or use another --workdir for a new run"
    )
    assert {n: _read(trained, n) for n in os.listdir(trained) if n.endswith(".json")} == before
    assert not os.path.exists(os.path.join(trained, runs.RESUMES_FILE))


def test_another_normalization_is_another_model(trained, phantom_dir):  # noqa: F811
    """The model's input contract: refused in every mode (runs.MODEL_KEYS)."""
    config = tiny_config(phantom_dir, mode="evaluate", **{"data.normalization": "unit"})
    with pytest.raises(config_checks.ConfigError, match=r"saved config.data.normalization="):
        modes.evaluate(config, trained)


def test_a_lower_step_limit_ends_training_where_it_is(phantom_dir, tmp_path, capsys):  # noqa: F811
    work = str(tmp_path / "run")
    config = tiny_config(phantom_dir, **{"training.checkpoint_every_steps": 1})  # 2 epochs
    inner = input_pipeline.make_train_iterator(
        phantom_dir,
        "train",
        global_batch_size=8,
        preprocess=input_pipeline.Preprocess(32, 1, "imagenet"),
        augment=dict(config.augment),
        seed=0,
    )
    with pytest.raises(train.Preempted, match="SIGTERM: saved step 6"):
        train.fit(runs.build_run(config, work), train_iterator=_TermAt(inner, at=6))
    lower = {"training.checkpoint_every_steps": 1, "training.max_steps": 5}
    loop = train.fit(runs.build_run(tiny_config(phantom_dir, **lower), work))
    assert "step 6 reaches the new limit of 5 steps: training ends here" in capsys.readouterr().out
    assert loop.stop is train.StopReason.MAX_STEPS and loop.stop_step == 6
    assert checkpointing.saved_step(work, checkpointing.LATEST) == 6
    assert _resumes(work)[-1]["changes"] == {"training.max_steps": [0, 5]}


def test_evaluate_keeps_the_trained_config_and_refuses_another_image_size(
    trained,
    phantom_dir,  # noqa: F811
    tmp_path,
):
    work = _copy(trained, tmp_path)
    config_json = _read(work, runs.CONFIG_FILE)
    other = {"optimizer.learning_rate": 1e-5, "evaluate.bootstrap_samples": 10}
    modes.evaluate(tiny_config(phantom_dir, mode="evaluate", **other), work)
    assert _read(work, runs.CONFIG_FILE) == config_json  # evaluate trains nothing
    assert not os.path.exists(os.path.join(work, runs.RESUMES_FILE))
    metrics = _read(work, "metrics.json")
    with pytest.raises(config_checks.ConfigError, match=r"saved config.data.image_size=32"):
        modes.evaluate(tiny_config(phantom_dir, mode="evaluate", **{"data.image_size": 64}), work)
    assert _read(work, "metrics.json") == metrics and _read(work, "config.json") == config_json


def test_read_only_tools_take_no_lock(trained, tmp_path):
    from test_workdir_lock import HOLDER

    work = _copy(trained, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, work], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        before = sorted(os.listdir(work))
        lock = _read(work, ".lock")
        model = runs.load_trained(work)  # while another command holds the work directory
        assert model.step == 4
        assert sorted(os.listdir(work)) == before and _read(work, ".lock") == lock
    finally:
        proc.kill()
        proc.wait(timeout=30)
    os.remove(os.path.join(work, ".lock"))
    runs.load_trained(work)
    assert ".lock" not in os.listdir(work)
