"""What makes this Python process the `numavm` command: how it ends, whatever happens.

Imported first by the console script's module (numavm.cli) and by ``python -m numavm``, and
cheap (os, signal, sys): from the moment `become_command` has run, SIGINT and SIGTERM end the
process with status 130 (README's exit statuses), during start-up (imports) too, and a
closed stdout (``| head``) ends it quietly with 141, the status a shell reports for a
command killed by SIGPIPE.  Before that moment only the interpreter's own start-up is left.
A library user's process (``import numavm``) is left alone.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130
BROKEN_PIPE = 141  # 128 + SIGPIPE


def _on_term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends numavm as SIGINT does


def _excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
    """An exception that escaped main (a signal during imports, or after main returned).
    Python 3.11 wraps one raised while a class is made (dataclasses' __set_name__) in a
    RuntimeError: the chain is searched."""
    seen: BaseException | None = value
    for _ in range(32):
        if seen is None:
            break
        if isinstance(seen, KeyboardInterrupt):
            os._exit(INTERRUPTED)
        seen = seen.__cause__ or seen.__context__
    if issubclass(kind, KeyboardInterrupt):
        os._exit(INTERRUPTED)
    if issubclass(kind, BrokenPipeError):
        os._exit(BROKEN_PIPE)
    sys.__excepthook__(kind, value, tb)  # type: ignore[arg-type]


def is_command() -> bool:
    """Whether this process is the numavm command (its console script or ``python -m numavm``)."""
    main = sys.argv[0] if sys.argv else ""
    base = os.path.basename(main)
    return base == "numavm" or (base == "__main__.py" and os.path.basename(os.path.dirname(main)) == "numavm")


def become_command() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, and one that escapes main ends the process
    with 130 (no traceback); a broken pipe that escapes it ends it with 141."""
    if sys.excepthook is not _excepthook:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_term)
        sys.excepthook = _excepthook


def finished(status: int) -> None:
    """The command is done and `status` decided: as the numavm command, end the process here
    with it.  Signals are ignored from here on, stdout and stderr flushed, the atexit
    functions (temporary directories) run, and the process exits without the interpreter's
    shutdown, during which a signal would end it by that signal (-2, -15) instead of its status.
    In any other process (a library user's, a test's `main()`) nothing happens."""
    if sys.excepthook is not _excepthook:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    import atexit
    atexit._run_exitfuncs()
    os._exit(status)


def discard_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush of what could not be
    written (a closed pipe, a full disk) neither fails nor prints "Exception ignored"."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass
