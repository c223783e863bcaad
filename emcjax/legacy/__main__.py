"""``python -m emcjax.legacy import|export`` (docs/LEGACY.md)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

import tyro

from emcjax import cli
from emcjax.errors import ConfigError
from emcjax.legacy.convert import export_run, import_directory

_Positional = tyro.conf.Positional


def _cli_import(
    directory: _Positional[pathlib.Path],
    out: pathlib.Path = pathlib.Path("imported.h5"),
    space_group: str | None = None,
    overwrite: bool = False,
) -> None:
    """Import a reference working directory DIR into OUT (data set), OUT.toml (reference-compatible run
    config) and OUT-init/ (initial phi and model).

    Args:
      directory: reference working directory holding config.ini.
      out: emcjax data set to write (HDF5).
      space_group: space group (default: the primitive point-group group of aux/sym-op.dat's Laue group;
        absences cannot be inferred from Laue operators).
      overwrite: replace an existing OUT, OUT.toml and OUT-init/.
    """
    if not directory.is_dir():
        raise ConfigError(f"import: {directory} is not a directory; expected a reference working directory holding "
                          "config.ini")
    targets = [out, out.with_suffix(".toml"), out.with_name(out.stem + "-init")]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(f"import: {', '.join(map(str, existing))} exist(s); add --overwrite to replace, or choose "
                          "another --out (nothing was written)")
    with _removed_on_failure(targets):
        summary = import_directory(directory, out, space_group=space_group, overwrite=overwrite)
    print(f"wrote {out}, {pathlib.Path(out).with_suffix('.toml')}, {pathlib.Path(out).with_name(pathlib.Path(out).stem + '-init')}/: "
          + ", ".join(f"{k} = {v}" for k, v in summary.items()))


def _cli_export(run: pathlib.Path, to: pathlib.Path, data: pathlib.Path | None = None, model_only: bool = False,
                overwrite: bool = False) -> None:
    """Export an emcjax run directory as a reference working directory.

    Args:
      run: emcjax run directory (intensities.h5, config.toml).
      to: reference working directory to write.
      data: data set of the run (default: the run config's 'data').
      model_only: write only the model/phi files (and the geometry/crystal files they need).
      overwrite: write into an existing, non-empty TO (replacing its files of the same names).
    """
    if to.exists() and not to.is_dir():
        raise ConfigError(f"export: {to} exists and is not a directory; choose another --to")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise ConfigError(f"export: {to} is not empty; add --overwrite to replace its files, or choose another --to "
                          "(nothing was written)")
    with _removed_on_failure([to]):
        summary = export_run(run, to, data=data, model_only=model_only)
    print(f"wrote {to}: " + ", ".join(f"{k} = {v}" for k, v in summary.items()))


@contextlib.contextmanager
def _removed_on_failure(targets: list[pathlib.Path]) -> Iterator[None]:
    """If the block fails, removes what it created under ``targets`` (files and directories): a target that
    did not exist goes entirely, in an existing directory the entries that were not there before."""
    before = {t: ({p for p in t.rglob("*")} if t.is_dir() else None) for t in targets if t.exists()}
    try:
        yield
    except BaseException:
        for target in targets:
            if target not in before:
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            elif before[target] is not None:
                for path in sorted(set(target.rglob("*")) - before[target], reverse=True):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.legacy``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(_main, argv, "emcjax.legacy")


def _main(argv: list[str]) -> None:
    tyro.extras.subcommand_cli_from_dict({"import": _cli_import, "export": _cli_export}, args=argv,
                                         prog="python -m emcjax.legacy")


if __name__ == "__main__":
    main()
