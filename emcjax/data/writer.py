"""Writer of a whole sparse data set: :func:`write_dataset` (checked, atomic: temporary file + rename)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from emcjax.atomic_files import new_temporary
from emcjax.data.frames import SparseFrames, rotation_count
from emcjax.data.layout import FORMAT_NAME, FORMAT_VERSION, write_attrs, write_truth
from emcjax.errors import DataError


def write_dataset(path: str | os.PathLike, frames: SparseFrames, geometry: Mapping[str, Any],
                  crystal: Mapping[str, Any], mask: np.ndarray | None = None,
                  truth: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                  candidate_sampling_n: int | None = None, compression: str | None = None) -> None:
    """Write a sparse data set (layout in docs/FORMATS.md) to ``path``.

    ``geometry`` and ``crystal`` are plain dicts (``dataclasses.asdict(...)``); geometry must contain
    ``num_rows`` and ``num_cols``, crystal ``cell`` (6 numbers) and ``space_group``. ``mask`` is an
    optional (num_rows, num_cols) bool array (True = masked). ``truth`` is an optional dict: arrays
    (ndim >= 1) become datasets, scalars/strings/tuples attributes, nested dicts sub-groups.
    ``candidate_sampling_n`` (600-cell parameter) is required when ``frames`` has candidates.

    Refuses to overwrite an existing file unless ``overwrite``. The file is written to a temporary file
    in the same directory and renamed into place at the end, so a failure never leaves a half-written
    file and never destroys an existing one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path}: file exists; add --overwrite (overwrite=True from Python) to replace it")
    if not path.parent.is_dir():
        raise DataError(f"{path}: directory {path.parent} does not exist")

    geometry = dict(geometry)
    crystal = dict(crystal)
    for key in ("num_rows", "num_cols"):
        if key not in geometry:
            raise DataError(f"{path}: geometry field {key!r} is missing; expected the DetectorGeometry fields")
    num_rows, num_cols = int(geometry["num_rows"]), int(geometry["num_cols"])
    if "cell" not in crystal or np.shape(crystal["cell"]) != (6,):
        raise DataError(f"{path}: crystal field 'cell' is {crystal.get('cell')!r}; expected 6 numbers "
                        "(a, b, c in Å, alpha, beta, gamma in degrees)")
    if not isinstance(crystal.get("space_group"), str):
        raise DataError(f"{path}: crystal field 'space_group' is {crystal.get('space_group')!r}; "
                        "expected a string")
    crystal["cell"] = np.asarray(crystal["cell"], dtype=np.float64)

    n_shells = geometry.get("n_shells")
    num_rotations = None
    if frames.candidate_offsets is not None:
        if candidate_sampling_n is None:
            raise DataError(f"{path}: frames have candidate rotations but candidate_sampling_n is None; "
                            "expected the 600-cell parameter n of the sampling they index")
        num_rotations = rotation_count(candidate_sampling_n)
    frames.validate(num_pixels=num_rows * num_cols, num_rotations=num_rotations,
                    n_shells=int(n_shells) if n_shells is not None else None)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (num_rows, num_cols):
            raise DataError(f"{path}: mask shape {mask.shape} received, expected ({num_rows}, {num_cols})")
        if mask.dtype.kind not in "biu":
            raise DataError(f"{path}: mask dtype {mask.dtype} received, expected bool")
        mask = mask.astype(bool)

    def dset(group: h5py.Group, name: str, data: np.ndarray) -> None:
        kw = {}
        if compression is not None and data.size > 0:
            kw = dict(compression=compression, chunks=True)
        group.create_dataset(name, data=data, **kw)

    tmp_name = new_temporary(path)
    try:
        with h5py.File(tmp_name, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = np.int64(FORMAT_VERSION)
            g = f.create_group("geometry")
            write_attrs(g, f"{path}: /geometry", geometry)
            if mask is not None:
                g.create_dataset("mask", data=mask)
            c = f.create_group("crystal")
            write_attrs(c, f"{path}: /crystal", crystal)
            fr = f.create_group("frames")
            dset(fr, "frame_id", frames.frame_id.astype(np.int64))
            dset(fr, "photon_offsets", frames.photon_offsets.astype(np.int64))
            dset(fr, "photon_pixels", frames.photon_pixels.astype(np.int64))
            dset(fr, "photon_counts", frames.photon_counts.astype(np.int32))
            dset(fr, "dead_offsets", frames.dead_offsets.astype(np.int64))
            dset(fr, "dead_pixels", frames.dead_pixels.astype(np.int64))
            dset(fr, "background", frames.background.astype(np.float32))
            if frames.candidate_offsets is not None:
                fr.attrs["candidate_sampling_n"] = np.int64(candidate_sampling_n)
                dset(fr, "candidate_offsets", frames.candidate_offsets.astype(np.int64))
                dset(fr, "candidate_rotations", frames.candidate_rotations.astype(np.int64))
            if truth is not None:
                write_truth(f.create_group("truth"), truth, f"{path}: /truth")
        if path.exists() and not overwrite:  # appeared while writing
            raise DataError(f"{path}: file exists; add --overwrite (overwrite=True from Python) to replace it")
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
