"""The shared error path of every ``python -m emcjax.<command>``: one line, exit status 2, no traceback.

``run_cli(main, argv)`` calls ``main(argv)`` and turns what goes wrong into ``error: <message>`` on stderr and
exit status 2: emcjax's own errors (a bad file, field or run directory, whose message names it) and the
operating system's (a full disk, a directory that cannot be written). Anything else is a bug: it is
reported in one line too, with exit status 1 and a pointer to ``--debug``. ``--debug`` (any position, or
``EMCJAX_DEBUG=1``) shows the full traceback instead. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from emcjax.errors import EmcjaxError

DEBUG_FLAG = "--debug"
EXIT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
command_line: list[str] | None = None
"""The command being run (``python -m emcjax.<command>`` and its arguments), for provenance records."""


def os_error_message(err: OSError) -> str:
    """``path: reason`` of an operating-system error, with what to do for a full disk or quota."""
    where = " -> ".join(os.fspath(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    text = f"{where}: {reason}" if where else reason
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text += " (the disk, quota or file-size limit is full; free space, then rerun; a run continues with --resume)"
    return text


def fail(message: str, status: int = EXIT_ERROR, *, hard: bool = False) -> None:
    """Prints ``error: message`` (one line) on stderr and exits with ``status``; ``hard``: at once, without
    the interpreter's shutdown (after a failed write, Orbax/TensorStore threads may still run, and tearing
    them down can crash the process instead of exiting with ``status``)."""
    sys.stderr.write("error: " + " ".join(str(message).split("\n")) + "\n")
    sys.stderr.flush()
    if hard:
        sys.stdout.flush()
        os._exit(status)
    raise SystemExit(status)


def stage_main(cls: type, run: Callable[[Any], object], module: str, doc: str) -> Callable[..., None]:
    """The ``main(argv=None)`` of a stage whose flags are the fields of the dataclass ``cls``: parses them with
    tyro (``--help`` shows the first paragraph of ``doc``) and calls ``run(config)`` under :func:`run_cli`."""

    def parse_and_run(argv: list[str]) -> None:
        import tyro

        run(tyro.cli(cls, args=argv, prog=f"python -m {module}", description=doc.split("\n\n")[0]))

    def main(argv: list[str] | None = None) -> None:
        run_cli(parse_and_run, argv, module)

    main.__doc__ = f"``python -m {module}``: errors become one line and exit status 2 (``emcjax.cli``)."
    return main


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None, module: str) -> None:
    """Runs ``main(argv)`` (``argv`` without ``--debug``; None: the process's arguments) with emcjax's error
    handling (module docstring); ``module`` names the command (``emcjax.lowres``) for provenance records."""
    hard = argv is None  # the process is this command: it may end without the interpreter's shutdown
    argv = list(sys.argv[1:] if argv is None else argv)
    global command_line
    command_line = ["python", "-m", module, *argv]
    debug = DEBUG_FLAG in argv or os.environ.get("EMCJAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        main(argv)
        return
    # Orbax logs the failures of its writer threads with tracebacks through absl; emcjax.checkpoint raises
    # them as one error, so those logs are kept for --debug
    absl, absl_level, hook = logging.getLogger("absl"), logging.getLogger("absl").level, sys.unraisablehook
    absl.setLevel(logging.CRITICAL)
    sys.unraisablehook = _unraisable  # h5py's complaints while closing a file whose write failed
    try:
        main(argv)
    except EmcjaxError as err:
        fail(str(err), hard=hard)
    except OSError as err:
        fail(os_error_message(err), hard=hard)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED, hard=hard)
    except Exception as err:  # a bug: still one line, the traceback is one flag away
        fail(f"unexpected {type(err).__name__}: {err} (rerun with {DEBUG_FLAG} for the traceback, and report it)",
             EXIT_BUG, hard=hard)
    finally:  # as they were (commands called from Python, e.g. tests)
        absl.setLevel(absl_level)
        sys.unraisablehook = hook


def _unraisable(unraisable) -> None:
    """Drops exceptions Python cannot raise (reported with --debug); the error that matters is raised."""
