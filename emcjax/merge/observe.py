"""What each frame's most likely orientation predicts: the reflections it records and its in-peak pixels.

* :func:`observations`: frames that record each unique reflection (the multiplicity of the merging table).
* :func:`unexplained_photons`: photons outside the predicted peaks against the background expected there
  (a frame whose photons the orientation does not explain holds a second crystal or is wrongly oriented).

Both walk the frames in chunks: the in-peak entries of ``chunk`` orientations at a time
(``emcjax.model.build_entries_by_reflection``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from emcjax import model as model_lib
from emcjax.data import SparseFrames
from emcjax.detector import Detector

CHUNK_FRAMES = 2048


def _entries_in_chunks(grid, detector: Detector, quaternions: np.ndarray, chunk: int) -> Iterator[tuple]:
    """Yields ``(start, frame, pixel, entries)``: frame (global index) and valid-pixel index of every in-peak
    entry of the frames ``start .. start + chunk`` at their orientation, and the entries themselves."""
    for start in range(0, quaternions.shape[0], chunk):
        entries = model_lib.build_entries_by_reflection(grid, detector, quaternions[start : start + chunk])
        yield start, np.asarray(entries.rotation, np.int64) + start, np.asarray(entries.pixel, np.int64), entries


def observations(grid, detector: Detector, quaternions, used, *, chunk: int = CHUNK_FRAMES) -> np.ndarray:
    """(n_asu,) int64 number of frames with ``used`` True in which each unique reflection has an in-peak pixel
    at the frame's orientation (quaternions (n_frames, 4))."""
    quaternions = np.asarray(quaternions, np.float64)
    used = np.asarray(used, bool)
    counts = np.zeros(grid.n_asu, np.int64)
    sentinel = grid.n_asu * grid.n_voxels
    for _, frame, _, entries in _entries_in_chunks(grid, detector, quaternions, chunk):
        voxels = np.asarray(entries.voxels)
        # the reflection of an entry: any of its corners that is not the padding sentinel
        corner = np.where(voxels < sentinel, voxels, -1).max(axis=1)
        keep = (corner >= 0) & used[frame]
        pairs = np.unique(frame[keep] * grid.n_asu + corner[keep] // grid.n_voxels)
        counts += np.bincount(pairs % grid.n_asu, minlength=grid.n_asu)
    return counts


def unexplained_photons(
    grid, detector: Detector, frames: SparseFrames, quaternions, *, chunk: int = CHUNK_FRAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Photons outside the predicted peaks of each frame's orientation, and the background expected there.

    Pixels of shells a frame excludes (background < 0) and the frame's dead pixels are left out of both.

    Args:
      grid: the model grid.
      detector: valid pixels.
      frames: the frames (their ``background`` (n_frames, n_shells) in photons per pixel per unit pol).
      quaternions: (n_frames, 4) orientation of each frame.

    Returns:
      ``(observed, expected)``: (n_frames,) float64 photons outside the peaks and the expected number of
      background photons in those pixels.
    """
    n = frames.n_frames
    pixel_map = detector.pixel_map()
    background = np.asarray(frames.background, np.float64)
    bg_pixel = lambda f, t: np.maximum(background[f, detector.shell[t]], 0.0) * detector.polarization[t]  # noqa: E731
    valid_shell = lambda f, t: background[f, detector.shell[t]] >= 0  # noqa: E731

    # photons and expectations over all valid pixels
    owner = np.repeat(np.arange(n), np.diff(frames.photon_offsets))
    index = pixel_map[frames.photon_pixels]
    ok = index >= 0
    ok[ok] = valid_shell(owner[ok], index[ok])
    dead_owner = np.repeat(np.arange(n), np.diff(frames.dead_offsets))
    dead_index = pixel_map[frames.dead_pixels]
    dead_ok = dead_index >= 0
    dead = set(zip(dead_owner[dead_ok].tolist(), dead_index[dead_ok].tolist()))
    if dead:
        ok &= np.array([(f, t) not in dead for f, t in zip(owner.tolist(), index.tolist())])
    observed = np.bincount(owner[ok], weights=frames.photon_counts[ok], minlength=n).astype(np.float64)
    per_shell = np.bincount(detector.shell, weights=detector.polarization, minlength=background.shape[1])
    expected = np.maximum(background, 0.0) @ per_shell
    if dead:
        f, t = np.array(sorted(dead)).T
        expected -= np.bincount(f, weights=bg_pixel(f, t), minlength=n)

    # take away the in-peak pixels of each frame's orientation
    photon_key = owner[ok] * detector.n_pix + index[ok]
    photon_count = frames.photon_counts[ok].astype(np.float64)
    order = np.argsort(photon_key)
    photon_key, photon_count = photon_key[order], photon_count[order]
    for _, frame, pixel, _ in _entries_in_chunks(grid, detector, np.asarray(quaternions, np.float64), chunk):
        if frame.size == 0:
            continue
        key = np.unique(frame * detector.n_pix + pixel)  # one pixel may touch two peaks
        f, t = key // detector.n_pix, key % detector.n_pix
        live = valid_shell(f, t)
        if dead:
            live &= np.array([(a, b) not in dead for a, b in zip(f.tolist(), t.tolist())])
        expected -= np.bincount(f[live], weights=bg_pixel(f[live], t[live]), minlength=n)
        at = np.searchsorted(photon_key, key[live])
        hit = at < photon_key.shape[0]
        hit[hit] = photon_key[at[hit]] == key[live][hit]
        observed -= np.bincount(f[live][hit], weights=photon_count[at[hit]], minlength=n)
    return observed, np.maximum(expected, 0.0)
