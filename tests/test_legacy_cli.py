"""``python -m emcjax.legacy import|export`` never overwrites without --overwrite, leaves nothing behind when it
fails, and reports bad input in one line with exit status 2 (issue 15)."""

from __future__ import annotations

import pytest

from emcjax.legacy.__main__ import main

from clitest import cli_error, snapshot
from test_legacy import write_reference_dir


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "work"
    write_reference_dir(root)
    out = root.parent / "imported.h5"
    main(["import", str(root), "--out", str(out)])
    return root, out


@pytest.mark.parametrize("which", ["data", "toml", "init"])
def test_import_refuses_to_overwrite(which, imported, tmp_path, capsys):
    root, _ = imported
    out = tmp_path / "x.h5"
    target = {"data": out, "toml": out.with_suffix(".toml"), "init": tmp_path / "x-init"}[which]
    if which == "init":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    before = snapshot(tmp_path)
    message = cli_error(main, ["import", str(root), "--out", str(out)], capsys)
    assert str(target) in message and "--overwrite" in message
    assert snapshot(tmp_path) == before


def test_import_of_a_file_is_one_line(imported, tmp_path, capsys):
    root, _ = imported
    message = cli_error(main, ["import", str(root / "config.ini"), "--out", str(tmp_path / "x.h5")], capsys)
    assert "config.ini is not a directory" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_import_leaves_nothing(imported, tmp_path, capsys):
    root, _ = imported
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in root.rglob("*"):  # the reference directory without its photons
        target = bad / path.relative_to(root)
        if path.is_dir():
            target.mkdir()
        elif path.name != "mpi-datafile.bin":
            target.write_bytes(path.read_bytes())
    cli_error(main, ["import", str(bad), "--out", str(tmp_path / "x.h5")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_export_refuses_a_non_empty_directory_and_a_failed_export_leaves_it_as_it_was(imported, tmp_path, capsys):
    _, out = imported
    run = out.with_name("imported-init")
    to = tmp_path / "ref"
    to.mkdir()
    (to / "config.ini").write_text("mine")
    before = snapshot(to)
    message = cli_error(main, ["export", "--run", str(run), "--to", str(to)], capsys)
    assert "is not empty" in message and "--overwrite" in message
    assert snapshot(to) == before
    (to / "aux").write_text("a file where the export needs a directory")  # fails after writing some files
    before = snapshot(to)
    cli_error(main, ["export", "--run", str(run), "--to", str(to), "--overwrite"], capsys)
    assert snapshot(to) == before
    (to / "aux").unlink()
    main(["export", "--run", str(run), "--to", str(to), "--overwrite"])
    assert (to / "config.ini").read_text() != "mine" and (to / "hkl-val.dat").exists()
    main(["export", "--run", str(run), "--to", str(tmp_path / "new")])  # a new directory needs no flag
    new, replaced = snapshot(tmp_path / "new"), snapshot(to)
    assert new.keys() == replaced.keys()
    assert all(new[k] == replaced[k] for k in new if k != "config.ini")  # config.ini names its home_dir
