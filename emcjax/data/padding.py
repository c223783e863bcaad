"""Static-shape padded arrays of a block of frames for the JAX kernels (numpy): :func:`pad_frames`,
:func:`bucket_length`."""

from __future__ import annotations

import dataclasses

import numpy as np

from emcjax.data.frames import INT_KINDS, SparseFrames
from emcjax.errors import DataError


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
    if pixel_map.ndim != 1 or pixel_map.dtype.kind not in INT_KINDS:
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
