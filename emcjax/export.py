"""Merged intensities for phasing and refinement programs: ``python -m emcjax.export --run DIR --mtz OUT.mtz``.

``DIR`` holds the ``merged.h5`` of ``python -m emcjax.resolution`` (merged half-set intensities with
sigma(I)). Writes an MTZ (gemmi: cell, space group, H K L in the reciprocal asymmetric unit without
absences, IMEAN, SIGIMEAN, I_half1, I_half2) and a plain ``h k l I sigma(I)`` text file. The merging table
as CSV is ``DIR/merging_stats.csv``.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from emcjax import cli
from emcjax.crystal import Crystal
from emcjax.errors import ConfigError
from emcjax.mtz import write_hkl_text, write_mtz
from emcjax.resolution import read_merged


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export of merged intensities."""

    run: pathlib.Path
    """Directory with merged.h5 (the --out of python -m emcjax.resolution)."""
    mtz: pathlib.Path | None = None
    """Output MTZ file (default: RUN/merged.mtz)."""
    hkl: pathlib.Path | None = None
    """Output text file h k l I sigma(I) (default: next to the MTZ, suffix .hkl)."""
    d_min: float | None = None
    """Leave out reflections beyond this resolution (Å); e.g. the suggested limit. Default: keep all."""

    def __post_init__(self) -> None:
        if self.d_min is not None and not self.d_min > 0:
            raise ConfigError(f"d_min must be > 0 Å, got {self.d_min}")


def export(config: ExportConfig, log=print) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the MTZ and text files; returns their paths."""
    merged = read_merged(config.run)
    crystal = Crystal(cell=tuple(float(x) for x in merged["cell"]), space_group=str(merged["space_group"]))
    hkl = merged["hkl"]
    keep = np.ones(hkl.shape[0], bool)
    if config.d_min is not None:
        keep = np.linalg.norm(hkl @ crystal.reciprocal_basis.T, axis=1) <= 1 / config.d_min
    mtz_path = config.mtz if config.mtz is not None else config.run / "merged.mtz"
    hkl_path = config.hkl if config.hkl is not None else mtz_path.with_suffix(".hkl")
    write_mtz(
        mtz_path,
        crystal,
        hkl[keep],
        merged["intensity"][keep],
        merged["sigma"][keep],
        half_a=merged["half_a"][keep],
        half_b=merged["half_b"][keep],
        wavelength_A=float(merged.get("wavelength_A", 1.0)),
    )
    write_hkl_text(hkl_path, crystal, hkl[keep], merged["intensity"][keep], merged["sigma"][keep])
    log(f"wrote {mtz_path} and {hkl_path}: {int(keep.sum())} unique reflections, {crystal.gemmi_space_group.hm}, "
        f"cell {' '.join(f'{x:g}' for x in crystal.cell)}")
    return mtz_path, hkl_path


def run(config: ExportConfig, log=print):
    """The stage as a function (for emcjax.pipeline and scripts): the same as :func:`export`."""
    return export(config, log=log)


main = cli.stage_main(ExportConfig, export, "emcjax.export", __doc__)


if __name__ == "__main__":
    main()
