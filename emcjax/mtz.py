"""Merged intensities as an MTZ file (gemmi) and as plain text.

The MTZ holds one dataset with H K L in the reciprocal asymmetric unit (systematic absences removed),
IMEAN and SIGIMEAN (type J and Q, the columns phasing and refinement programs read, e.g. ctruncate,
phenix, refmac), and, when the two half sets are given, I_half1 and I_half2 (type J).
"""

from __future__ import annotations

import os
import pathlib

import gemmi
import numpy as np

from emcjax.crystal import Crystal, asymmetric_unit, is_absent
from emcjax.errors import DataError
from emcjax.atomic_files import atomic_path, write_text_atomic


def _asu_rows(crystal: Crystal, hkl: np.ndarray) -> np.ndarray:
    """Row order that keeps each reflection once, in gemmi's asymmetric unit, without absences."""
    asu = asymmetric_unit(crystal, hkl)
    if not np.array_equal(asu.hkl[asu.index], hkl):
        raise DataError("mtz: the reflections are not in the reciprocal asymmetric unit (expected unique hkl)")
    if np.unique(asu.index).shape[0] != hkl.shape[0]:
        raise DataError("mtz: a unique reflection appears twice")
    return np.flatnonzero(~is_absent(crystal, hkl))


def write_mtz(
    path: str | os.PathLike,
    crystal: Crystal,
    hkl,
    intensity,
    sigma,
    *,
    half_a=None,
    half_b=None,
    wavelength_A: float = 1.0,
    title: str = "emcjax merged intensities",
) -> pathlib.Path:
    """Writes merged intensities to ``path`` (atomically).

    Args:
      path: output .mtz file.
      crystal: cell and space group.
      hkl: (n, 3) unique Miller indices in the reciprocal asymmetric unit.
      intensity, sigma: (n,) IMEAN and SIGIMEAN (photons, arbitrary overall scale).
      half_a, half_b: (n,) half-set intensities (I_half1, I_half2), or None.
      wavelength_A: wavelength of the dataset (Å).
    """
    hkl = np.asarray(hkl, np.int32)
    rows = _asu_rows(crystal, hkl)
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title
    mtz.spacegroup = crystal.gemmi_space_group
    mtz.set_cell_for_all(crystal.gemmi_cell)
    mtz.add_dataset("emcjax").wavelength = float(wavelength_A)
    columns = [hkl[rows, 0], hkl[rows, 1], hkl[rows, 2], np.asarray(intensity)[rows], np.asarray(sigma)[rows]]
    mtz.add_column("IMEAN", "J")
    mtz.add_column("SIGIMEAN", "Q")
    if half_a is not None and half_b is not None:
        mtz.add_column("I_half1", "J")
        mtz.add_column("I_half2", "J")
        columns += [np.asarray(half_a)[rows], np.asarray(half_b)[rows]]
    mtz.set_data(np.stack(columns, axis=1).astype(np.float32))
    mtz.set_cell_for_all(crystal.gemmi_cell)
    mtz.update_reso()
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        mtz.write_to_file(str(tmp))
    return path


def read_mtz(path: str | os.PathLike) -> dict:
    """The columns of an MTZ as arrays, with ``cell`` (6-tuple) and ``space_group`` (Hermann-Mauguin)."""
    try:
        mtz = gemmi.read_mtz_file(str(path))
    except (RuntimeError, OSError) as err:
        raise DataError(f"{path}: not a readable MTZ file ({err})") from None
    data = np.asarray(mtz.array)
    out = {label: data[:, i] for i, label in enumerate(mtz.column_labels())}
    out["cell"] = tuple(mtz.cell.parameters)
    out["space_group"] = mtz.spacegroup.hm
    return out


def write_hkl_text(path: str | os.PathLike, crystal: Crystal, hkl, intensity, sigma) -> pathlib.Path:
    """Plain text: a comment header with cell and space group, then ``h k l I sigma(I)`` per line."""
    hkl = np.asarray(hkl, np.int32)
    rows = _asu_rows(crystal, hkl)
    lines = [
        f"# emcjax merged intensities; cell {' '.join(f'{x:g}' for x in crystal.cell)}; "
        f"space group {crystal.gemmi_space_group.hm}",
        "#    h    k    l            I       sigma(I)",
    ]
    for (h, k, l), i, s in zip(hkl[rows], np.asarray(intensity)[rows], np.asarray(sigma)[rows]):
        lines.append(f"{h:5d}{k:5d}{l:5d} {i:14.6g} {s:14.6g}")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return pathlib.Path(path)
