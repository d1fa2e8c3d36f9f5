"""One boundary for every engine command: an error becomes a message and an exit code.

Bad input (a config, a data file, a URI, a path that is missing or not a file) ends in one line,
``PROG: error: ...``, and exit code 2, never a traceback; a failure the engine knows (storage, a batch
that does not fit in memory) in one line with its type and message, exit code 1. Anything else is a
crash or a bug: its Python traceback is printed (the pod log keeps it, and the provider classifies
out-of-memory errors from it), then one line with its type, message and the place it was raised,
exit code 1. ``--debug`` or ``FINETUNE_DEBUG=1`` lets every error through unchanged, bad input
included.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

DEBUG_ENV = "FINETUNE_DEBUG"
INPUT_ERROR = 2
FAILURE = 1

# Engine errors that are not ValueErrors but whose message is meant for the user (by qualified name,
# so this module imports none of their modules: --help stays free of boto3 and torch).
_KNOWN_FAILURES = {
    "finetune_engine.storage.s3.StorageError",
    "finetune_engine.autobatch.BatchTooLargeError",
}


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(err: BaseException) -> str:
    """file:line where ``err`` was raised; when that is in a library, also the engine's line that
    called it."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
    if not frames:
        return ""

    def short(frame: traceback.FrameSummary) -> str:
        name = frame.filename.replace(os.sep, "/")
        for root in ("finetune_engine/", "site-packages/"):
            if root in name:
                name = (root if root == "finetune_engine/" else "") + name.split(root, 1)[1]
        return f"{name}:{frame.lineno}"

    ours = [f for f in frames if "finetune_engine" in f.filename.replace(os.sep, "/")]
    if not ours or ours[-1] is frames[-1]:
        return short(frames[-1])
    return f"{short(frames[-1])}, called from {short(ours[-1])}"


def _os_message(err: OSError) -> str:
    what = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return what
    name = err.filename
    hint = ""
    if isinstance(err, FileNotFoundError):
        hint = "; check the path"
    elif isinstance(err, IsADirectoryError):
        hint = "; give the path of a file"
    elif isinstance(err, NotADirectoryError):
        hint = "; a part of the path is a file, not a directory"
    elif isinstance(err, PermissionError):
        hint = "; check its permissions"
    target = f" -> {err.filename2}" if err.filename2 else ""
    return f"{name}{target}: {what}{hint}"


# OSErrors that say nothing about the input: a network that is down or slow. A failure (exit 1, which
# the provider retries), never bad input (exit 2, which it does not).
_TRANSIENT = (ConnectionError, TimeoutError)


def unexpected(err: BaseException) -> bool:
    """Whether ``err`` is neither bad input nor a failure the engine reports in its own words: a
    crash or a bug, whose traceback is shown."""
    if isinstance(err, (OSError, UnicodeError, ValueError)):
        return False
    return not ({_qualified(c) for c in type(err).__mro__} & _KNOWN_FAILURES)


def describe(err: Exception) -> tuple[int, str]:
    """(exit code, message) of an error that ended a command."""
    text = " ".join(str(err).split()) if "\n" not in str(err) else str(err).strip()
    if isinstance(err, _TRANSIENT):
        return FAILURE, f"{type(err).__name__}: {_os_message(err)}"
    if isinstance(err, OSError):
        return INPUT_ERROR, _os_message(err)
    if isinstance(err, UnicodeError):
        return INPUT_ERROR, f"not UTF-8 text ({err}); save the file as UTF-8"
    if isinstance(err, ValueError):
        return INPUT_ERROR, text or type(err).__name__
    if not unexpected(err):
        # the type stays in the line: the provider recognises BatchTooLargeError in the pod log
        return FAILURE, f"{type(err).__name__}: {text or '(no message)'}"
    where = _where(err)
    return FAILURE, f"unexpected {type(err).__name__}: {text or '(no message)'}" + (
        f" (at {where})" if where else ""
    )


def run_guarded(prog: str, func: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    """``func(argv)`` with every error turned into ``PROG: error: MESSAGE`` on stderr and an exit code
    (2 for bad input); an unexpected error's traceback is printed before that line. With debugging on,
    every error is raised unchanged. argparse's own exits pass through."""
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every error is reported
        if debug_enabled():
            raise
        code, message = describe(err)
        if unexpected(err):
            traceback.print_exception(err, file=sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return code
