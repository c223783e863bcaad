"""Bayes factors for a frame's crystal and for a second crystal beside it (frame rejection).

With the final model W, a crystal of scale psi in rotation r gives frame d the Poisson mean
``pol_t (B_dt + psi W_rt)`` at pixel t, and its log-likelihood ratio against background alone is
``L_dr = sum_t K_dt log(1 + psi W_rt / B_dt) - psi S_r`` (S_r: expected Bragg photons of r at scale 1
over the frame's valid shells). With a uniform prior over the n rotations of the run's (symmetry-reduced)
sampling the log Bayes factor of "a crystal" against "background only" is ``log mean_r exp(L_dr)``, at least
``L_dA - log n`` for the frame's most likely rotation A: ``crystal`` is this bound (it needs no scan and
holds for any sampling; for a frame with a crystal L_dA is ~10^2 nats at 40 Bragg photons, for a blank
frame it is negative: the crystal's expected photons psi S_A are missing).

``second``: the log Bayes factor ``log mean_r exp(L'_dr)`` for a second crystal beside the first (the frame's most likely rotation A with its
fitted phi, whose predicted photons go into the denominator, ``B_dt + phi W_At``), over the rotations that
no Laue-group rotation brings within ``radius`` of A (of a scan sampling, which may be coarser than the run's). Photons the first crystal explains count little; a
second crystal's photons fall on its own peaks, which the sum over its rotation finds even when they are
too few to stand out as photons outside A's peaks.

A is the run's refined continuous orientation (``best_quaternion``) when it saved one (emcjax.reject).
The first crystal's orientation may be given refined off the grid (:func:`refine_first`: the best of A and
26 rotations around it, by the frame's own log-likelihood ratio at its phi; emcjax.reject does so for the
frames whose ``second`` with A is positive). With continuous true orientations the grid rotation A is ~2°
off, so several per cent of a frame's Bragg photons fall outside A's predicted peaks, where the background is
low: another orientation's peaks then collect enough of them to win (experiments/second_evidence.py,
docs/BENCHMARKS.md). So do the photons of the reflections the model leaves out at its resolution limits:
emcjax.reject gives ``second`` and :func:`refine_first` only the pixels of emcjax.merge.modelled_pixels, and
:func:`crystal_bound` (``crystal`` alone) all valid pixels.

psi is fixed (a typical crystal: a multiple of the median phi), so both are exact Bayes factors of simple
hypotheses; positive values favour the crystal. Dead pixels are not excluded from the sums (a small error).
Cost: the in-peak entries of every scan rotation (build_entries_by_reflection) and, per photon, the entries
at its pixel: ~photons x n_rot x (entries per rotation / pixels) terms.
"""

from __future__ import annotations

import itertools

import numpy as np

from emcjax import model as model_lib
from emcjax.data import SparseFrames
from emcjax.detector import Detector
from emcjax.rotations import quaternion_multiply, symmetric_misorientation

CHUNK_FRAMES = 512  # frames whose (frame, scan rotation) sums are held at once
REFINE_ROTATIONS = 2048  # candidate rotations whose in-peak entries refine_first holds at once


class ScanTables:
    """In-peak entries of the scan rotations sorted by pixel, their model values and expected signals."""

    def __init__(self, grid, detector: Detector, intensity, quaternions):
        self.quaternions = np.asarray(quaternions, np.float64)
        entries = model_lib.build_entries_by_reflection(grid, detector, self.quaternions)
        w = np.asarray(model_lib.tomogram(np.asarray(intensity, np.float32), entries), np.float64)
        rotation, pixel = np.asarray(entries.rotation, np.int64), np.asarray(entries.pixel, np.int64)
        n_shells = int(detector.shell.max()) + 1
        # expected Bragg photons per rotation and background shell at phi = 1
        self.signal = np.zeros((entries.n_rot, n_shells))
        np.add.at(self.signal, (rotation, detector.shell[pixel]), w * detector.polarization[pixel])
        order = np.argsort(pixel, kind="stable")
        self.rotation, self.w = rotation[order], w[order]
        self.pixel_start = np.searchsorted(pixel[order], np.arange(detector.n_pix + 1))
        self.n_rot = entries.n_rot


def photons_on_valid_pixels(detector: Detector, frames: SparseFrames):
    """(owner, valid-pixel index, count, background per unit pol) of the photons on valid pixels and shells."""
    owner = np.repeat(np.arange(frames.n_frames), np.diff(frames.photon_offsets))
    index = detector.pixel_map()[frames.photon_pixels]
    ok = index >= 0
    owner, index, count = owner[ok], index[ok], frames.photon_counts[ok].astype(np.float64)
    bg = np.asarray(frames.background, np.float64)[owner, detector.shell[index]]
    live = bg > 0
    return owner[live], index[live], count[live], bg[live]


