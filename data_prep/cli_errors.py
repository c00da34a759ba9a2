"""One line per failure for command-line mains; the full traceback only on request.

    @cli_errors.one_line_errors("data_prep.build")
    def main(argv): ...

    with cli_errors.one_line_errors("data_prep.audit", log_file="audit.log"):
        ...

An exception leaving the block ends the program with one line on stderr:

- an expected failure, one the user can fix (any ``OSError``: a missing file, no space left,
  a read-only folder; the project's own errors listed in ``EXPECTED``; the caller's
  ``expected`` types): ``COMMAND: error: MESSAGE``, exit status 1;
- anything else (a bug): ``COMMAND: internal error: Type: first line (traceback in LOG)``,
  exit status 1, the full traceback written to LOG (``log_file``, else a new file in the
  system's temp folder);
- ``KeyboardInterrupt``: ``COMMAND: interrupted``, exit status 130.

The full traceback is printed too under absl's ``--verbosity=1`` (or higher), and appended
to ``log_file`` when one is given. ``SystemExit`` passes through untouched.

This module imports nothing from the project (``xmedjax.cli_errors`` adds xmedjax's
errors), so ``data_prep`` commands use it directly.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import sys
import tempfile
import traceback
from collections.abc import Iterable, Iterator

# The project's expected errors, by "module:Class" (or ("module:Class", prefix)), matched by
# name against the exception's class and bases: naming one imports nothing.
EXPECTED: tuple = (
    "data_prep.build:BuildError",
    "data_prep.dataset_format:DatasetError",
)

_OS_HINTS = {
    errno.ENOSPC: "free some disk space, then rerun",
    errno.EDQUOT: "free some disk quota, then rerun",
    errno.EACCES: "make it writable (or readable) or choose another folder",
    errno.EPERM: "make it writable (or readable) or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.EFBIG: "the file exceeds the file-size limit",
}
_MAX_UNEXPECTED = 300  # characters of an unexpected error's first line


def describe(exc: BaseException) -> str:
    """The message of an expected error: an OSError's reason and file, else ``str(exc)``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
        if exc.filename2 is not None:
            text += f" -> {exc.filename2}"
        hint = _OS_HINTS.get(exc.errno)
        return f"{text} ({hint})" if hint else text
    return str(exc).strip() or type(exc).__name__


def with_path(exc: OSError, path: str) -> OSError:
    """``exc`` with ``path`` as its file name when it names none (``f.write`` errors do not)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    new = type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), path)
    new.__cause__ = exc
    return new


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Re-raises an OSError raised inside with ``path`` named (see ``with_path``)."""
    try:
        yield
    except OSError as exc:
        new = with_path(exc, path)
        if new is exc:
            raise
        raise new from exc


def _names(cls: type) -> set[str]:
    """ "module:Class" of ``cls`` and its bases (a ``python -m`` module's own name, not
    ``__main__``)."""
    out = set()
    for c in cls.__mro__:
        module = c.__module__
        if module == "__main__":
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            module = spec.name if spec is not None else module
        out.add(f"{module}:{c.__qualname__}")
    return out


def _match(exc: BaseException, entries: Iterable) -> str | None:
    """The prefix of the first expected entry ``exc`` is an instance of, else None."""
    names = _names(type(exc))
    for entry in entries:
        what, prefix = entry if isinstance(entry, tuple) else (entry, "error: ")
        if (isinstance(what, type) and isinstance(exc, what)) or what in names:
            return prefix
    return None


def _expected(exc: BaseException, entries: Iterable) -> tuple[BaseException, str] | None:
    """The first expected exception in ``exc``'s explicit cause chain (``raise .. from``),
    with its prefix."""
    entries = (*entries, OSError)
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        prefix = _match(cur, entries)
        if prefix is not None:
            return cur, prefix
        cur = cur.__cause__
    return None


def verbose() -> bool:
    """Whether absl's ``--verbosity`` asks for debug output (1 or more)."""
    from absl import flags

    f = flags.FLAGS
    return f.is_parsed() and "verbosity" in f and int(f["verbosity"].value or 0) >= 1


def _log_traceback(command: str, exc: BaseException, log_file: str | None) -> str:
    """Appends ``exc``'s traceback to ``log_file`` (or a new temp file); returns the path."""
    if log_file is None:
        fd, log_file = tempfile.mkstemp(prefix=f"{command.replace('.', '_')}-", suffix=".log")
        os.close(fd)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(exc))
    with open(log_file, "a") as f:
        f.write(f"{stamp} {command} (pid {os.getpid()}, argv {sys.argv!r})\n{text}\n")
    return log_file


class one_line_errors(contextlib.ContextDecorator):  # noqa: N801 (used like a function)
    """Turns an exception leaving the block into one line and an exit status (see module)."""

    def __init__(
        self, command: str | None = None, *, expected: Iterable = (), log_file: str | None = None
    ):
        self.command = command
        self.expected = (*EXPECTED, *expected)
        self.log_file = log_file

    def __enter__(self) -> one_line_errors:
        return self

    def _line(self, text: str) -> str:
        return f"{self.command}: {text}" if self.command else text

    def __exit__(self, etype, exc, tb) -> bool:
        if exc is None or isinstance(exc, SystemExit):
            return False
        if isinstance(exc, KeyboardInterrupt):
            print(self._line("interrupted"), file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        if verbose():
            traceback.print_exception(exc, file=sys.stderr)
        found = _expected(exc, self.expected)
        if found is not None:
            if self.log_file:
                self._safe_log(exc)
            cause, prefix = found
            print(self._line(prefix + describe(cause)), file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        where = self._safe_log(exc)
        first = (str(exc).strip().splitlines() or [""])[0][:_MAX_UNEXPECTED]
        print(
            self._line(
                f"internal error: {type(exc).__name__}: {first} (traceback in {where}; "
                "--verbosity=1 prints it)"
            ),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None

    def _safe_log(self, exc: BaseException) -> str:
        """The log file's path; when it cannot be written, the traceback goes to stderr."""
        try:
            return _log_traceback(self.command or "xmedjax", exc, self.log_file)
        except OSError as err:
            traceback.print_exception(exc, file=sys.stderr)
            return f"stderr above: the log file failed ({describe(err)})"


__all__ = ["EXPECTED", "describe", "one_line_errors", "verbose", "with_path", "writing"]
