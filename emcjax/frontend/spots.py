"""Bragg spots of one frame: 4-connected patches of outlier pixels (METHOD.md §2.2 step 7, §10.1).

A patch with ``min_size <= size <= max_size`` pixels is a spot: its centroid q = sum K_t q_t / sum K_t
(1/Å, lab frame, from the unmasked full geometry), its photons sum K_t and its radial shell the shell of
|centroid|. Larger patches are "diffuse": their pixels become dead pixels of that frame (as the reference's
write-data does). Shells holding more than ``max_per_shell`` spot centroids are powder rings: those spots
are dropped and the shells their pixels span are excluded from the frame.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from emcjax.frontend.background import RadialTables

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


@dataclasses.dataclass(frozen=True)
class FrameSpots:
    """Spots of one frame.

    Attributes:
      q: (n_spots, 3) float64 centroid q in 1/Å (lab frame).
      photons: (n_spots,) float64 summed counts of the patch.
      size: (n_spots,) int64 pixels of the patch.
      diffuse_pixels: (n,) int64 raw pixel ids of the diffuse patches (dead in this frame).
      ring_shells: (n_shells,) bool shells excluded because too many spots fall in them.
    """

    q: np.ndarray
    photons: np.ndarray
    size: np.ndarray
    diffuse_pixels: np.ndarray
    ring_shells: np.ndarray


def find_spots(image: np.ndarray, outlier_ids: np.ndarray, tables: RadialTables, min_size: int = 2,
               max_size: int = 10, max_per_shell: int = 5) -> FrameSpots:
    """Spots of one frame.

    Args:
      image: (num_rows, num_cols) counts.
      outlier_ids: raw pixel ids of the frame's outlier pixels (from frame_background).
      tables: the detector's tables (full-geometry q, shells of valid pixels).
      min_size, max_size: patch size limits in pixels (reference: 2 and 10).
      max_per_shell: a shell with more spot centroids than this is a ring (reference: 5).
    """
    g = tables.geometry
    n_shells = g.n_shells
    outlier = np.zeros(g.num_pixels, bool)
    outlier[outlier_ids] = True
    labels, n = ndimage.label(outlier.reshape(g.num_rows, g.num_cols), structure=_FOUR_CONNECTED)
    labels = labels.ravel()
    if n == 0:
        empty = np.zeros((0,), np.int64)
        return FrameSpots(np.zeros((0, 3)), np.zeros(0), empty, empty, np.zeros(n_shells, bool))
    ids = np.flatnonzero(labels)
    lab = labels[ids] - 1
    k = np.asarray(image).ravel()[ids].astype(np.float64)
    size = np.bincount(lab, minlength=n)
    photons = np.bincount(lab, weights=k, minlength=n)
    q = np.stack([np.bincount(lab, weights=k * tables.q_full[ids, i], minlength=n) for i in range(3)], axis=1)
    q /= photons[:, None]
    shell_lo = np.full(n, n_shells, np.int64)
    shell_hi = np.full(n, -1, np.int64)
    np.minimum.at(shell_lo, lab, tables.shell_full[ids])
    np.maximum.at(shell_hi, lab, tables.shell_full[ids])

    diffuse = size > max_size
    spot = (size >= min_size) & ~diffuse
    centre_shell = np.minimum((np.linalg.norm(q, axis=1) / g.shell_width).astype(np.int64), n_shells - 1)
    per_shell = np.bincount(centre_shell[spot], minlength=n_shells)
    crowded = per_shell > max_per_shell
    in_ring = spot & crowded[centre_shell]
    ring = np.zeros(n_shells, bool)
    for lo, hi in zip(shell_lo[in_ring], shell_hi[in_ring]):
        ring[lo:hi + 1] = True
    keep = spot & ~in_ring
    return FrameSpots(q=q[keep], photons=photons[keep], size=size[keep].astype(np.int64),
                      diffuse_pixels=np.sort(ids[diffuse[lab]]).astype(np.int64), ring_shells=ring)