def signal_over_valid_shells(signal: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(n_frames, n_rows) expected Bragg photons at phi = 1 over each frame's valid shells."""
    valid = np.asarray(background)[:, : signal.shape[1]] >= 0  # shells past the valid pixels' hold no signal
    return valid.astype(np.float64) @ signal.T


def local_offsets(step: float) -> np.ndarray:
    """(27, 4) unit quaternions of the rotation vectors ``step`` x (i, j, k), i, j, k in {0, -1, 1} (rad about
    the x, y, z axes), the identity first."""
    vectors = np.array(list(itertools.product((0, -1, 1), repeat=3)), np.float64) * step
    angle = np.linalg.norm(vectors, axis=1)
    axis = vectors / np.maximum(angle, 1e-300)[:, None]
    return np.concatenate([np.cos(angle / 2)[:, None], np.sin(angle / 2)[:, None] * axis], axis=1)


def refine_first(grid, detector: Detector, frames: SparseFrames, intensity, quaternions, phi, step: float):
    """(n_frames, 4): per frame the rotation among ``quaternions[d] ⊗`` :func:`local_offsets` (``step`` rad)
    with the largest log-likelihood ratio ``L = sum_t K_dt log(1 + phi_d W_t / B_dt) - phi_d S`` of a crystal
    of the frame's scale phi_d against background only; ``quaternions[d]`` itself on ties (e.g. phi_d = 0)."""
    quaternions = np.asarray(quaternions, np.float64)
    phi = np.asarray(phi, np.float64)
    offsets = local_offsets(step)
    k, n, n_pix = offsets.shape[0], frames.n_frames, detector.n_pix
    owner, index, count, bg = photons_on_valid_pixels(detector, frames)
    photon_start = np.searchsorted(owner, np.arange(n + 1))
    background = np.asarray(frames.background)
    chosen = quaternions.copy()
    chunk = max(1, REFINE_ROTATIONS // k)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        candidates = quaternion_multiply(quaternions[a:b, None, :], offsets[None]).reshape(-1, 4)  # (b-a) x k
        tables = ScanTables(grid, detector, intensity, candidates)
        entry_pixel = np.repeat(np.arange(n_pix), np.diff(tables.pixel_start))
        keys, inverse = np.unique(tables.rotation * n_pix + entry_pixel, return_inverse=True)
        w_at_key = np.bincount(inverse, weights=tables.w, minlength=keys.size)
        sl = slice(photon_start[a], photon_start[b])
        candidate = (owner[sl, None] - a) * k + np.arange(k)  # (photons, k): each photon with its frame's
        key = candidate * n_pix + index[sl, None]
        at = np.minimum(np.searchsorted(keys, key), max(keys.size - 1, 0))
        w = np.where(keys[at] == key, w_at_key[at], 0.0) if keys.size else np.zeros(key.shape)
        scale = phi[owner[sl], None]
        terms = count[sl, None] * np.log1p(scale * w / bg[sl, None])
        llr = np.bincount(candidate.ravel(), weights=terms.ravel(), minlength=(b - a) * k).reshape(b - a, k)
        valid = background[a:b, : tables.signal.shape[1]] >= 0
        llr -= phi[a:b, None] * np.einsum("fks,fs->fk", tables.signal.reshape(b - a, k, -1), valid.astype(np.float64))
        chosen[a:b] = candidates.reshape(b - a, k, 4)[np.arange(b - a), np.argmax(llr, axis=1)]
    return chosen


def crystal_evidence(
    grid, detector: Detector, frames: SparseFrames, intensity, best_quaternions, phi, scan: ScanTables,
    rotation_ops, radius: float, psi: float, n_orientations: int, first_quaternions=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(crystal, second)``: (n_frames,) log Bayes factors (nats) of a crystal against background only and
    of a second crystal beside the first against none.

    Args:
      grid, detector: the run's model grid and valid pixels.
      frames: the frames (photons and background).
      intensity: (n_asu, n_voxels) final model.
      best_quaternions: (n_frames, 4) most likely orientation A of each frame.
      phi: (n_frames,) fitted scales (of the first crystal).
      scan: in-peak tables of the rotations searched for a second crystal.
      rotation_ops: (n_ops, 3, 3) proper rotations of the Laue group.
      radius: rad; scan rotations within it of A (modulo the group) are A's own.
      psi: scale of the crystals tested (e.g. the median phi).
      n_orientations: rotations of the run's prior (the bound of ``crystal`` subtracts log of it).
      first_quaternions: (n_frames, 4) the first crystal's orientation for ``second`` (e.g. A refined off the
        grid by :func:`refine_first`); None: A.
    """
    n = frames.n_frames
    phi = np.asarray(phi, np.float64)
    owner, index, count, bg = photons_on_valid_pixels(detector, frames)
    w_best, s_best = _first_at_photons(grid, detector, frames, intensity, best_quaternions, (owner, index))
    crystal = _crystal_bound((owner, index, count, bg), w_best, s_best, psi, n_orientations, n)
    first, w_first = best_quaternions, w_best
    if first_quaternions is not None:
        first = first_quaternions
        w_first, _ = _first_at_photons(grid, detector, frames, intensity, first, (owner, index))

    # a second crystal beside the first (denominator B + phi W_first): every scan rotation's entries at each
    # photon's pixel
    beside = bg + phi[owner] * w_first
    s_scan = signal_over_valid_shells(scan.signal, frames.background)
    second = np.zeros(n)
    photon_start = np.searchsorted(owner, np.arange(n + 1))
    for a in range(0, n, CHUNK_FRAMES):
        b = min(a + CHUNK_FRAMES, n)
        sl = slice(photon_start[a], photon_start[b])
        per = scan.pixel_start[index[sl] + 1] - scan.pixel_start[index[sl]]
        pair_photon = np.repeat(np.arange(sl.start, sl.stop), per)
        pair_entry = np.repeat(scan.pixel_start[index[sl]] - np.cumsum(per) + per, per) + np.arange(per.sum())
        cell = (owner[pair_photon] - a) * scan.n_rot + scan.rotation[pair_entry]
        term = count[pair_photon] * np.log1p(psi * scan.w[pair_entry] / beside[pair_photon])
        llr = np.bincount(cell, weights=term, minlength=(b - a) * scan.n_rot).reshape(b - a, scan.n_rot)
        llr -= psi * s_scan[a:b]
        away = symmetric_misorientation(
            np.asarray(first, np.float64)[a:b, None, :], scan.quaternions[None, :, :], rotation_ops
        ) > radius
        second[a:b] = log_mean_exp(llr, away)
    return crystal, second


def crystal_bound(grid, detector: Detector, frames: SparseFrames, intensity, best_quaternions, psi: float,
                  n_orientations: int) -> np.ndarray:
    """(n_frames,) ``crystal`` of :func:`crystal_evidence` alone (no scan): ``L_dA - log n_orientations``, nats."""
    photons = photons_on_valid_pixels(detector, frames)
    w_best, s_best = _first_at_photons(grid, detector, frames, intensity, best_quaternions, photons[:2])
    return _crystal_bound(photons, w_best, s_best, psi, n_orientations, frames.n_frames)


def _crystal_bound(photons, w_best, s_best, psi: float, n_orientations: int, n_frames: int) -> np.ndarray:
    """``sum_t K_dt log(1 + psi W_At / B_dt) - psi S_A - log n_orientations`` per frame from the photons
    (owner, index, count, background) and W of A at them, and A's expected photons S_A at scale 1."""
    owner, _, count, bg = photons
    return (np.bincount(owner, weights=count * np.log1p(psi * w_best / bg), minlength=n_frames) - psi * s_best
            - np.log(n_orientations))


def _first_at_photons(grid, detector: Detector, frames: SparseFrames, intensity, quaternions, photons):
    """W of each frame's crystal in its orientation at each photon's pixel (a pixel may touch two peaks: summed)
    and (n_frames,) its expected Bragg photons at scale 1 over the frame's valid shells."""
    owner, index = photons
    tables = ScanTables(grid, detector, intensity, quaternions)
    entry_pixel = np.repeat(np.arange(detector.n_pix), np.diff(tables.pixel_start))
    keys, inverse = np.unique(tables.rotation * detector.n_pix + entry_pixel, return_inverse=True)
    w_at_key = np.bincount(inverse, weights=tables.w, minlength=keys.size)
    key_photon = owner * detector.n_pix + index
    at = np.searchsorted(keys, key_photon)
    hit = at < keys.size
    hit[hit] = keys[at[hit]] == key_photon[hit]
    w = np.zeros(owner.shape[0])
    w[hit] = w_at_key[at[hit]]
    signal = np.sum((np.asarray(frames.background)[:, : tables.signal.shape[1]] >= 0) * tables.signal, axis=1)
    return w, signal


def log_mean_exp(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(rows,) log of the mean of exp(values) over the True entries of each row (-inf for none)."""
    v = np.where(mask, values, -np.inf)
    top = v.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (top[:, 0] + np.log(np.sum(np.exp(v - top), axis=1))) - np.log(np.maximum(mask.sum(axis=1), 1))
