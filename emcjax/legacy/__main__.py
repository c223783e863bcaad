"""``python -m emcjax.legacy import|export`` (docs/LEGACY.md)."""

from __future__ import annotations

import pathlib
import sys

import tyro

from emcjax.errors import EmcjaxError
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
      overwrite: replace an existing OUT.
    """
    summary = import_directory(directory, out, space_group=space_group, overwrite=overwrite)
    print(f"wrote {out}, {pathlib.Path(out).with_suffix('.toml')}, {pathlib.Path(out).with_name(pathlib.Path(out).stem + '-init')}/: "
          + ", ".join(f"{k} = {v}" for k, v in summary.items()))


def _cli_export(run: pathlib.Path, to: pathlib.Path, data: pathlib.Path | None = None, model_only: bool = False) -> None:
    """Export an emcjax run directory as a reference working directory.

    Args:
      run: emcjax run directory (intensities.h5, config.toml).
      to: reference working directory to write.
      data: data set of the run (default: the run config's 'data').
      model_only: write only the model/phi files (and the geometry/crystal files they need).
    """
    summary = export_run(run, to, data=data, model_only=model_only)
    print(f"wrote {to}: " + ", ".join(f"{k} = {v}" for k, v in summary.items()))


def main(argv: list[str] | None = None) -> None:
    try:
        tyro.extras.subcommand_cli_from_dict({"import": _cli_import, "export": _cli_export}, args=argv,
                                             prog="python -m emcjax.legacy")
    except EmcjaxError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
