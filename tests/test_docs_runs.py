"""Runs the command block of docs/RUNS.md as shown, in a temporary directory: commands marked ``# exit 2``
must be refused with one error line and exit status 2, the others must succeed."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

from emcjax import runio, toml_config

from clitest import cli_error

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "RUNS.md"


def doc_commands() -> list[str]:
    block = re.search(r"## Try it.*?```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_doc_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = doc_commands()
    assert len(commands) >= 6
    for line in commands:
        command, _, comment = line.partition("#")
        words = shlex.split(command)
        assert words[:2] == ["python", "-m"] and words[2].startswith("emcjax."), line
        main = importlib.import_module(words[2]).main
        if "exit 2" in comment:
            before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
            cli_error(main, words[3:], capsys)
            assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, line
        else:
            main(words[3:])
    assert [r["iteration"] for r in runio.read_metrics(tmp_path / "runs" / "a")] == [1, 2, 3]
    assert [r["iteration"] for r in runio.read_metrics(tmp_path / "runs" / "b")] == [1, 2]
    assert toml_config.config_from_toml(__import__("emcjax.lowres").lowres.LowresConfig,
                                  tmp_path / "runs" / "b" / "config.toml").init_from == tmp_path / "runs" / "a"
