"""Exact orbits of a 600-cell grid under the point-group operations that map the grid onto itself, fast.

A crystal in orientation q looks the same as in q ⊗ conj(h_g) for every proper rotation g of its point
group (emcjax.rotations.symmetric_misorientation), so the number of spots a rotation matches is the same
for both. For the operations whose images of every grid point are grid points (for 422 on the 600-cell:
the three 2-folds of 222), the candidate search scores one representative per orbit and gives every
member of a candidate's orbit as a candidate: the same lists as the full search, |H| times faster.

emcjax.rotation_symmetry.grid_symmetry_orbits finds the same orbits with a k-d tree (413 s at n = 30 on the
2-core machine, hours at n = 70); here each image is looked up by a hash of its sign-canonical,
rounded components in a sorted key table (seconds at n = 70). A grid point within float rounding of a
rounding boundary misses in the first table and is found in a second one shifted by half a cell.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emcjax.rotations import matrix_to_quaternion, quaternion_conjugate, quaternion_multiply
from emcjax.sampling_600cell import RotationSampling

_SCALE = 2.0**13  # key cells of 1.2e-4 in each quaternion component (grid points at n = 70 are >= 4e-3 apart)
_BITS = 15
_SAME = 1e-6  # chord distance below which an image is the grid point


def _canonical(q: np.ndarray) -> np.ndarray:
    """q (m, 4) flipped so that its first component beyond 1e-9 in magnitude is positive (q ≡ -q)."""
    first = np.argmax(np.abs(q) > 1e-9, axis=1)
    lead = q[np.arange(q.shape[0]), first]
    return np.where(lead[:, None] < 0, -q, q)


def _keys(q: np.ndarray, shift: float) -> np.ndarray:
    cells = np.floor((q + 1.0) * _SCALE + shift).astype(np.int64)  # 0 .. 2^14 + 1: 15 bits each
    return (cells[:, 0] << (3 * _BITS)) | (cells[:, 1] << (2 * _BITS)) | (cells[:, 2] << _BITS) | cells[:, 3]


@dataclasses.dataclass(frozen=True)
class GridOrbits:
    """Orbits of a grid under the grid-preserving operations H.

    Attributes:
      images: (n_h, n_rot) int32, images[k, r] = the grid index of rotation r under the k-th operation of H
        (row 0: the identity).
      representative: (n_rep,) int64 ascending, the smallest index of each orbit.
    """

    images: np.ndarray
    representative: np.ndarray

    def orbit(self) -> np.ndarray:
        """(n_rot,) int64: the position in ``representative`` of each grid rotation's orbit (the ``orbit`` of
        emcjax.rotation_symmetry.grid_symmetry_orbits)."""
        return np.searchsorted(self.representative, self.images.min(axis=0)).astype(np.int64)

    def expand(self, indices: np.ndarray) -> np.ndarray:
        """(m,) int64 ascending: every member of the orbits of the grid rotations ``indices``."""
        indices = np.asarray(indices, np.int64)
        return np.unique(self.images[:, indices].astype(np.int64).ravel())


class _Lookup:
    """Grid index of unit quaternions that are grid points (sorted hash tables)."""

    def __init__(self, quaternions: np.ndarray, chunk: int):
        self.q = quaternions
        self.tables = []
        for shift in (0.0, 0.5):
            keys = np.concatenate([_keys(_canonical(quaternions[s:s + chunk]), shift)
                                   for s in range(0, quaternions.shape[0], chunk)])
            order = np.argsort(keys, kind="stable")
            self.tables.append((keys[order], order))

    def find(self, q: np.ndarray) -> np.ndarray:
        """(m,) int64 grid index of each q (m, 4), -1 where q is not a grid point."""
        c = _canonical(q)
        out = np.full(q.shape[0], -1, np.int64)
        for shift, (keys, order) in zip((0.0, 0.5), self.tables):
            todo = np.flatnonzero(out < 0)
            if not todo.size:
                break
            k = _keys(c[todo], shift)
            pos = np.minimum(np.searchsorted(keys, k), keys.size - 1)
            idx = order[pos]
            dist = np.minimum(np.linalg.norm(self.q[idx] - q[todo], axis=1),
                              np.linalg.norm(self.q[idx] + q[todo], axis=1))
            hit = (keys[pos] == k) & (dist < _SAME)
            out[todo[hit]] = idx[hit]
        return out


def grid_orbits(sampling: RotationSampling, rotation_ops_cartesian, chunk: int = 1 << 21,
                probe: int = 4096) -> GridOrbits:
    """The orbits of ``sampling`` under the operations of ``rotation_ops_cartesian`` ((n_ops, 3, 3) proper
    rotations acting on crystal-frame vectors) that map every grid point onto a grid point.

    An operation is tested on ``probe`` evenly spread grid points first, then on all of them.
    """
    q = sampling.quaternions
    n_rot = q.shape[0]
    lookup = _Lookup(q, chunk)
    probe_idx = np.linspace(0, n_rot - 1, min(probe, n_rot)).astype(np.int64)
    images = [np.arange(n_rot, dtype=np.int32)]
    for g in np.asarray(rotation_ops_cartesian, np.float64):
        h_conj = quaternion_conjugate(matrix_to_quaternion(g))
        if abs(abs(h_conj[0]) - 1) < 1e-12:
            continue  # the identity
        if (lookup.find(quaternion_multiply(q[probe_idx], h_conj[None])) < 0).any():
            continue
        image = np.empty(n_rot, np.int32)
        for s in range(0, n_rot, chunk):
            found = lookup.find(quaternion_multiply(q[s:s + chunk], h_conj[None]))
            if (found < 0).any():
                break
            image[s:s + chunk] = found
        else:
            images.append(image)
    images_arr = np.stack(images)
    representative = np.flatnonzero(np.arange(n_rot) <= images_arr.min(axis=0)).astype(np.int64)
    return GridOrbits(images=images_arr, representative=representative)
