"""The sparse data set: one HDF5 file of photon lists (docs/FORMATS.md).

* :class:`SparseFrames` -- a block of frames in memory, CSR form (numpy).
* :func:`write_dataset` -- writes a whole data set atomically (temporary file + rename).
* :class:`SparseDataset` -- reader; validates the layout at open, reads frames in blocks.
* :func:`pad_frames` / :func:`bucket_length` -- static-shape padded arrays for the JAX kernels.

This module is pure I/O + numpy: the detector geometry and the crystal are passed and returned as plain
dicts of attributes (``dataclasses.asdict(geometry)``), so it does not depend on ``emcjax.detector`` or
``emcjax.crystal``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from emcjax.errors import DataError

FORMAT_NAME = "emcjax-sparse"
FORMAT_VERSION = 1

_INT_KINDS = "iu"
_FLOAT_KINDS = "f"


# --------------------------------------------------------------------------------------------------
# SparseFrames
# --------------------------------------------------------------------------------------------------


def _as_int(a: Any, dtype: type) -> Any:
    """Cast integer-kind arrays to ``dtype``; leave anything else as an array for validate() to reject."""
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.dtype.kind in _INT_KINDS:
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            return arr  # out of range for dtype: validate() reports it
        return arr.astype(dtype, copy=False)
    if arr.size == 0 and arr.dtype.kind == "f":  # np.asarray([]) is float64
        return arr.astype(dtype)
    return arr


def rotation_count(sampling_n: int) -> int:
    """Number of rotations of the 600-cell sampling with parameter n: 10 (5 n^3 + n) (METHOD.md 9.1)."""
    n = int(sampling_n)
    return 10 * (5 * n**3 + n)


@dataclasses.dataclass(frozen=True)
class SparseFrames:
    """A block of frames in memory, in CSR form.

    Frame ``i`` owns ``photon_pixels[photon_offsets[i]:photon_offsets[i+1]]`` (raw pixel ids
    ``row * num_cols + col``, strictly ascending) and the matching ``photon_counts`` (>= 1); likewise
    ``dead_pixels`` (raw ids invalid in that frame only, strictly ascending) and the optional candidate
    rotation indices. ``background[i, s]`` is the expected background photons per pixel per unit
    polarization factor in radial shell ``s``; ``-1`` marks a shell excluded in that frame.

    Integer inputs are cast to the documented dtypes (int64, counts int32) and float backgrounds to
    float32 on construction; call :meth:`validate` to check consistency.
    """

    frame_id: np.ndarray
    photon_offsets: np.ndarray
    photon_pixels: np.ndarray
    photon_counts: np.ndarray
    dead_offsets: np.ndarray
    dead_pixels: np.ndarray
    background: np.ndarray
    candidate_offsets: np.ndarray | None = None
    candidate_rotations: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("frame_id", "photon_offsets", "photon_pixels", "dead_offsets", "dead_pixels",
                     "candidate_offsets", "candidate_rotations"):
            object.__setattr__(self, name, _as_int(getattr(self, name), np.int64))
        object.__setattr__(self, "photon_counts", _as_int(self.photon_counts, np.int32))
        bg = np.asarray(self.background)
        if bg.dtype.kind in _FLOAT_KINDS + _INT_KINDS:
            bg = bg.astype(np.float32, copy=False)
        object.__setattr__(self, "background", bg)

    # -- basic properties --------------------------------------------------------------------------

    @property
    def n_frames(self) -> int:
        return int(np.shape(self.frame_id)[0]) if np.ndim(self.frame_id) else 0

    @property
    def n_shells(self) -> int:
        return int(self.background.shape[1]) if self.background.ndim == 2 else 0

    @property
    def has_candidates(self) -> bool:
        return self.candidate_offsets is not None

    def photons_per_frame(self) -> np.ndarray:
        """(n_frames,) int64: total photon count of each frame (sum of counts)."""
        csum = np.concatenate([[0], np.cumsum(self.photon_counts, dtype=np.int64)])
        return (csum[self.photon_offsets[1:]] - csum[self.photon_offsets[:-1]]).astype(np.int64)

    def frame_slice(self, start: int, stop: int) -> "SparseFrames":
        """Frames [start, stop) as a new SparseFrames with offsets rebased to 0."""
        def part(off, vals):
            a, b = int(off[start]), int(off[stop])
            return off[start:stop + 1] - a, vals[a:b]

        po, pp = part(self.photon_offsets, self.photon_pixels)
        _, pc = part(self.photon_offsets, self.photon_counts)
        do, dp = part(self.dead_offsets, self.dead_pixels)
        co = cr = None
        if self.candidate_offsets is not None:
            co, cr = part(self.candidate_offsets, self.candidate_rotations)
        return SparseFrames(self.frame_id[start:stop], po, pp, pc, do, dp, self.background[start:stop], co, cr)

    # -- validation --------------------------------------------------------------------------------

    def validate(self, num_pixels: int | None = None, num_rotations: int | None = None,
                 n_shells: int | None = None) -> None:
        """Raise :class:`DataError` naming the field if the block is inconsistent.

        Checks dtypes and shapes, CSR offsets (start at 0, non-decreasing, end at the list length),
        photon counts >= 1, pixel ids in ``[0, num_pixels)`` and strictly ascending within a frame,
        dead pixel ids likewise, a finite background that is >= 0 or exactly -1, candidate rotations in
        ``[0, num_rotations)``, and ``n_shells`` columns of background when those are given.
        """
        def fail(field: str, msg: str) -> None:
            raise DataError(f"SparseFrames.{field}: {msg}")

        def check_dtype(field: str, arr: Any, kinds: str, ndim: int) -> np.ndarray:
            if not isinstance(arr, np.ndarray):
                fail(field, f"expected a numpy array, got {type(arr).__name__}")
            if arr.dtype.kind not in kinds:
                fail(field, f"dtype {arr.dtype} received, expected "
                            f"{'an integer' if kinds == _INT_KINDS else 'a float'} type")
            if arr.ndim != ndim:
                fail(field, f"shape {arr.shape} received, expected {ndim} dimension(s)")
            return arr

        fid = check_dtype("frame_id", self.frame_id, _INT_KINDS, 1)
        n = fid.shape[0]

        def check_csr(off_name: str, val_names: Sequence[str]) -> np.ndarray:
            off = check_dtype(off_name, getattr(self, off_name), _INT_KINDS, 1)
            if off.shape != (n + 1,):
                fail(off_name, f"shape {off.shape} received, expected ({n + 1},) (n_frames + 1)")
            if off[0] != 0:
                fail(off_name, f"first offset is {int(off[0])}, expected 0")
            d = np.diff(off)
            if np.any(d < 0):
                i = int(np.argmax(d < 0))
                fail(off_name, f"offsets decrease at frame {i} ({int(off[i])} -> {int(off[i + 1])}); "
                               "expected non-decreasing")
            for vn in val_names:
                kinds = _INT_KINDS
                vals = check_dtype(vn, getattr(self, vn), kinds, 1)
                if vals.shape[0] != off[-1]:
                    fail(vn, f"length {vals.shape[0]} received, expected {int(off[-1])} "
                             f"(= {off_name}[-1])")
            return off

        def check_ascending(field: str, vals: np.ndarray, off: np.ndarray) -> None:
            if vals.shape[0] < 2:
                return
            step = np.diff(vals)
            # positions where a new frame starts are exempt
            same_frame = np.ones(vals.shape[0] - 1, dtype=bool)
            starts = off[1:-1]
            starts = starts[(starts > 0) & (starts < vals.shape[0])]
            same_frame[starts - 1] = False
            bad = same_frame & (step <= 0)
            if np.any(bad):
                j = int(np.argmax(bad))
                frame = int(np.searchsorted(off, j, side="right") - 1)
                fail(field, f"ids not strictly ascending within frame {frame} "
                            f"({int(vals[j])} then {int(vals[j + 1])})")

        def check_range(field: str, vals: np.ndarray, upper: int | None, what: str) -> None:
            if vals.size == 0:
                return
            lo, hi = int(vals.min()), int(vals.max())
            if lo < 0:
                fail(field, f"negative {what} {lo}, expected >= 0")
            if upper is not None and hi >= upper:
                fail(field, f"{what} {hi} out of range, expected < {upper}")

        po = check_csr("photon_offsets", ("photon_pixels", "photon_counts"))
        if self.photon_counts.size and self.photon_counts.min() < 1:
            fail("photon_counts", f"count {int(self.photon_counts.min())} received, expected >= 1 "
                                  "(pixels without photons are not listed)")
        check_range("photon_pixels", self.photon_pixels, num_pixels, "pixel id")
        check_ascending("photon_pixels", self.photon_pixels, po)

        do = check_csr("dead_offsets", ("dead_pixels",))
        check_range("dead_pixels", self.dead_pixels, num_pixels, "pixel id")
        check_ascending("dead_pixels", self.dead_pixels, do)

        bg = check_dtype("background", self.background, _FLOAT_KINDS, 2)
        if bg.shape[0] != n:
            fail("background", f"shape {bg.shape} received, expected ({n}, n_shells)")
        if n_shells is not None and bg.shape[1] != n_shells:
            fail("background", f"shape {bg.shape} received, expected ({n}, {n_shells}) (n_shells)")
        if not np.all(np.isfinite(bg)):
            fail("background", "contains NaN or inf")
        if np.any((bg < 0) & (bg != -1)):
            fail("background", f"value {float(bg[(bg < 0) & (bg != -1)][0])} received, expected >= 0 "
                               "or exactly -1 (excluded shell)")

        if (self.candidate_offsets is None) != (self.candidate_rotations is None):
            fail("candidate_offsets", "candidate_offsets and candidate_rotations must both be given or "
                                      "both be None")
        if self.candidate_offsets is not None:
            check_csr("candidate_offsets", ("candidate_rotations",))
            check_range("candidate_rotations", self.candidate_rotations, num_rotations, "rotation index")

    # -- combination -------------------------------------------------------------------------------

    @staticmethod
    def concatenate(blocks: Iterable["SparseFrames"]) -> "SparseFrames":
        """Concatenate blocks of frames (in order) into one block."""
        blocks = list(blocks)
        if not blocks:
            raise DataError("SparseFrames.concatenate: no blocks received, expected at least one")
        has_c = {b.candidate_offsets is not None for b in blocks}
        if len(has_c) > 1:
            raise DataError("SparseFrames.concatenate: some blocks have candidate rotations and others do "
                            "not; expected all or none")
        shells = {b.background.shape[1] for b in blocks}
        if len(shells) > 1:
            raise DataError(f"SparseFrames.concatenate: blocks have different n_shells {sorted(shells)}")

        def cat_offsets(name: str) -> np.ndarray:
            parts = [np.zeros(1, np.int64)]
            base = 0
            for b in blocks:
                off = getattr(b, name)
                parts.append(off[1:] - off[0] + base)
                base += int(off[-1] - off[0])
            return np.concatenate(parts).astype(np.int64)

        def cat(name: str, dtype: type) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in blocks]).astype(dtype, copy=False)

        co = cr = None
        if blocks[0].candidate_offsets is not None:
            co = cat_offsets("candidate_offsets")
            cr = cat("candidate_rotations", np.int64)
        return SparseFrames(
            frame_id=cat("frame_id", np.int64),
            photon_offsets=cat_offsets("photon_offsets"),
            photon_pixels=cat("photon_pixels", np.int64),
            photon_counts=cat("photon_counts", np.int32),
            dead_offsets=cat_offsets("dead_offsets"),
            dead_pixels=cat("dead_pixels", np.int64),
            background=np.concatenate([b.background for b in blocks], axis=0).astype(np.float32, copy=False),
            candidate_offsets=co,
            candidate_rotations=cr,
        )


# --------------------------------------------------------------------------------------------------
# attribute conversion
# --------------------------------------------------------------------------------------------------


def _attr_to_h5(where: str, key: str, value: Any) -> Any:
    """Python value -> something h5py stores as an attribute. Tuples/lists become arrays, None Empty."""
    if value is None:
        return h5py.Empty("f8")
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, (tuple, list, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "US":
            return arr.astype(h5py.string_dtype())
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: attribute {key!r} has unsupported value {value!r}; expected numbers, "
                            "strings or tuples/arrays of numbers")
        return arr
    raise DataError(f"{where}: attribute {key!r} has unsupported type {type(value).__name__}; expected "
                    "a number, string, None or tuple/array of numbers")


def _attr_from_h5(value: Any) -> Any:
    """Inverse of :func:`_attr_to_h5`: numpy scalars -> Python scalars, 1-D arrays -> tuples."""
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _attr_from_h5(value[()])
        if value.ndim == 1:
            return tuple(_attr_from_h5(v) for v in value)
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_attrs(obj: h5py.HLObject, where: str, attrs: Mapping[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[str(k)] = _attr_to_h5(where, k, v)


def _read_attrs(obj: h5py.HLObject) -> dict:
    return {k: _attr_from_h5(obj.attrs[k]) for k in obj.attrs.keys()}


def _write_truth(group: h5py.Group, truth: Mapping[str, Any], where: str) -> None:
    for k, v in truth.items():
        name = str(k)
        if isinstance(v, Mapping):
            _write_truth(group.create_group(name), v, f"{where}/{name}")
        elif isinstance(v, np.ndarray) and v.ndim >= 1:
            if v.dtype.kind not in "biufc":
                raise DataError(f"{where}: truth entry {name!r} has unsupported dtype {v.dtype}")
            group.create_dataset(name, data=v)
        else:
            group.attrs[name] = _attr_to_h5(where, name, v)


def _read_truth(group: h5py.Group) -> dict:
    out: dict = _read_attrs(group)
    for k, obj in group.items():
        out[k] = _read_truth(obj) if isinstance(obj, h5py.Group) else obj[()]
    return out


# --------------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------------


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
        raise DataError(f"{path}: file exists; pass overwrite=True to replace it")
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

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = np.int64(FORMAT_VERSION)
            g = f.create_group("geometry")
            _write_attrs(g, f"{path}: /geometry", geometry)
            if mask is not None:
                g.create_dataset("mask", data=mask)
            c = f.create_group("crystal")
            _write_attrs(c, f"{path}: /crystal", crystal)
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
                _write_truth(f.create_group("truth"), truth, f"{path}: /truth")
        if path.exists() and not overwrite:  # appeared while writing
            raise DataError(f"{path}: file exists; pass overwrite=True to replace it")
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------------

# dataset path -> (dtype kinds accepted, documented dtype)
_FRAME_DATASETS = {
    "frame_id": _INT_KINDS,
    "photon_offsets": _INT_KINDS,
    "photon_pixels": _INT_KINDS,
    "photon_counts": _INT_KINDS,
    "dead_offsets": _INT_KINDS,
    "dead_pixels": _INT_KINDS,
    "background": _FLOAT_KINDS,
}


class SparseDataset:
    """Reader of a sparse data set file.

    Opening checks the layout (format/version attributes, presence, dtype kind and shape of every
    dataset, CSR offsets) and reads only the per-frame offsets; photon data is read block by block with
    :meth:`read_block`. Every problem raises :class:`DataError` naming the file and the dataset.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise DataError(f"{self.path}: not a regular file")
        try:
            self._file = h5py.File(self.path, "r")
        except Exception as e:  # OSError for non-HDF5 / truncated / corrupt files
            raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from e
        try:
            self._open_checks()
        except DataError:
            self.close()
            raise
        except Exception as e:  # corrupt internals surface as OSError/KeyError/... from h5py
            self.close()
            raise DataError(f"{self.path}: corrupt or unreadable file ({type(e).__name__}: {e})") from e

    # -- open-time validation ----------------------------------------------------------------------

    def _err(self, msg: str) -> DataError:
        return DataError(f"{self.path}: {msg}")

    def _dataset(self, name: str, kinds: str, shape: tuple | None = None, ndim: int | None = None,
                 optional: bool = False) -> h5py.Dataset | None:
        f = self._file
        if name not in f:
            if optional:
                return None
            raise self._err(f"dataset {name} is missing")
        d = f[name]
        if not isinstance(d, h5py.Dataset):
            raise self._err(f"{name} is a {type(d).__name__}, expected a dataset")
        if d.dtype.kind not in kinds:
            expected = {"iu": "an integer type", "f": "a float type", "biu": "bool"}.get(kinds, kinds)
            raise self._err(f"dataset {name} has dtype {d.dtype}, expected {expected}")
        if ndim is not None and d.ndim != ndim:
            raise self._err(f"dataset {name} has shape {d.shape}, expected {ndim} dimension(s)")
        if shape is not None and d.shape != shape:
            raise self._err(f"dataset {name} has shape {d.shape}, expected {shape}")
        return d

    def _offsets(self, name: str, n: int, values: Sequence[str]) -> np.ndarray:
        d = self._dataset(name, _INT_KINDS, shape=(n + 1,))
        off = d[()].astype(np.int64)
        if off[0] != 0:
            raise self._err(f"dataset {name}: first offset is {int(off[0])}, expected 0")
        if np.any(np.diff(off) < 0):
            i = int(np.argmax(np.diff(off) < 0))
            raise self._err(f"dataset {name}: offsets decrease at frame {i}, expected non-decreasing")
        for v in values:
            dv = self._dataset(v, _FRAME_DATASETS.get(v.rsplit("/", 1)[-1], _INT_KINDS), ndim=1)
            if dv.shape[0] != off[-1]:
                raise self._err(f"dataset {v} has shape {dv.shape}, expected ({int(off[-1])},) "
                                f"(= {name}[-1])")
        return off

    def _open_checks(self) -> None:
        f = self._file
        fmt = _attr_from_h5(f.attrs.get("format"))
        if fmt != FORMAT_NAME:
            raise self._err(f"attribute /format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = _attr_from_h5(f.attrs.get("version"))
        if version != FORMAT_VERSION:
            raise self._err(f"attribute /version is {version!r}, expected {FORMAT_VERSION}")
        for grp in ("geometry", "crystal", "frames"):
            if grp not in f or not isinstance(f[grp], h5py.Group):
                raise self._err(f"group /{grp} is missing")

        self._geometry = _read_attrs(f["geometry"])
        for key in ("num_rows", "num_cols"):
            if not isinstance(self._geometry.get(key), int):
                raise self._err(f"attribute /geometry.{key} is {self._geometry.get(key)!r}, "
                                "expected an integer")
        self.num_pixels = self._geometry["num_rows"] * self._geometry["num_cols"]
        self._mask_ds = self._dataset("/geometry/mask", "biu",
                                      shape=(self._geometry["num_rows"], self._geometry["num_cols"]),
                                      optional=True)
        self._mask: np.ndarray | None = None

        crystal = _read_attrs(f["crystal"])
        cell = crystal.get("cell")
        if not (isinstance(cell, tuple) and len(cell) == 6):
            raise self._err(f"attribute /crystal.cell is {cell!r}, expected 6 numbers")
        if not isinstance(crystal.get("space_group"), str):
            raise self._err(f"attribute /crystal.space_group is {crystal.get('space_group')!r}, "
                            "expected a string")
        self._crystal = crystal

        fid = self._dataset("/frames/frame_id", _INT_KINDS, ndim=1)
        n = fid.shape[0]
        self.n_frames = int(n)
        bg = self._dataset("/frames/background", _FLOAT_KINDS, ndim=2)
        if bg.shape[0] != n:
            raise self._err(f"dataset /frames/background has shape {bg.shape}, expected ({n}, n_shells)")
        self.n_shells = int(bg.shape[1])
        geo_shells = self._geometry.get("n_shells")
        if geo_shells is not None and geo_shells != self.n_shells:
            raise self._err(f"dataset /frames/background has shape {bg.shape}, expected ({n}, {geo_shells}) "
                            "(/geometry.n_shells)")
        self._photon_offsets = self._offsets("/frames/photon_offsets", n,
                                             ("/frames/photon_pixels", "/frames/photon_counts"))
        self._dead_offsets = self._offsets("/frames/dead_offsets", n, ("/frames/dead_pixels",))

        has_co = "/frames/candidate_offsets" in f
        has_cr = "/frames/candidate_rotations" in f
        if has_co != has_cr:
            missing = "candidate_rotations" if has_co else "candidate_offsets"
            raise self._err(f"dataset /frames/{missing} is missing (the candidate datasets come in a pair)")
        self._candidate_offsets = None
        self.candidate_sampling_n: int | None = None
        if has_co:
            self._candidate_offsets = self._offsets("/frames/candidate_offsets", n,
                                                    ("/frames/candidate_rotations",))
            sn = _attr_from_h5(f["frames"].attrs.get("candidate_sampling_n"))
            if not isinstance(sn, int) or sn < 1:
                raise self._err(f"attribute /frames.candidate_sampling_n is {sn!r}, expected a positive "
                                "integer (600-cell parameter)")
            self.candidate_sampling_n = sn

    # -- metadata ----------------------------------------------------------------------------------

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise DataError(f"{self.path}: data set is closed")
        return self._file

    @property
    def geometry(self) -> dict:
        """Detector geometry attributes (tuples for vector fields), e.g. ``DetectorGeometry(**ds.geometry)``."""
        return dict(self._geometry)

    @property
    def crystal(self) -> dict:
        """Crystal attributes: cell (6-tuple), space_group (str), optionally vn, gw."""
        return dict(self._crystal)

    @property
    def mask(self) -> np.ndarray | None:
        """(num_rows, num_cols) bool, True = masked; None when the file has no mask."""
        if self._mask_ds is None:
            return None
        if self._mask is None:
            self._require_open()
            self._mask = self._mask_ds[()].astype(bool)
        return self._mask.copy()

    @property
    def has_candidates(self) -> bool:
        return self._candidate_offsets is not None

    @property
    def photon_offsets(self) -> np.ndarray:
        """(n_frames + 1,) int64 CSR offsets of the whole file (e.g. for load balancing)."""
        return self._photon_offsets.copy()

    @property
    def has_truth(self) -> bool:
        f = self._require_open()
        return "truth" in f and isinstance(f["truth"], h5py.Group)

    def read_truth(self) -> dict:
        """The /truth group as a dict (datasets -> arrays, attributes -> Python values, groups -> dicts)."""
        f = self._require_open()
        if not self.has_truth:
            raise self._err("group /truth is missing (the file has no ground truth)")
        try:
            return _read_truth(f["truth"])
        except Exception as e:
            raise self._err(f"cannot read /truth ({type(e).__name__}: {e})") from e

    # -- data --------------------------------------------------------------------------------------

    def read_block(self, start: int, stop: int) -> SparseFrames:
        """Frames [start, stop), reading only the needed slices of the CSR datasets; offsets rebased to 0."""
        f = self._require_open()
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_frames:
            raise self._err(f"read_block({start}, {stop}): expected 0 <= start <= stop <= {self.n_frames}")
        fr = f["frames"]

        def part(off: np.ndarray, names: Sequence[str]) -> tuple:
            a, b = int(off[start]), int(off[stop])
            return (off[start:stop + 1] - a,) + tuple(fr[nm][a:b] for nm in names)

        try:
            po, pp, pc = part(self._photon_offsets, ("photon_pixels", "photon_counts"))
            do, dp = part(self._dead_offsets, ("dead_pixels",))
            co = cr = None
            if self._candidate_offsets is not None:
                co, cr = part(self._candidate_offsets, ("candidate_rotations",))
            block = SparseFrames(
                frame_id=fr["frame_id"][start:stop], photon_offsets=po, photon_pixels=pp,
                photon_counts=pc, dead_offsets=do, dead_pixels=dp,
                background=fr["background"][start:stop], candidate_offsets=co, candidate_rotations=cr)
        except Exception as e:
            raise self._err(f"cannot read frames [{start}, {stop}) ({type(e).__name__}: {e})") from e
        num_rot = rotation_count(self.candidate_sampling_n) if self.candidate_sampling_n else None
        try:
            block.validate(num_pixels=self.num_pixels, num_rotations=num_rot)
        except DataError as e:
            raise self._err(f"frames [{start}, {stop}): {e}") from e
        return block

    def read_background(self) -> np.ndarray:
        """(n_frames, n_shells) float32 background of every frame (only that dataset is read)."""
        f = self._require_open()
        try:
            background = np.asarray(f["frames"]["background"][...], np.float32)
        except Exception as e:
            raise self._err(f"cannot read dataset /frames/background ({type(e).__name__}: {e})") from e
        if not np.all(np.isfinite(background)) or np.any((background < 0) & (background != -1)):
            raise self._err("dataset /frames/background holds NaN, inf or negative values other than -1")
        return background

    def read_candidates(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(candidate_offsets (n_frames+1,), candidate_rotations) of every frame, or None without candidates."""
        if self._candidate_offsets is None:
            return None
        f = self._require_open()
        try:
            rotations = np.asarray(f["frames"]["candidate_rotations"][...], np.int64)
        except Exception as e:
            raise self._err(f"cannot read dataset /frames/candidate_rotations ({type(e).__name__}: {e})") from e
        return np.asarray(self._candidate_offsets, np.int64), rotations

    def read_all(self) -> SparseFrames:
        """All frames (read_block(0, n_frames))."""
        return self.read_block(0, self.n_frames)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._file is None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> "SparseDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SparseDataset({str(self.path)!r}, n_frames={self.n_frames}, n_shells={self.n_shells})"


# --------------------------------------------------------------------------------------------------
# padding for JAX
# --------------------------------------------------------------------------------------------------


def bucket_length(n: int) -> int:
    """Static padded length for ``n`` entries: the smallest of 8, 12, 16, 24, 32, 48, 64, ... >= n.

    The candidates are the powers of two >= 8 and 1.5 x those powers (12, 24, 48, ...), so a padded
    array is at most 1.5x (beyond 8) longer than needed and few distinct shapes are compiled.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"bucket_length: n = {n} received, expected >= 0")
    p = 8
    while True:
        if n <= p:
            return p
        if n <= p + p // 2:
            return p + p // 2
        p *= 2


@dataclasses.dataclass(frozen=True)
class PaddedFrames:
    """Static-shape arrays of a block of frames for the JAX kernels (numpy; the caller does jnp.asarray).

    pixels:      (n_frames, P) int32  valid-pixel index (position in the detector's valid-pixel list) of
                 each photon entry, padded with 0
    counts:      (n_frames, P) float32 photons of each entry, padded with 0 (padding contributes nothing)
    dead:        (n_frames, Dd) int32 valid-pixel index of each dead pixel, padded with 0
    dead_weight: (n_frames, Dd) float32 1 for real dead entries, 0 for padding
    background:  (n_frames, n_shells) float32, as in SparseFrames (-1 = excluded shell)
    """

    pixels: np.ndarray
    counts: np.ndarray
    dead: np.ndarray
    dead_weight: np.ndarray
    background: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.pixels.shape[0])


