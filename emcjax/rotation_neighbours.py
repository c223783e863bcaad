"""Neighbour queries of a rotation sampling over the whole sphere (``q ≡ -q``): all rotations within an angle
(CSR) and the ``k`` nearest. Quaternion conventions: :mod:`emcjax.rotations`. Numpy set-up code (float64).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from emcjax.errors import ConfigError
from emcjax.rotations import misorientation_angle
from emcjax.sampling_600cell import RotationSampling

__all__ = [
    "neighbours",
    "nearest_rotations",
]


# ----------------------------------------------------------------------------------------------------------
# Neighbours
# ----------------------------------------------------------------------------------------------------------


def neighbours(
    sampling_or_quaternions: RotationSampling | np.ndarray,
    query_quaternions,
    max_angle_rad: float,
) -> tuple[np.ndarray, np.ndarray]:
    """All rotations within a misorientation angle of each query rotation (CSR).

    Correct over the whole sphere (``q ≡ -q``): a k-d tree of the sampled 4-vectors is searched with both
    ``q`` and ``-q`` of every query, using ``|p - q| = 2 sin(angle / 4)``; candidates are then filtered
    exactly with :func:`misorientation_angle` ``<= max_angle_rad``.

    Args:
        sampling_or_quaternions: :class:`RotationSampling` or ``(n_rot, 4)`` unit quaternions.
        query_quaternions: ``(n_query, 4)`` (or ``(4,)``) quaternions; normalised here.
        max_angle_rad: maximum misorientation angle in radians (>= 0; values >= π return everything).

    Returns:
        ``(offsets, indices)``: ``offsets`` ``(n_query + 1,)`` int64, ``indices`` ``(offsets[-1],)`` int64; the
        neighbours of query ``i`` are ``indices[offsets[i]:offsets[i+1]]``, ascending.

    Raises:
        ConfigError: bad shapes or a negative angle.
    """
    q_s = (
        sampling_or_quaternions.quaternions
        if isinstance(sampling_or_quaternions, RotationSampling)
        else np.asarray(sampling_or_quaternions, dtype=np.float64)
    )
    if q_s.ndim != 2 or q_s.shape[1] != 4:
        raise ConfigError(f"neighbours: sampled quaternions must have shape (n_rot, 4), got {q_s.shape}")
    q_q = np.atleast_2d(np.asarray(query_quaternions, dtype=np.float64))
    if q_q.ndim != 2 or q_q.shape[1] != 4:
        raise ConfigError(f"neighbours: query_quaternions must have shape (n_query, 4), got {q_q.shape}")
    if not np.isfinite(max_angle_rad) or max_angle_rad < 0:
        raise ConfigError(f"neighbours: max_angle_rad must be a finite angle >= 0 (radians), got {max_angle_rad!r}")
    q_q = q_q / np.linalg.norm(q_q, axis=1, keepdims=True)
    n_q, n_s = q_q.shape[0], q_s.shape[0]
    angle = min(float(max_angle_rad), np.pi)
    radius = 2.0 * np.sin(angle / 4.0) * (1.0 + 1e-9) + 1e-12

    tree_s = cKDTree(q_s)
    tree_q = cKDTree(np.concatenate([q_q, -q_q], axis=0))
    pairs = tree_q.sparse_distance_matrix(tree_s, radius, output_type="ndarray")
    rows = pairs["i"].astype(np.int64) % n_q
    cols = pairs["j"].astype(np.int64)
    key = np.unique(rows * n_s + cols)  # sorted: query ascending, then index ascending; dedups ±q hits
    rows, cols = key // n_s, key % n_s
    if max_angle_rad < np.pi:
        ok = misorientation_angle(q_q[rows], q_s[cols]) <= max_angle_rad
        rows, cols = rows[ok], cols[ok]
    offsets = np.searchsorted(rows, np.arange(n_q + 1), side="left").astype(np.int64)
    return offsets, cols


def nearest_rotations(sampling_or_quaternions: RotationSampling | np.ndarray, query_quaternions, k: int) -> np.ndarray:
    """The ``k`` sampled rotations nearest (in misorientation angle) to each query rotation.

    Correct over the whole sphere: the k-d tree of the sampled 4-vectors is searched with ``q`` and ``-q``
    (the chord ``min(|p - q|, |p + q|) = 2 sin(angle / 4)`` is monotone in the angle).

    Args:
        sampling_or_quaternions: :class:`RotationSampling` or ``(n_rot, 4)`` unit quaternions.
        query_quaternions: ``(n_query, 4)`` unit quaternions.
        k: rotations per query, ``1 <= k <= n_rot``.

    Returns:
        ``(n_query, k)`` int64 sampling indices, nearest first.
    """
    q_s = (
        sampling_or_quaternions.quaternions
        if isinstance(sampling_or_quaternions, RotationSampling)
        else np.asarray(sampling_or_quaternions, dtype=np.float64)
    )
    q_q = np.atleast_2d(np.asarray(query_quaternions, dtype=np.float64))
    if q_q.ndim != 2 or q_q.shape[1] != 4:
        raise ConfigError(f"nearest_rotations: query_quaternions must have shape (n_query, 4), got {q_q.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= q_s.shape[0]:
        raise ConfigError(f"nearest_rotations: k must be an integer in [1, {q_s.shape[0]}], got {k!r}")
    k = int(k)
    tree = cKDTree(q_s)
    dist_p, idx_p = tree.query(q_q, k=k)
    dist_m, idx_m = tree.query(-q_q, k=k)
    dist = np.concatenate([np.reshape(dist_p, (-1, k)), np.reshape(dist_m, (-1, k))], axis=1)
    idx = np.concatenate([np.reshape(idx_p, (-1, k)), np.reshape(idx_m, (-1, k))], axis=1).astype(np.int64)
    order = np.argsort(dist, axis=1, kind="stable")
    dist, idx = np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
    # a sample can be found from both q and -q only if it is 90° or more away; drop the second hit
    by_index = np.sort(idx, axis=1)
    if np.any(by_index[:, 1:] == by_index[:, :-1]):
        out = np.empty((q_q.shape[0], k), np.int64)
        for i in range(q_q.shape[0]):
            _, first = np.unique(idx[i], return_index=True)
            out[i] = idx[i][np.sort(first)][:k]
        return out
    return idx[:, :k]
