"""Reader of a sparse data set: :class:`SparseDataset` validates the layout at open and reads frames in blocks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from emcjax.data.frames import FLOAT_KINDS, INT_KINDS, SparseFrames, rotation_count
from emcjax.data.layout import FORMAT_NAME, FORMAT_VERSION, attr_from_h5, read_attrs, read_truth
from emcjax.errors import DataError


# dataset path -> (dtype kinds accepted, documented dtype)
_FRAME_DATASETS = {
    "frame_id": INT_KINDS,
    "photon_offsets": INT_KINDS,
    "photon_pixels": INT_KINDS,
    "photon_counts": INT_KINDS,
    "dead_offsets": INT_KINDS,
    "dead_pixels": INT_KINDS,
    "background": FLOAT_KINDS,
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
        d = self._dataset(name, INT_KINDS, shape=(n + 1,))
        off = d[()].astype(np.int64)
        if off[0] != 0:
            raise self._err(f"dataset {name}: first offset is {int(off[0])}, expected 0")
        if np.any(np.diff(off) < 0):
            i = int(np.argmax(np.diff(off) < 0))
            raise self._err(f"dataset {name}: offsets decrease at frame {i}, expected non-decreasing")
        for v in values:
            dv = self._dataset(v, _FRAME_DATASETS.get(v.rsplit("/", 1)[-1], INT_KINDS), ndim=1)
            if dv.shape[0] != off[-1]:
                raise self._err(f"dataset {v} has shape {dv.shape}, expected ({int(off[-1])},) "
                                f"(= {name}[-1])")
        return off

    def _open_checks(self) -> None:
        f = self._file
        fmt = attr_from_h5(f.attrs.get("format"))
        if fmt != FORMAT_NAME:
            raise self._err(f"attribute /format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = attr_from_h5(f.attrs.get("version"))
        if version != FORMAT_VERSION:
            raise self._err(f"attribute /version is {version!r}, expected {FORMAT_VERSION}")
        for grp in ("geometry", "crystal", "frames"):
            if grp not in f or not isinstance(f[grp], h5py.Group):
                raise self._err(f"group /{grp} is missing")

        self._geometry = read_attrs(f["geometry"])
        for key in ("num_rows", "num_cols"):
            if not isinstance(self._geometry.get(key), int):
                raise self._err(f"attribute /geometry.{key} is {self._geometry.get(key)!r}, "
                                "expected an integer")
        self.num_pixels = self._geometry["num_rows"] * self._geometry["num_cols"]
        self._mask_ds = self._dataset("/geometry/mask", "biu",
                                      shape=(self._geometry["num_rows"], self._geometry["num_cols"]),
                                      optional=True)
        self._mask: np.ndarray | None = None

        crystal = read_attrs(f["crystal"])
        cell = crystal.get("cell")
        if not (isinstance(cell, tuple) and len(cell) == 6):
            raise self._err(f"attribute /crystal.cell is {cell!r}, expected 6 numbers")
        if not isinstance(crystal.get("space_group"), str):
            raise self._err(f"attribute /crystal.space_group is {crystal.get('space_group')!r}, "
                            "expected a string")
        self._crystal = crystal

        fid = self._dataset("/frames/frame_id", INT_KINDS, ndim=1)
        n = fid.shape[0]
        self.n_frames = int(n)
        bg = self._dataset("/frames/background", FLOAT_KINDS, ndim=2)
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
            sn = attr_from_h5(f["frames"].attrs.get("candidate_sampling_n"))
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
            return read_truth(f["truth"])
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
        n_rotations = rotation_count(self.candidate_sampling_n)
        if rotations.size and (rotations.min() < 0 or rotations.max() >= n_rotations):
            bad = int(rotations.min()) if rotations.min() < 0 else int(rotations.max())
            raise self._err(f"dataset /frames/candidate_rotations holds rotation index {bad}, expected 0 .. "
                            f"{n_rotations - 1} (candidate_sampling_n = {self.candidate_sampling_n})")
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