def _pad_csr(offsets: np.ndarray, pixels: np.ndarray, values: np.ndarray | None, pixel_map: np.ndarray,
             length: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    n = offsets.shape[0] - 1
    mapped = pixel_map[pixels] if pixels.size else np.zeros(0, np.int32)
    keep = mapped >= 0
    frame = np.repeat(np.arange(n), np.diff(offsets))[keep]
    mapped = mapped[keep]
    vals = (np.ones(mapped.shape[0], np.float32) if values is None
            else values[keep].astype(np.float32))
    per_frame = np.bincount(frame, minlength=n) if n else np.zeros(0, np.int64)
    needed = int(per_frame.max()) if n else 0
    if length is None:
        length = bucket_length(needed)
    elif needed > length:
        raise ValueError(f"pad_frames: {what}_length = {length} received, but a frame has {needed} "
                         f"{what} entries on valid pixels; expected >= {needed}")
    new_off = np.concatenate([[0], np.cumsum(per_frame)])
    pos = np.arange(mapped.shape[0]) - new_off[frame] if n else np.zeros(0, np.int64)
    out_idx = np.zeros((n, length), np.int32)
    out_val = np.zeros((n, length), np.float32)
    out_idx[frame, pos] = mapped
    out_val[frame, pos] = vals
    return out_idx, out_val


def pad_frames(frames: SparseFrames, pixel_map: np.ndarray, *, photon_length: int | None = None,
               dead_length: int | None = None) -> PaddedFrames:
    """Map raw pixel ids to valid-pixel indices and pad to static shapes.

    ``pixel_map`` (num_rows * num_cols,) int: raw id -> index in the detector's valid-pixel list, or -1
    for pixels outside the resolution range / masked; photons and dead pixels on -1 are dropped.
    Padded lengths are ``bucket_length`` of the longest frame (after dropping), unless
    ``photon_length`` / ``dead_length`` force a fixed length (to keep shapes equal across blocks).
    """
    pixel_map = np.asarray(pixel_map)
    if pixel_map.ndim != 1 or pixel_map.dtype.kind not in _INT_KINDS:
        raise ValueError(f"pad_frames: pixel_map has shape {pixel_map.shape} dtype {pixel_map.dtype}, "
                         "expected a 1-D integer array (num_rows * num_cols,)")
    for name, vals in (("photon_pixels", frames.photon_pixels), ("dead_pixels", frames.dead_pixels)):
        if vals.size and (vals.min() < 0 or vals.max() >= pixel_map.shape[0]):
            raise DataError(f"SparseFrames.{name}: pixel id out of range [0, {pixel_map.shape[0]}) "
                            f"(pixel_map length); got min {int(vals.min())}, max {int(vals.max())}")
    pixels, counts = _pad_csr(frames.photon_offsets, frames.photon_pixels, frames.photon_counts, pixel_map,
                              photon_length, "photon")
    dead, dead_w = _pad_csr(frames.dead_offsets, frames.dead_pixels, None, pixel_map, dead_length, "dead")
    return PaddedFrames(pixels=pixels, counts=counts, dead=dead, dead_weight=dead_w,
                        background=np.ascontiguousarray(frames.background, dtype=np.float32))
