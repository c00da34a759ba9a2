"""The command line of `python -m xmedjax.main`, checked before absl parses it.

    cli_flags.check_argv(sys.argv)             # ConfigError: one line naming the file or key
    app.run(main, flags_parser=cli_flags.parse_flags)

absl and ml_collections report a missing config file, a file without `get_config`, or an
unknown `--config.KEY=VALUE` override with a long traceback from inside flag parsing.
`check_argv` loads the config file itself first (as ml_collections does: `PATH[:ARGS]`, ARGS
passed to get_config) and walks every override's key, so each of those failures is one
line naming the file or the key (with the keys known there, as `config_checks` says for a
bad key in a file). `parse_flags` turns any other flag error (a value of the wrong type,
an override before --config) into one line. A good command line parses exactly as before.
Imports neither JAX nor the models.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback
from typing import Any

import ml_collections
from absl import flags

from xmedjax import cli_errors
from xmedjax.errors import ConfigError

_HELP = re.compile(r"^-{1,2}(help|helpshort|helpfull|helpxml|\?|h)$")


def _config_spec(argv: list[str], name: str) -> str | None:
    """The value of --NAME (the last one given), or None."""
    spec = None
    for i, arg in enumerate(argv):
        match = re.match(rf"^-{{1,2}}{name}(=(.*))?$", arg)
        if match and match.group(1):
            spec = match.group(2)
        elif match and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _overrides(argv: list[str], name: str) -> list[str]:
    """The keys of --NAME.KEY[=VALUE] and --noNAME.KEY overrides, in order."""
    keys = []
    for arg in argv:
        match = re.match(rf"^-{{1,2}}(no)?{name}\.([^=]+)", arg)
        if match:
            keys.append(match.group(2))
    return keys


def _where(err: BaseException, path: str) -> str:
    """`err` in one line, with the line of the config file it came from."""
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == path]
        line = frames[-1].lineno if frames else None
    message = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, SyntaxError):
        message = err.msg
    where = f"line {line}: " if line else ""
    return f"{where}{type(err).__name__}: {message}"


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """get_config(*ARGS) of the config file `PATH[:ARGS]`; ConfigError naming the file."""
    path, *args = spec.split(":", 1)
    if not path:
        raise ConfigError("--config is empty: pass --config=configs/NAME.py")
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such config file {os.path.abspath(path)}")
    loader = importlib.machinery.SourceFileLoader("xmedjax_cli_config", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: said in one line
        raise ConfigError(f"{path} cannot be loaded: {_where(err, path)}") from err
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"{path} has no get_config() (a config file defines get_config() returning an "
            "ml_collections.ConfigDict; start from configs/demo.py)"
        )
    try:
        config = get_config(*args)
    except Exception as err:  # noqa: BLE001 - the user's file: said in one line
        raise ConfigError(f"{path}: get_config() failed: {_where(err, path)}") from err
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"{path}: get_config() returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict"
        )
    return config


def check_key(config: Any, key: str, name: str = "config") -> None:
    """ConfigError unless the dotted `key` names an entry of `config` (an override's key)."""
    node, done = config, name
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"{name}.{key} is not a known key ({done} is a value, not a section)")
        if part not in node:
            known = ", ".join(sorted(node.keys()))
            raise ConfigError(f"{done}.{part} is not a known key (known under {done}: {known})")
        node, done = node[part], f"{done}.{part}"


def check_argv(argv: list[str], name: str = "config") -> None:
    """Loads the --NAME config file and checks every --NAME.KEY override's key (see module).

    Raises ConfigError (one line) on the first problem; flag syntax is left to absl.
    """
    argv = flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)
    if any(_HELP.match(a) for a in argv):
        return
    spec = _config_spec(argv, name)
    if spec is None:
        raise ConfigError(f"--{name} is required: pass --{name}=configs/NAME.py")
    config = load_config_file(spec)
    for key in _overrides(argv, name):
        check_key(config, key, name)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(flags_parser=...)`), every failure in one line."""
    with cli_errors.one_line_errors(expected=(flags.Error,)):
        return flags.FLAGS(argv)


def _verbosity(argv: list[str]) -> int:
    """--verbosity=N (or -v N, ...) as given on the command line, before absl parses it."""
    level = 0
    for i, arg in enumerate(argv):
        match = re.match(r"^-{1,2}(verbosity|v)(=(.*))?$", arg)
        if not match:
            continue
        value = match.group(3) if match.group(2) else " ".join(argv[i + 1 : i + 2])
        if value.lstrip("-").isdigit():
            level = int(value)
    return level


def checked(argv: list[str] | None = None, name: str = "config") -> None:
    """`check_argv` of `argv` (default sys.argv); a failure ends the program in one line
    (after its traceback under --verbosity=1)."""
    argv = sys.argv if argv is None else argv
    with cli_errors.one_line_errors(expected=(flags.Error,)):
        try:
            check_argv(argv, name)
        except Exception:
            if _verbosity(argv) >= 1:
                traceback.print_exc()
            raise


__all__ = ["check_argv", "check_key", "checked", "load_config_file", "parse_flags"]
