"""Every command of the README's "Commands" block runs as written, in order, in one directory."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Commands\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.strip().splitlines()]


def _run(argv: list[str]) -> None:
    assert argv[:2] == ["python", "-m"], argv
    module = importlib.import_module(argv[2])
    try:
        module.main(argv[3:])
    except SystemExit as done:  # --help exits 0; an error exits with its message
        assert done.code in (0, None), f"{shlex.join(argv)}: {done.code}"


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert len(commands) >= 8
    for argv in commands:
        _run(argv)
    assert "--emc.block-frames" in capsys.readouterr().out  # the help lists every setting
    # the streamed run equals the in-memory run (runs/a after its 3rd iteration)
    with h5py.File("runs/s/intensities.h5") as streamed, h5py.File("runs/a/iterations/003.h5") as memory:
        a, b = np.asarray(memory["intensity"]), np.asarray(streamed["intensity"])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    assert pathlib.Path("imported.h5").is_file() and pathlib.Path("runs/nb/intensities.h5").is_file()

