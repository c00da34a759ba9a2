"""The command line of python -m xmedjax.main (xmedjax.cli_flags): a missing config file, a
file without get_config, an unknown --config.KEY and other flag errors are each one line
naming the file or key, before anything is created; good command lines parse as before."""

from __future__ import annotations

import os

import pytest
from test_configs import ROOT, _main

from xmedjax import cli_flags
from xmedjax.errors import ConfigError

DEMO = "--config=configs/demo.py"
OPTIMIZER_KEYS = "learning_rate, momentum, name, weight_decay"


def _one_line(res) -> str:
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            [DEMO, "--config.optimizer.lr=1"],
            "config error: config.optimizer.lr is not a known key (known under "
            f"config.optimizer: {OPTIMIZER_KEYS})",
        ),
        (
            [DEMO, "--noconfig.runtime.progres_bar"],
            "config error: config.runtime.progres_bar is not a known key (known under "
            "config.runtime: compilation_cache_dir, coordinator_address, distributed, "
            "num_processes, process_id, progress_bar)",
        ),
        (
            [DEMO, "--config.training.batch_size.x=1"],
            "config error: config.training.batch_size.x is not a known key "
            "(config.training.batch_size is a value, not a section)",
        ),
        (
            ["--config=configs/nope.py"],
            "config error: --config=configs/nope.py: no such config file "
            f"{os.path.join(ROOT, 'configs', 'nope.py')}",
        ),
        ([], "config error: --config is required: pass --config=configs/NAME.py"),
        (
            [DEMO, "--config.training.batch_size=abc"],
            "error: flag --config.training.batch_size=abc: invalid literal for int() with "
            "base 10: 'abc'",
        ),
        ([DEMO, "--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
    ],
)
def test_bad_command_lines_are_one_line(tmp_path, args, line):
    workdir = tmp_path / "w"
    assert _one_line(_main(*args, f"--workdir={workdir}")) == line
    assert not workdir.exists()


def test_bad_config_files_name_the_file(tmp_path):
    cases = {
        "no_get_config.py": (
            "c = 1\n",
            " has no get_config() (a config file defines get_config() returning an "
            "ml_collections.ConfigDict; start from configs/demo.py)",
        ),
        "raises.py": (
            "def get_config():\n    return 1 / 0\n",
            ": get_config() failed: line 2: ZeroDivisionError: division by zero",
        ),
        "syntax.py": ("def get_config(:\n", " cannot be loaded: line 1: SyntaxError: "),
        "returns_none.py": (
            "def get_config():\n    pass\n",
            ": get_config() returned NoneType, not an ml_collections.ConfigDict",
        ),
    }
    for name, (source, message) in cases.items():
        path = tmp_path / name
        path.write_text(source)
        line = _one_line(_main(f"--config={path}", f"--workdir={tmp_path / 'w'}"))
        assert line.startswith(f"config error: {path}{message}"), line
    assert not (tmp_path / "w").exists()


def test_good_command_lines_parse_as_before(tmp_path):
    """Overrides of every kind reach the mode (here: evaluate on a work directory without a
    checkpoint, which stops at once), with --config=PATH or --config PATH."""
    workdir = tmp_path / "typo"
    overrides = [
        "--config.mode=evaluate",
        "--noconfig.runtime.progress_bar",
        "--config.data.phantom_counts.train=64",
        "--config.explain.methods=gradcam",
        "--config.explain.methods=random",
        "--config.optimizer.learning_rate=3e-4",
    ]
    for config in ([DEMO], ["--config", "configs/demo.py"]):
        line = _one_line(_main(*config, f"--workdir={workdir}", *overrides))
        assert line.startswith(f"error: {workdir} has no best checkpoint"), line


def test_check_argv_in_process(tmp_path):
    argv = ["xmedjax.main", DEMO, "--config.training.max_epochs=3", "--config.optimizer.lr=1"]
    with pytest.raises(ConfigError, match=r"^config.optimizer.lr is not a known key"):
        cli_flags.check_argv(argv)
    cli_flags.check_argv(argv[:3])
    cli_flags.check_argv(["xmedjax.main", "--helpfull"])  # help is absl's
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(f"{DEMO}\n--config.data.imagesize=64\n")
    with pytest.raises(ConfigError, match=r"^config.data.imagesize is not a known key"):
        cli_flags.check_argv(["xmedjax.main", f"--flagfile={flagfile}"])
