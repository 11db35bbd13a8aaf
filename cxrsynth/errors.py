"""What a user sees when something fails: one line, never a traceback.

`UserError` is the base of every project error whose message explains the problem in full (a bad param, a damaged
model folder, a release table that does not parse): `run_guarded` prints it as one line and exits with status 2. An
`OSError` (a file in the way of an output folder, no permission, a full disk) is an input problem too: one line
naming the path. Anything else is a bug or an unforeseen state: one line saying so, with the file where the full
traceback was written, and exit status 1.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path


class UserError(ValueError):
    """An input problem; the message (one line) names the file, key or option and the reason."""


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span many lines), or its type."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def os_error_line(err: OSError) -> str:
    """'PATH: reason' for an OSError (the path it names, or both paths of a failed rename)."""
    reason = err.strerror or one_line(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    if err.filename is not None and err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {reason}"
    if err.filename is not None:
        return f"{err.filename}: {reason}"
    return reason


def write_traceback(prog: str, exc: BaseException) -> Path:
    """The full traceback of `exc` in a new file under the temporary folder; its path."""
    fd, name = tempfile.mkstemp(prefix=f"cxrsynth-{prog.replace('/', '_').replace(' ', '_')}-"
                                       f"{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{prog} (pid {os.getpid()}, argv {sys.argv!r})\n")
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return Path(name)


def run_guarded(fn: Callable[..., object], prog: str, *args: object) -> int:
    """Run `fn(*args)` and turn a failure into one line on stderr and an exit status: 2 for a `UserError` or an
    `OSError`, 1 (with the traceback in a file) for anything else, 130 for Ctrl-C. `SystemExit` passes through.
    Lines start `<prog> error:` (`error:` when `prog` is empty, as the command line prints them)."""
    lead = f"{prog} " if prog else ""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print(f"{lead}interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"{lead}error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{lead}error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or an unforeseen state: say so in one line, keep the traceback in a file
        try:
            where = f"full traceback in {write_traceback(prog or 'cli', err)}"
        except OSError:
            where = "no traceback file could be written"
        print(f"{lead}internal error: {type(err).__name__}: {one_line(err)} ({where})", file=sys.stderr)
        return 1
