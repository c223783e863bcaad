"""Rotations of the 600-cell sampling by index, without building the whole sampling.

Candidate lists index a fine sampling (n = 70: 17 M rotations, 690 MB; n = 94: 83 M, 3.3 GB) of which a run
touches a few hundred thousand. :class:`SampledRotations` gives the quaternion and normalised log weight of
any index of ``sampling_600cell.sample_600cell(n)`` (same values, same order) from

* per simplex (vertex, edge, face, cell of the 600-cell, in the sampling's order), the number of its interior
  lattice points kept by the half-sphere rule: one pass of integer sign tests, the first non-zero exact
  coordinate decided column by column (most points by the first), in chunks;
* the normalisation: the weight sum of one simplex of each kind times their number, halved (the 600-cell's
  symmetries map simplices of one kind onto each other and preserve the weights; of ±v one is kept);

then, per requested index, its simplex by binary search and the point by re-running that simplex's sign test.
Memory is O(simplices + chunk), not O(n_rot).
"""

from __future__ import annotations

import numpy as np

from emcjax.errors import ConfigError
from emcjax.sampling_600cell import exact_to_float, interior_lattice, polytope_600cell, n_rotations_600cell


def _kept(bary: np.ndarray, vert_int: np.ndarray) -> np.ndarray:
    """The half-sphere rule (the first non-zero exact integer coordinate is positive) for the lattice points
    ``bary`` (n_pts, d + 1) of simplices with vertices ``vert_int`` (n_s, d + 1, 8): (n_s, n_pts) bool.
    Coordinates are formed one at a time, only while some point is undecided (most are by the first)."""
    keep = np.zeros((vert_int.shape[0], bary.shape[0]), bool)
    undecided = np.ones_like(keep)
    for k in range(8):
        column = np.matmul(vert_int[:, :, k], bary.T)  # (n_s, n_pts) exact integers in float64
        keep |= undecided & (column > 0)
        undecided &= column == 0
        if not undecided.any():
            break
    return keep


class _Lookup:
    """``obj[indices]`` -> values computed for those indices only."""

    def __init__(self, fn):
        self._fn = fn

    def __getitem__(self, indices):
        return self._fn(np.asarray(indices, np.int64))


class SampledRotations:
    """The n-refined 600-cell sampling, indexable by rotation index without materialising it.

    Attributes:
      n: refinement parameter; n_rot: number of rotations.
      quaternions: ``quaternions[idx]`` -> (..., 4) float64 (as ``sample_600cell(n).quaternions[idx]``).
      log_weights: ``log_weights[idx]`` -> (...,) float64 normalised log weights.
    """

    def __init__(self, n: int, chunk_points: int = 1 << 22):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"SampledRotations: n must be a positive integer, got {n!r}")
        self.n = int(n)
        self.n_rot = n_rotations_600cell(self.n)
        poly = polytope_600cell()
        self._categories = []
        starts, counts, total_weight = [], [], 0.0
        for simplices, vsum, factor in (
            (np.arange(120)[:, None], poly.cell_vsum[poly.vertex_cell], 5.0 / 6.0),
            (poly.edges, poly.edge_cell_vsum, 35.0 / 36.0),
            (poly.faces, poly.face_cell_vsum, 1.0),
            (poly.cells, poly.cell_vsum, 1.0),
        ):
            bary = interior_lattice(simplices.shape[1] - 1, self.n).astype(np.float64)
            if bary.shape[0] == 0:
                continue
            per = np.zeros(simplices.shape[0], np.int64)
            step = max(1, chunk_points // bary.shape[0])
            for s0 in range(0, simplices.shape[0], step):
                vert = poly.vert_int[simplices[s0 : s0 + step]].reshape(-1, simplices.shape[1], 8)
                per[s0 : s0 + step] = _kept(bary, vert).sum(axis=1)
            w = self._weights(bary, poly.vert_int[simplices[0]], vsum[0], factor)
            total_weight += 0.5 * simplices.shape[0] * float(w.sum())
            self._categories.append((simplices, vsum, factor, bary))
            starts.append(np.concatenate([[0], np.cumsum(per)]))
            counts.append(int(per.sum()))
        self._starts = starts
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        if self._offsets[-1] != self.n_rot:  # pragma: no cover - construction invariant
            raise AssertionError(f"SampledRotations({n}): counted {self._offsets[-1]} rotations, expected {self.n_rot}")
        self._log_total = float(np.log(total_weight))
        self.quaternions = _Lookup(lambda idx: self._lookup(idx)[0])
        self.log_weights = _Lookup(lambda idx: self._lookup(idx)[1])

    def _weights(self, bary, vert_int, vsum, factor):
        v_q = exact_to_float(np.matmul(bary, vert_int), 2.0 * self.n)
        norm_q = np.linalg.norm(v_q, axis=-1)
        return factor * (v_q @ vsum) / (norm_q**4 * np.linalg.norm(vsum))

    def _lookup(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = idx.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_rot):
            raise ConfigError(f"rotation index out of range [0, {self.n_rot}) of the n = {self.n} sampling")
        quats = np.empty((flat.shape[0], 4))
        logw = np.empty(flat.shape[0])
        category = np.searchsorted(self._offsets, flat, side="right") - 1
        poly = polytope_600cell()
        for c in np.unique(category):
            simplices, vsum, factor, bary = self._categories[c]
            mine = np.flatnonzero(category == c)
            local = flat[mine] - self._offsets[c]
            simplex = np.searchsorted(self._starts[c], local, side="right") - 1
            for s in np.unique(simplex):
                at = mine[simplex == s]
                rank = local[simplex == s] - self._starts[c][s]
                vert = poly.vert_int[simplices[s]].reshape(-1, 8)
                points = np.flatnonzero(_kept(bary, vert[None])[0])[rank]
                v_q = exact_to_float(np.matmul(bary[points], vert), 2.0 * self.n)
                quats[at] = v_q / np.linalg.norm(v_q, axis=1, keepdims=True)
                logw[at] = np.log(self._weights(bary[points], poly.vert_int[simplices[s]], vsum[s], factor)) - self._log_total
        return quats.reshape(*idx.shape, 4), logw.reshape(idx.shape)
