"""The shared error path of the commands (emcjax.cli): one line and exit 2 for emcjax's and the operating
system's errors, exit 1 and a pointer to --debug for anything else, the traceback with --debug."""

from __future__ import annotations

import errno

import pytest

from emcjax import cli
from emcjax.errors import DataError

from clitest import cli_error


def command(exc):
    def main(argv):
        assert "--debug" not in argv
        raise exc

    return lambda argv: cli.run_cli(main, argv, "emcjax.test")


def test_emcjax_and_os_errors_are_one_line_with_status_2(capsys):
    assert cli_error(command(DataError("d.h5: bad\nreally")), [], capsys) == "error: d.h5: bad really"
    line = cli_error(command(OSError(errno.ENOSPC, "No space left on device", "runs/a/x.h5")), [], capsys)
    assert line.startswith("error: runs/a/x.h5: No space left on device") and "free space" in line
    assert cli.command_line == ["python", "-m", "emcjax.test"]


def test_bugs_exit_1_and_debug_shows_the_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        command(KeyError("k"))(["a"])
    assert exc.value.code == 1 and "rerun with --debug" in capsys.readouterr().err
    with pytest.raises(KeyError):
        command(KeyError("k"))(["--debug"])
    with pytest.raises(DataError):
        command(DataError("x"))(["a", "--debug"])
