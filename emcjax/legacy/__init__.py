"""Interoperability with EMC-for-SMX working directories (METHOD.md §13): ``python -m emcjax.legacy``.

* ``import DIR --out FILE.h5`` reads a reference working directory (``DIR/config.ini`` and the files it
  names) and writes an emcjax data set ``FILE.h5``, a run configuration ``FILE.toml`` (the
  reference-compatible EMC settings, usable with ``python -m emcjax.lowres --config FILE.toml``) and an
  initial-state run directory ``FILE-init/`` (``intensities.h5`` with the imported phi and model; the
  ``init_from`` of that TOML).
* ``export --run RUN --to DIR`` writes an emcjax run (its ``intensities.h5`` and the data set named in its
  ``config.toml``) as a reference working directory: config.ini, make-detector/rec-vectors.bin and
  pix-map.dat, aux/basis-vec.dat, aux/sym-op.dat, the quaternion file, the reduced data files, start-phi.dat,
  total-phi.dat, finish_intensity.bin and hkl-val.dat.

Conventions kept exactly: frame order (the reduced, load-balanced order of the reference), frame ids,
rotation indices (row r of ``c-quaternion<n>.bin`` is ``sample_600cell(n)`` rotation r; checked on import),
the transposed quaternion convention (``crystal_from_lab``), per-frame dead pixels (-1 in the data file)
and masked background shells (-1). Geometry: emcjax uses exact limits in 1/Å, the reference whole pixel
units; import picks ``resolution_max_A = λD/q_max_px`` and the beam-stop radius whose limit is
``q_min_px/(λD)``, so that ``make_detector`` keeps exactly the pixels of ``rec-vectors.bin`` (checked, with
their q, polarization and radial shells). The voxel grids differ (docs/ARCHITECTURE.md): models are moved
between them by evaluating one program's trilinear model W(q) at the other program's voxel positions; this
is exact (to rounding) when the reference's Cartesian grid coincides with emcjax's lattice-aligned grid
(orthogonal cells with ``VN |a_i*| / min|a*|`` integer), an interpolation otherwise (docs/LEGACY.md).

Modules: ``files`` (readers/writers), ``geometry`` (detector and crystal checks), ``grid`` (the reference's voxel
grid, model resampling), ``directory`` (``read_legacy``), ``convert`` (``import_directory``, ``export_run``),
``__main__`` (the CLI); ``refmodel`` and ``refupdate``: the reference program's own E-step and intensity update
on its grid, rule for rule (reproduces its finish_intensity.bin; docs/LEGACY.md).
"""

from emcjax.legacy.convert import emc_grid, export_run, import_directory, reference_compatible_config
from emcjax.legacy.directory import LegacyDirectory, read_legacy
from emcjax.legacy.files import read_config_ini
from emcjax.legacy.grid import (ReferenceGrid, interpolated_model, model_to_reference, reference_grid,
                                reference_to_model)

__all__ = [
    "read_config_ini",
    "LegacyDirectory",
    "read_legacy",
    "ReferenceGrid",
    "reference_grid",
    "model_to_reference",
    "reference_to_model",
    "interpolated_model",
    "import_directory",
    "export_run",
    "reference_compatible_config",
    "emc_grid",
]
