"""A block of frames of the sparse data set in memory (CSR form, numpy): :class:`SparseFrames`, its
validation, slicing and concatenation; :func:`rotation_count` of the 600-cell sampling the candidate lists index."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from emcjax.errors import DataError

INT_KINDS = "iu"
FLOAT_KINDS = "f"


def _as_int(a: Any, dtype: type) -> Any:
    """Cast integer-kind arrays to ``dtype``; leave anything else as an array for validate() to reject."""
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.dtype.kind in INT_KINDS:
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
        if bg.dtype.kind in FLOAT_KINDS + INT_KINDS:
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
                            f"{'an integer' if kinds == INT_KINDS else 'a float'} type")
            if arr.ndim != ndim:
                fail(field, f"shape {arr.shape} received, expected {ndim} dimension(s)")
            return arr

        fid = check_dtype("frame_id", self.frame_id, INT_KINDS, 1)
        n = fid.shape[0]

        def check_csr(off_name: str, val_names: Sequence[str]) -> np.ndarray:
            off = check_dtype(off_name, getattr(self, off_name), INT_KINDS, 1)
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
                kinds = INT_KINDS
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
        if self.photon_counts.size and int(self.photon_counts.max()) > np.iinfo(np.int32).max:
            fail("photon_counts", f"count {int(self.photon_counts.max())} received, expected <= "
                                  f"{np.iinfo(np.int32).max} (2^31 - 1, counts are 32-bit)")
        check_range("photon_pixels", self.photon_pixels, num_pixels, "pixel id")
        check_ascending("photon_pixels", self.photon_pixels, po)

        do = check_csr("dead_offsets", ("dead_pixels",))
        check_range("dead_pixels", self.dead_pixels, num_pixels, "pixel id")
        check_ascending("dead_pixels", self.dead_pixels, do)

        bg = check_dtype("background", self.background, FLOAT_KINDS, 2)
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
