"""Helpers for tests of the command lines: a command's error exit, and byte snapshots of directories."""

from __future__ import annotations

import pathlib

import pytest


def cli_error(main, argv: list[str], capsys) -> str:
    """Runs a command's ``main(ARGV)`` in this process; asserts exit status 2 and exactly one ``error:`` line on
    stderr (no traceback); returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), for byte-for-byte comparisons."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
