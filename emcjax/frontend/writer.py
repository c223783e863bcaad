"""Streaming, resumable writer of the sparse data set (docs/FORMATS.md), block of frames by block.

``emcjax.data.write_dataset`` needs every frame in memory; this writer appends blocks to resizable
datasets of the same layout, so memory is bounded by one block. It writes to ``.<name>.partial`` next to
the target and records after every block (``commit``) how many frames are complete; a run that was
interrupted re-opens the partial file (``resume=True``), cuts the datasets back to the last committed
block and goes on from there. ``finish`` renames the partial file onto the target.

Besides ``/frames``, the writer stores the spots of each frame (``/spots``, docs/FORMATS.md):
``offsets`` (n_frames + 1), ``q`` (n_spots, 3) float32 centroid in 1/Å (lab frame), ``photons`` float32,
``size`` int32, and the per-frame ``initial_phi`` float32.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import h5py
import numpy as np

from emcjax import data as data_io
from emcjax.data.layout import write_attrs
from emcjax.errors import DataError

# ragged dataset -> (dtype, the CSR offsets dataset it belongs to)
_RAGGED = {
    "frames/photon_pixels": (np.int64, "frames/photon_offsets"),
    "frames/photon_counts": (np.int32, "frames/photon_offsets"),
    "frames/dead_pixels": (np.int64, "frames/dead_offsets"),
    "frames/candidate_rotations": (np.int64, "frames/candidate_offsets"),
    "spots/q": (np.float32, "spots/offsets"),
    "spots/photons": (np.float32, "spots/offsets"),
    "spots/size": (np.int32, "spots/offsets"),
}
_OFFSETS = ("frames/photon_offsets", "frames/dead_offsets", "frames/candidate_offsets", "spots/offsets")
# per-frame dataset -> dtype
_PHI_BLOCK = 65536  # frames of /spots/initial_phi normalised at once
_PER_FRAME = {"frames/frame_id": np.int64, "frames/background": np.float32, "spots/initial_phi": np.float32}
# per-frame datasets of /truth (emcjax.simulate, emcjax.frontend.simulate_images), subset to the frames written
TRUTH_PER_FRAME = ("phi", "quaternion", "rotation_index", "expected_bragg_photons", "expected_background_photons",
                   "frame_kind", "second_quaternion", "second_phi", "background_level", "ring_level")


class SparseWriter:
    """Append-only writer; see the module docstring.

    Args:
      path: target file.
      geometry, crystal, mask: as for ``emcjax.data.write_dataset``.
      n_shells: background shells per frame.
      candidate_sampling_n: 600-cell n of the candidate lists (None: no candidates).
      spots: also write ``/spots``.
      fingerprint: a string identifying the run's settings; a partial file with another is not resumed.
      resume: continue a partial file if there is one.
      overwrite: replace an existing target at ``finish``.
    """

    def __init__(self, path: str | os.PathLike, geometry: Mapping[str, Any], crystal: Mapping[str, Any],
                 mask: np.ndarray | None, n_shells: int, *, candidate_sampling_n: int | None = None,
                 spots: bool = False, fingerprint: str = "", resume: bool = False, overwrite: bool = False):
        self.path = pathlib.Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: file exists; pass --overwrite to replace it")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path}: directory {self.path.parent} does not exist")
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.overwrite = overwrite
        self._names = [n for n in _RAGGED if (candidate_sampling_n is not None or "candidate" not in n)
                       and (spots or not n.startswith("spots/"))]
        self._offsets = [n for n in _OFFSETS if (candidate_sampling_n is not None or "candidate" not in n)
                         and (spots or not n.startswith("spots/"))]
        self._per_frame = [n for n in _PER_FRAME if spots or not n.startswith("spots/")]
        if resume and self.partial.exists():
            self._file = h5py.File(self.partial, "a")
            if self._file.attrs.get("fingerprint", "") != fingerprint:
                self._file.close()
                raise DataError(f"{self.partial}: partial output of a run with other settings; remove it or run "
                                "without --resume")
            self._truncate(int(self._file.attrs["frames_committed"]))
            return
        self._file = h5py.File(self.partial, "w")
        f = self._file
        f.attrs["format"] = data_io.FORMAT_NAME
        f.attrs["version"] = np.int64(data_io.FORMAT_VERSION)
        f.attrs["fingerprint"] = fingerprint
        g = f.create_group("geometry")
        write_attrs(g, f"{self.path}: /geometry", dict(geometry))
        if mask is not None:
            g.create_dataset("mask", data=np.asarray(mask, bool))
        c = f.create_group("crystal")
        crystal = dict(crystal)
        crystal["cell"] = np.asarray(crystal["cell"], np.float64)
        write_attrs(c, f"{self.path}: /crystal", crystal)
        fr = f.create_group("frames")
        if candidate_sampling_n is not None:
            fr.attrs["candidate_sampling_n"] = np.int64(candidate_sampling_n)
        if spots:
            f.create_group("spots")
        for name in self._offsets:
            f.create_dataset(name, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
        for name in self._names:
            trailing = (3,) if name == "spots/q" else ()
            f.create_dataset(name, shape=(0, *trailing), dtype=_RAGGED[name][0], maxshape=(None, *trailing),
                             chunks=(65536 // (3 if trailing else 1), *trailing))
        for name in self._per_frame:
            trailing = (n_shells,) if name == "frames/background" else ()
            f.create_dataset(name, shape=(0, *trailing), dtype=_PER_FRAME[name], maxshape=(None, *trailing),
                             chunks=(1024, *trailing))
        f.attrs["frames_committed"] = np.int64(0)

    @property
    def frames_done(self) -> int:
        """Frames written so far (== the committed ones)."""
        return int(self._file["frames/frame_id"].shape[0])

    def last_frame_id(self) -> int | None:
        """frame_id of the last written frame, or None."""
        ds = self._file["frames/frame_id"]
        return int(ds[-1]) if ds.shape[0] else None

    def _truncate(self, n: int) -> None:
        f = self._file
        for name in self._per_frame:
            f[name].resize(n, axis=0)
        for name in self._offsets:
            f[name].resize(n + 1, axis=0)
        for name in self._names:
            f[name].resize(int(f[_RAGGED[name][1]][n]), axis=0)

    def _extend(self, name: str, values: np.ndarray) -> None:
        ds = self._file[name]
        start = ds.shape[0]
        ds.resize(start + values.shape[0], axis=0)
        if values.shape[0]:
            ds[start:] = values

    def _extend_offsets(self, name: str, offsets: np.ndarray) -> None:
        base = int(self._file[name][-1])
        self._extend(name, np.asarray(offsets[1:], np.int64) - int(offsets[0]) + base)

    def append(self, frames: data_io.SparseFrames, spots: Mapping[str, np.ndarray] | None = None) -> None:
        """Appends a block (validated first) and commits it.

        ``spots`` (when the writer has spots): ``offsets`` (n+1), ``q`` (n_spots, 3), ``photons``, ``size``,
        ``initial_phi`` (n).
        """
        g = {k: self._file["geometry"].attrs[k] for k in ("num_rows", "num_cols")}
        n_rot = None
        if "frames/candidate_offsets" in self._offsets:
            n_rot = data_io.rotation_count(int(self._file["frames"].attrs["candidate_sampling_n"]))
        frames.validate(num_pixels=int(g["num_rows"]) * int(g["num_cols"]), num_rotations=n_rot,
                        n_shells=self._file["frames/background"].shape[1])
        self._extend("frames/frame_id", frames.frame_id)
        self._extend("frames/background", frames.background)
        self._extend_offsets("frames/photon_offsets", frames.photon_offsets)
        self._extend("frames/photon_pixels", frames.photon_pixels)
        self._extend("frames/photon_counts", frames.photon_counts)
        self._extend_offsets("frames/dead_offsets", frames.dead_offsets)
        self._extend("frames/dead_pixels", frames.dead_pixels)
        if "frames/candidate_offsets" in self._offsets:
            self._extend_offsets("frames/candidate_offsets", frames.candidate_offsets)
            self._extend("frames/candidate_rotations", frames.candidate_rotations)
        if "spots/offsets" in self._offsets:
            if spots is None:
                raise DataError(f"{self.path}: the writer stores spots but a block came without them")
            self._extend_offsets("spots/offsets", spots["offsets"])
            for name in ("q", "photons", "size", "initial_phi"):
                self._extend(f"spots/{name}", np.asarray(spots[name]))
        self._file.attrs["frames_committed"] = np.int64(self.frames_done)
        self._file.flush()

    def finish(self, truth_from: pathlib.Path | None = None, normalise_phi: bool = True) -> pathlib.Path:
        """Normalises ``/spots/initial_phi`` to mean 1 (frames without spots get 1), copies ``/truth`` from
        ``truth_from`` when given (its per-frame datasets subset to the frames written, see _copy_truth), and
        renames the partial file onto the target."""
        f = self._file
        if "spots/initial_phi" in self._per_frame and normalise_phi:
            # in blocks of frames, so that memory does not grow with the frame count
            phi_ds = f["spots/initial_phi"]
            blocks = [slice(a, min(a + _PHI_BLOCK, phi_ds.shape[0])) for a in range(0, phi_ds.shape[0], _PHI_BLOCK)]
            total = count = 0.0
            for block in blocks:
                phi = phi_ds[block].astype(np.float64)
                total, count = total + phi[phi > 0].sum(), count + np.count_nonzero(phi > 0)
            mean = total / count if count else 1.0
            for block in blocks:
                phi = phi_ds[block].astype(np.float64)
                phi_ds[block] = np.where(phi > 0, phi / mean, 1.0).astype(np.float32)
        if truth_from is not None:
            self._copy_truth(pathlib.Path(truth_from))
        for key in ("fingerprint", "frames_committed"):
            del f.attrs[key]
        f.close()
        if self.path.exists() and not self.overwrite:
            raise DataError(f"{self.path}: file exists; pass --overwrite to replace it")
        os.replace(self.partial, self.path)
        with data_io.SparseDataset(self.path):
            pass  # the format's own open-time checks
        return self.path

    def _copy_truth(self, source: pathlib.Path) -> None:
        """Copies ``/truth`` of ``source``; when ``source`` is a sparse data set (``/frames/frame_id``), its
        per-frame truth datasets (TRUTH_PER_FRAME) are subset to the frames written here, matched by frame_id
        (so a reduction of some frames, or orient dropping frames, keeps truth aligned with the frames)."""
        f = self._file
        with h5py.File(source, "r") as src:
            if "truth" not in src:
                raise DataError(f"{source}: group /truth is missing")
            src.copy(src["truth"], f, "truth")
            if "frames/frame_id" not in src:
                return
            source_ids = src["frames/frame_id"][()]
        ids = f["frames/frame_id"][()]
        if np.array_equal(ids, source_ids):
            return
        order = np.argsort(source_ids, kind="stable")
        rows = order[np.minimum(np.searchsorted(source_ids, ids, sorter=order), max(source_ids.size - 1, 0))] \
            if source_ids.size else np.zeros(0, np.int64)
        missing = ids[source_ids[rows] != ids] if source_ids.size else ids
        if missing.size:
            raise DataError(f"{source}: /frames/frame_id has no frame {int(missing[0])} of {self.path}; expected the "
                            "truth of every frame written")
        for name in TRUTH_PER_FRAME:
            ds = f["truth"].get(name)
            if isinstance(ds, h5py.Dataset) and ds.ndim >= 1 and ds.shape[0] == source_ids.size:
                values = ds[()][rows]
                del f["truth"][name]
                f["truth"].create_dataset(name, data=values)

    def close(self) -> None:
        """Closes the partial file without finishing (it stays for --resume)."""
        if self._file.id.valid:
            self._file.close()
