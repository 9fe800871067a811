"""One-line errors for every command-line entry point.

``python -m sur_lib.<tool> ...`` should tell a user what is wrong in one line that names the
bad input, not in a traceback. Each module's ``if __name__ == "__main__"`` block calls
``run(main)``:

* a bad input (``BAD_INPUT``: a ``UsageError`` for bad arguments, a bad config value, a data,
  knowledge or adapter file that is not what it should be; a missing file or folder) prints
  ``error: <message>`` and exits with status 2, data errors and config errors alike;
* any other exception prints ``error: <Type>: <message>`` and exits with status 1;
* ``--debug`` anywhere on the command line (removed before ``main`` sees it) or the
  environment variable ``SUR_DEBUG=1`` re-raises instead, with the full traceback;
* Ctrl-C exits with status 130 and a one-line note.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
    """A problem with what the user asked for (arguments, config, input files): exit 2."""


#: What counts as a bad input (exit status 2, the message alone): a UsageError (bad arguments, a
#: config value, a data or knowledge file that is not what it should be: SURDError,
#: KnowledgeError and AdapterError are UsageErrors) and a path that names nothing usable.
BAD_INPUT = (UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SUR_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` (argv without ``--debug``) and exit with its status, turning errors
    into one line on stderr (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - this is the one place that reports them
        if debug:
            raise
        usage = isinstance(exc, BAD_INPUT)
        text = str(exc) if usage else f"{type(exc).__name__}: {exc}"
        print(f"error: {text}  (--debug or SUR_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2 if usage else 1)
    sys.exit(int(status or 0))
