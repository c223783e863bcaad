"""Quaternion conventions, the 600-cell rotation sampling and its weights, point-group reduction, neighbours.

Conventions (docs/ARCHITECTURE.md):

* A quaternion is a float array ``(..., 4)`` ``(q0, q1, q2, q3)``, scalar first, unit norm; ``q`` and ``-q``
  are the same rotation.
* :func:`quaternion_to_matrix` gives the usual *active* rotation matrix ``R(q)`` (``R(a ⊗ b) = R(a) R(b)``).
* The crystal-frame coordinates of a lab-frame vector in orientation ``q`` are
  ``q_crystal = crystal_from_lab(q) @ q_lab`` with ``crystal_from_lab(q) = R(q).T``; this is exactly the matrix
  that every program of the reference builds from a quaternion (METHOD.md §1), so the reference's
  quaternion files and candidate lists are used unchanged.

The sampling (METHOD.md §9.1) restates the construction of the reference's ``make-quaternion`` program in
vectorised numpy: same points, same half-sphere selection, same weights, and the reference's loop order
(vertex numbering, edge/face/cell order), so that index ``r`` of :func:`sample_600cell` ``(n)`` is meant to be
row ``r`` of the reference file ``c-quaternion<n>.bin`` (points and weights are tested against an
independent loop restatement; the order is restated from the C source but has not been compared with a
file written by the C program).

Everything here is numpy set-up code (float64) except :func:`quaternion_to_matrix` and
:func:`crystal_from_lab`, which also accept JAX arrays (and work under ``jit``) in the array's own dtype.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from emcjax.errors import ConfigError

__all__ = [
    "quaternion_to_matrix",
    "crystal_from_lab",
    "matrix_to_quaternion",
    "quaternion_multiply",
    "quaternion_conjugate",
    "misorientation_angle",
    "symmetric_misorientation",
    "nearest_rotations",
    "RotationSampling",
    "sample_600cell",
    "n_rotations_600cell",
    "reduce_by_point_group",
    "neighbours",
]

TAU = (1.0 + np.sqrt(5.0)) / 2.0
"""Golden ratio."""

COVERING_RADIUS_COEFF = 0.944
"""The reference's angular resolution ``0.944 / n`` rad of the n-refined sampling (METHOD.md §9.1). Measured
here, it is the covering radius (the largest misorientation between any rotation and its nearest sample:
0.927/n at n = 4, 0.942/n at n = 6); the mean nearest-neighbour misorientation between samples is ~1.28/n."""


# ----------------------------------------------------------------------------------------------------------
# Quaternion algebra
# ----------------------------------------------------------------------------------------------------------


def _namespace(x):
    return jnp if isinstance(x, jax.Array) else np


def quaternion_to_matrix(q):
    """Active rotation matrix of unit quaternions.

    Args:
        q: ``(..., 4)`` scalar-first unit quaternions (numpy or JAX array, any float dtype; JAX arrays and
            tracers are handled with ``jax.numpy`` so the function can be used inside ``jit``/``vmap``).

    Returns:
        ``(..., 3, 3)`` rotation matrices ``R(q)`` of the same array kind and dtype; ``R(q) @ v`` rotates
        ``v`` actively by the angle ``2 arccos(q0)`` about the axis ``(q1, q2, q3)``. ``R(q) == R(-q)``.
    """
    xp = _namespace(q)
    q = xp.asarray(q)
    q0, q1, q2, q3 = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = (
        (1 - 2 * (q2 * q2 + q3 * q3), 2 * (q1 * q2 - q0 * q3), 2 * (q1 * q3 + q0 * q2)),
        (2 * (q1 * q2 + q0 * q3), 1 - 2 * (q1 * q1 + q3 * q3), 2 * (q2 * q3 - q0 * q1)),
        (2 * (q1 * q3 - q0 * q2), 2 * (q2 * q3 + q0 * q1), 1 - 2 * (q1 * q1 + q2 * q2)),
    )
    return xp.stack([xp.stack(row, axis=-1) for row in rows], axis=-2)


def crystal_from_lab(q):
    """The reference program's matrix: crystal-frame coordinates of lab-frame vectors in orientation ``q``.

    ``q_crystal = crystal_from_lab(q) @ q_lab``; equal to ``swapaxes(quaternion_to_matrix(q), -1, -2)``,
    i.e. the element-by-element formula of METHOD.md §1.

    Args:
        q: ``(..., 4)`` scalar-first unit quaternions (numpy or JAX array).

    Returns:
        ``(..., 3, 3)`` matrices, same array kind and dtype as ``q``.
    """
    xp = _namespace(q)
    return xp.swapaxes(quaternion_to_matrix(q), -1, -2)


def matrix_to_quaternion(R) -> np.ndarray:
    """Unit quaternion of active rotation matrices (inverse of :func:`quaternion_to_matrix`).

    Shepperd's method (largest of the four candidate denominators), vectorised.

    Args:
        R: ``(..., 3, 3)`` proper rotation matrices (numpy, float64 used internally).

    Returns:
        ``(..., 4)`` float64 scalar-first unit quaternions with ``q0 >= 0`` (the sign is otherwise arbitrary
        only for 180° rotations, where ``q0 == 0``).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3):
        raise ConfigError(f"matrix_to_quaternion: expected an array of shape (..., 3, 3), got {R.shape}")
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    # candidates: 4 q_i^2 for i = 0..3
    cand = np.stack([1 + tr, 1 + 2 * m[:, 0, 0] - tr, 1 + 2 * m[:, 1, 1] - tr, 1 + 2 * m[:, 2, 2] - tr], axis=-1)
    best = np.argmax(cand, axis=-1)
    q = np.empty((m.shape[0], 4))
    # Off-diagonal combinations: 4 q0 qi and 4 qi qj.
    s21, s12 = m[:, 2, 1], m[:, 1, 2]
    s02, s20 = m[:, 0, 2], m[:, 2, 0]
    s10, s01 = m[:, 1, 0], m[:, 0, 1]
    combos = {
        0: (s21 - s12, s02 - s20, s10 - s01),  # 4 q0 q1, 4 q0 q2, 4 q0 q3
        1: (s21 - s12, s01 + s10, s02 + s20),  # 4 q1 q0, 4 q1 q2, 4 q1 q3
        2: (s02 - s20, s01 + s10, s12 + s21),  # 4 q2 q0, 4 q2 q1, 4 q2 q3
        3: (s10 - s01, s02 + s20, s12 + s21),  # 4 q3 q0, 4 q3 q1, 4 q3 q2
    }
    others = {0: (1, 2, 3), 1: (0, 2, 3), 2: (0, 1, 3), 3: (0, 1, 2)}
    for i in range(4):
        sel = best == i
        if not np.any(sel):
            continue
        qi = 0.5 * np.sqrt(np.maximum(cand[sel, i], 0.0))
        q[sel, i] = qi
        for k, c in zip(others[i], combos[i]):
            q[sel, k] = c[sel] / (4 * qi)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q.reshape(R.shape[:-2] + (4,))


def quaternion_multiply(a, b) -> np.ndarray:
    """Hamilton product ``a ⊗ b`` of scalar-first quaternions (broadcasting).

    ``quaternion_to_matrix(a ⊗ b) == quaternion_to_matrix(a) @ quaternion_to_matrix(b)``.

    Args:
        a: ``(..., 4)`` quaternions.
        b: ``(..., 4)`` quaternions, broadcast against ``a``.

    Returns:
        ``(..., 4)`` float64 product (not re-normalised).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a0, a1, a2, a3 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    b0, b1, b2, b3 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack(
        [
            a0 * b0 - a1 * b1 - a2 * b2 - a3 * b3,
            a0 * b1 + a1 * b0 + a2 * b3 - a3 * b2,
            a0 * b2 - a1 * b3 + a2 * b0 + a3 * b1,
            a0 * b3 + a1 * b2 - a2 * b1 + a3 * b0,
        ],
        axis=-1,
    )


def quaternion_conjugate(q) -> np.ndarray:
    """Conjugate (inverse rotation for unit quaternions) ``(q0, -q1, -q2, -q3)``; ``(..., 4)`` float64."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def misorientation_angle(a, b) -> np.ndarray:
    """Rotation angle of ``R(a)^T R(b)``, i.e. ``2 arccos(min(1, |a·b|))``, in radians, in ``[0, π]``.

    Handles ``q ≡ -q``. Evaluated in the numerically stable equivalent form
    ``4 atan2(|a - s b|, |a + s b|)`` with ``s = sign(a·b)`` (exact for unit quaternions, accurate also for
    tiny angles where ``arccos`` loses half the digits).

    Args:
        a: ``(..., 4)`` unit quaternions.
        b: ``(..., 4)`` unit quaternions, broadcast against ``a``.

    Returns:
        ``(...)`` float64 angles in radians.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    s = np.where(np.sum(a * b, axis=-1) < 0, -1.0, 1.0)[..., None]
    return 4.0 * np.arctan2(np.linalg.norm(a - s * b, axis=-1), np.linalg.norm(a + s * b, axis=-1))


# ----------------------------------------------------------------------------------------------------------
# Sampling container
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RotationSampling:
    """A discrete set of orientations with prior weights.

    Attributes:
        quaternions: ``(n_rot, 4)`` float64 unit quaternions, scalar first; one of ``±q`` per rotation
            (for :func:`sample_600cell`: the reference's half-sphere choice, not necessarily ``q0 >= 0``).
        log_weights: ``(n_rot,)`` float64, ``log w_r`` with ``sum_r w_r = 1`` (the E-step prior).
        n: refinement parameter of the 600-cell sampling (0 if the set does not come from it).
    """

    quaternions: np.ndarray
    log_weights: np.ndarray
    n: int = 0

    def __post_init__(self):
        q = np.asarray(self.quaternions)
        lw = np.asarray(self.log_weights)
        if q.ndim != 2 or q.shape[1] != 4:
            raise ConfigError(f"RotationSampling.quaternions: expected shape (n_rot, 4), got {q.shape}")
        if lw.shape != (q.shape[0],):
            raise ConfigError(
                f"RotationSampling.log_weights: expected shape ({q.shape[0]},) to match quaternions, got {lw.shape}"
            )

    @property
    def n_rot(self) -> int:
        """Number of rotations."""
        return int(self.quaternions.shape[0])

    @property
    def weights(self) -> np.ndarray:
        """``(n_rot,)`` float64 normalised weights ``exp(log_weights)``."""
        return np.exp(self.log_weights)

    def subset(self, indices) -> "RotationSampling":
        """The rotations ``indices`` (integer array or boolean mask), weights renormalised to sum 1.

        Args:
            indices: ``(k,)`` integer indices into ``0..n_rot-1`` or ``(n_rot,)`` boolean mask.

        Returns:
            A new :class:`RotationSampling` with the same ``n``.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_rot,):
                raise ConfigError(f"RotationSampling.subset: boolean mask of shape {idx.shape}, expected ({self.n_rot},)")
            idx = np.flatnonzero(idx)
        if idx.size == 0:
            raise ConfigError("RotationSampling.subset: empty selection, expected at least one rotation")
        lw = self.log_weights[idx]
        m = lw.max()
        lw = lw - (m + np.log(np.sum(np.exp(lw - m))))
        return RotationSampling(quaternions=self.quaternions[idx], log_weights=lw, n=self.n)


# ----------------------------------------------------------------------------------------------------------
# 600-cell
# ----------------------------------------------------------------------------------------------------------

# The 12 even permutations of 4 coordinates in the order the reference program applies them to
# (±τ/2, ±1/2, ±1/(2τ), 0) (component k of the vertex is entry perm[k] of that tuple). Keeping this order
# keeps the vertex numbering, hence the order of all sampled points, identical to the reference's files.
_EVEN_PERMS = np.array(
    [
        [0, 1, 2, 3], [0, 2, 3, 1], [0, 3, 1, 2], [1, 2, 0, 3], [1, 0, 3, 2], [1, 3, 2, 0],
        [2, 0, 1, 3], [2, 3, 0, 1], [2, 1, 3, 0], [3, 1, 0, 2], [3, 0, 2, 1], [3, 2, 1, 0],
    ]
)  # fmt: skip


def n_rotations_600cell(n: int) -> int:
    """Number of rotations of the n-refined 600-cell sampling, ``10 (5 n^3 + n)``."""
    return 10 * (5 * n**3 + n)


def _vertices_600cell() -> np.ndarray:
    """The 120 vertices of the 600-cell in the reference's order, in exact form.

    Returns:
        ``(120, 4, 2)`` float64 integers ``(a, b)`` such that component ``k`` of the vertex is
        ``(a + b τ) / 2`` (circumradius 1). Order: the 16 ``(±1/2)^4`` (signs of components 0..3 nested,
        component 0 outermost, minus first), the 8 ``±e_k`` (sign outer, minus first; k inner), then for the
        signs of (τ/2, 1/2, 1/(2τ)) (nested, minus first) the 12 even permutations of
        ``(±τ/2, ±1/2, ±1/(2τ), 0)``.
    """
    verts = []
    for signs in itertools.product((-1, 1), repeat=4):
        verts.append([[s, 0] for s in signs])
    for s in (-1, 1):
        for k in range(4):
            v = [[0, 0]] * 4
            v[k] = [2 * s, 0]
            verts.append(v)
    for si, sj, sk in itertools.product((-1, 1), repeat=3):
        # τ/2 = (0 + 1 τ)/2, 1/2 = (1 + 0 τ)/2, 1/(2τ) = (τ - 1)/2 = (-1 + 1 τ)/2
        base = [[0, si], [sj, 0], [-sk, sk], [0, 0]]
        for perm in _EVEN_PERMS:
            verts.append([base[p] for p in perm])
    return np.array(verts, dtype=np.float64)


def _exact_to_float(v_int: np.ndarray, denom: float) -> np.ndarray:
    """``(..., 4, 2)`` or ``(..., 8)`` exact ``(a, b)`` pairs -> ``(..., 4)`` float ``(a + τ b) / denom``."""
    v = v_int.reshape(v_int.shape[:-2] + (8,)) if v_int.shape[-2:] == (4, 2) else v_int
    return (v[..., 0::2] + TAU * v[..., 1::2]) / denom


@dataclasses.dataclass(frozen=True)
class _Polytope:
    vert_int: np.ndarray  # (120, 8) exact (a, b) pairs, value (a + b τ)/2
    vert: np.ndarray  # (120, 4) float
    edges: np.ndarray  # (720, 2) sorted vertex indices, lexicographic order
    faces: np.ndarray  # (1200, 3)
    cells: np.ndarray  # (600, 4)
    vertex_cell: np.ndarray  # (120,) index into cells
    edge_cell_vsum: np.ndarray  # (720, 4) vertex sum of the cell used for the edge's weights
    face_cell_vsum: np.ndarray  # (1200, 4)
    cell_vsum: np.ndarray  # (600, 4)


_POLYTOPE: _Polytope | None = None


def _polytope() -> _Polytope:
    """Vertices, edges, faces and cells of the 600-cell, numbered and ordered as the reference does.

    Edges/faces/cells are all sets of mutually adjacent vertices (adjacent = nearest-neighbour distance
    ``1/τ``), given as ascending vertex indices, in lexicographic order. The cell whose vertex sum ``v_c``
    enters the weight of a point is, as in the reference: for a vertex, the first cell (in cell order) that
    contains it; for a face, the face plus its smallest-index common neighbour; for an edge ``(e0, e1)``, the
    edge plus its smallest common neighbour ``c`` plus the smallest common neighbour of ``e0, e1, c`` above
    ``c``. (The weights do not depend on this choice: the cells around a vertex, edge or face are mapped
    onto each other by symmetries of the 600-cell that fix the vertex, edge or face pointwise.)
    """
    global _POLYTOPE
    if _POLYTOPE is not None:
        return _POLYTOPE
    vert_int = _vertices_600cell().reshape(120, 8)
    vert = _exact_to_float(vert_int, 2.0)
    d2 = np.sum((vert[:, None, :] - vert[None, :, :]) ** 2, axis=-1)
    np.fill_diagonal(d2, np.inf)
    adj = d2 < d2.min() + 1e-6
    idx = np.arange(120)

    ei, ej = np.nonzero(np.triu(adj))
    edges = np.stack([ei, ej], axis=1)
    fmask = adj[ei] & adj[ej] & (idx[None, :] > ej[:, None])
    fe, fk = np.nonzero(fmask)
    faces = np.concatenate([edges[fe], fk[:, None]], axis=1)
    cmask = adj[faces[:, 0]] & adj[faces[:, 1]] & adj[faces[:, 2]] & (idx[None, :] > faces[:, 2:3])
    cf, ck = np.nonzero(cmask)
    cells = np.concatenate([faces[cf], ck[:, None]], axis=1)
    assert edges.shape == (720, 2) and faces.shape == (1200, 3) and cells.shape == (600, 4)

    cell_vsum = vert[cells].sum(axis=1)
    # vertex -> first cell containing it
    vertex_cell = np.argmax(np.any(cells[None, :, :] == idx[:, None, None], axis=2), axis=1)
    # face -> face + smallest common neighbour
    common3 = adj[faces[:, 0]] & adj[faces[:, 1]] & adj[faces[:, 2]]
    f4 = np.argmax(common3, axis=1)
    face_cell_vsum = vert[faces].sum(axis=1) + vert[f4]
    # edge -> edge + smallest common neighbour c + smallest common neighbour of (e0, e1, c) above c
    common2 = adj[ei] & adj[ej]
    c2 = np.argmax(common2, axis=1)
    c3 = np.argmax(common2 & adj[c2] & (idx[None, :] > c2[:, None]), axis=1)
    edge_cell_vsum = vert[ei] + vert[ej] + vert[c2] + vert[c3]

    _POLYTOPE = _Polytope(
        vert_int=vert_int,
        vert=vert,
        edges=edges,
        faces=faces,
        cells=cells,
        vertex_cell=vertex_cell,
        edge_cell_vsum=edge_cell_vsum,
        face_cell_vsum=face_cell_vsum,
        cell_vsum=cell_vsum,
    )
    return _POLYTOPE


def _interior_lattice(dim: int, n: int) -> np.ndarray:
    """Integer barycentric weights of the interior lattice points of an n-subdivided simplex.

    Args:
        dim: simplex dimension (0 vertex, 1 edge, 2 triangle, 3 tetrahedron).
        n: number of subdivisions per edge.

    Returns:
        ``(n_points, dim + 1)`` int64 weights ``(n - j - k - m, j, k, m)`` (first ``dim + 1`` columns) with all
        ``j, k, m >= 1`` and ``j + k + m <= n - 1`` (strictly interior), ordered lexicographically in
        ``(j, k, m)`` (the reference's loop order). For ``dim == 0``: ``[[n]]``.
    """
    if dim == 0:
        return np.array([[n]], dtype=np.int64)
    if n - 1 < dim:
        return np.zeros((0, dim + 1), dtype=np.int64)
    g = np.indices((n,) * dim).reshape(dim, -1).T  # lexicographic
    g = g[np.all(g >= 1, axis=1) & (g.sum(axis=1) <= n - 1)]
    return np.concatenate([n - g.sum(axis=1, keepdims=True), g], axis=1).astype(np.int64)


def sample_600cell(n: int, *, chunk_points: int = 1 << 22) -> RotationSampling:
    """The reference's rotation sampling: the n-refined 600-cell, one of ±q, with its weights (METHOD.md §9.1).

    Construction: the 120 vertices of the 600-cell (circumradius 1); on the flat polytope, the ``n - 1``
    interior points of every edge, the ``(n-1)(n-2)/2`` interior points of every triangular face and the
    ``(n-1)(n-2)(n-3)/6`` interior points of every tetrahedral cell of the barycentric lattice with ``n``
    steps per edge. Every point is exact, ``v_k = (a_k + b_k τ) / (2n)`` with integers ``a_k, b_k``; its
    rotation is the radial projection ``v / |v|``. Of each pair ``±v`` the one whose first non-zero integer
    among ``(a0, b0, a1, b1, a2, b2, a3, b3)`` is positive is kept (the reference's half-sphere rule; note
    that it is not the sign of ``q0``). The (unnormalised) weight of a point ``v_q`` (unprojected) is
    ``w = f (v_q · v_c) / (|v_q|^4 |v_c|)``, ``v_c`` the vertex sum of a cell containing the point's
    vertex/edge/face/cell, ``f = 5/6`` for vertices, ``35/36`` for edge points, ``1`` otherwise. Returned
    log-weights are normalised (``sum exp = 1``).

    Order (identical to the reference's ``c-quaternion<n>`` files): vertices (reference vertex numbering,
    see ``_vertices_600cell``), then edge points (edges in lexicographic order of their sorted vertex indices,
    points from the lower-index vertex outwards), then face points (faces lexicographic; lattice steps
    ``j`` toward the 2nd vertex outer, ``k`` toward the 3rd inner), then cell points (likewise ``j, k, m``);
    each filtered by the half-sphere rule.

    Cost: O(n_rot) vectorised numpy, processed in chunks of ``chunk_points`` unfiltered points
    (~70 bytes each of temporaries); output 40 bytes per rotation (n = 70: 17.15 M rotations, ~690 MB).

    Args:
        n: refinement parameter, ``n >= 1``.
        chunk_points: maximum number of unfiltered points processed at once (memory/speed trade-off).

    Returns:
        :class:`RotationSampling` with ``10 (5 n^3 + n)`` rotations.

    Raises:
        ConfigError: ``n`` is not a positive integer.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"sample_600cell: n must be a positive integer, got {n!r}")
    n = int(n)
    poly = _polytope()
    n_rot = n_rotations_600cell(n)
    quats = np.empty((n_rot, 4), dtype=np.float64)
    weights = np.empty(n_rot, dtype=np.float64)
    pos = 0

    categories = [
        (np.arange(120)[:, None], poly.cell_vsum[poly.vertex_cell], 5.0 / 6.0),
        (poly.edges, poly.edge_cell_vsum, 35.0 / 36.0),
        (poly.faces, poly.face_cell_vsum, 1.0),
        (poly.cells, poly.cell_vsum, 1.0),
    ]
    for simplices, vsum, factor in categories:
        dim = simplices.shape[1] - 1
        bary = _interior_lattice(dim, n).astype(np.float64)  # (n_pts, dim+1)
        n_pts = bary.shape[0]
        if n_pts == 0:
            continue
        vsum_norm = np.linalg.norm(vsum, axis=1)
        step = max(1, chunk_points // n_pts)
        for s0 in range(0, simplices.shape[0], step):
            simp = simplices[s0 : s0 + step]
            # exact integer coordinates (float64 holds them exactly): (n_s, n_pts, 8), value (a + b τ)/(2n)
            p_int = np.matmul(bary[None], poly.vert_int[simp])
            nonzero = p_int != 0
            first = np.argmax(nonzero, axis=-1)
            keep = np.take_along_axis(p_int, first[..., None], axis=-1)[..., 0] > 0
            s_idx, p_idx = np.nonzero(keep)  # row-major: simplex outer, lattice point inner
            v_q = _exact_to_float(p_int[s_idx, p_idx], 2.0 * n)  # (m, 4)
            del p_int, nonzero, first, keep
            norm_q = np.linalg.norm(v_q, axis=1)
            v_c = vsum[s0 + s_idx]
            w = factor * np.einsum("ij,ij->i", v_q, v_c) / (norm_q**4 * vsum_norm[s0 + s_idx])
            m = v_q.shape[0]
            quats[pos : pos + m] = v_q / norm_q[:, None]
            weights[pos : pos + m] = w
            pos += m
    if pos != n_rot:  # pragma: no cover - construction invariant
        raise AssertionError(f"sample_600cell({n}): built {pos} rotations, expected {n_rot}")
    log_w = np.log(weights)
    log_w -= np.log(np.sum(weights))
    return RotationSampling(quaternions=quats, log_weights=log_w, n=n)


# ----------------------------------------------------------------------------------------------------------
# Point-group reduction
# ----------------------------------------------------------------------------------------------------------


def _canonical_sign(q: np.ndarray, tol: float) -> np.ndarray:
    """Flip ``q`` (..., 4) so that its first component with ``|x| > tol`` is positive."""
    big = np.abs(q) > tol
    first = np.argmax(big, axis=-1)
    lead = np.take_along_axis(q, first[..., None], axis=-1)
    return np.where(lead < 0, -q, q)


def reduce_by_point_group(
    sampling: RotationSampling | np.ndarray,
    rotation_ops_cartesian,
    *,
    tol: float = 1e-9,
    chunk: int = 1 << 20,
) -> np.ndarray:
    """Indices of the rotations in the fundamental zone of a point group.

    If the model has the point symmetry ``g`` (proper rotations acting on crystal-frame vectors), the
    orientation ``q`` and the orientation ``q'`` with ``crystal_from_lab(q') = g @ crystal_from_lab(q)``
    give identical frames; ``q' = q ⊗ conj(h_g)`` with ``h_g = matrix_to_quaternion(g)``. A rotation is kept
    iff it is the largest of its images ``{q ⊗ conj(h_g)}`` in the order "larger ``|q0|`` (smaller rotation
    angle) first, ties broken lexicographically on the sign-canonical quaternion (first component beyond
    ``tol`` positive), components compared with tolerance ``tol``". So of every orbit whose
    representative lies on the grid exactly that one rotation is kept.

    The 600-cell grid is not itself invariant under a crystallographic group (its images are generally off
    the grid), so this is a fundamental-zone *selection* of grid points, not a quotient of the grid: the
    result has ``≈ n_rot / n_ops`` rotations, and every rotation of the full grid is, after some group
    operation, within about one grid spacing of a kept rotation. Weights of kept rotations are unchanged
    (renormalise with ``sampling.subset(indices)``). Measured for 422: 1377 of 10860 rotations kept at
    n = 6, and every rotation has an image within 1.08/n (n = 6) and 1.12/n (n = 10) rad of a kept one.

    Cost: the primary key of the images is ``|q · h_g|`` (one matmul); only the near-ties go through the
    lexicographic comparison. n = 70 (17 M rotations) with 8 operations: ~9 s.

    Args:
        sampling: a :class:`RotationSampling` or ``(n_rot, 4)`` unit quaternions.
        rotation_ops_cartesian: ``(n_ops, 3, 3)`` proper rotation matrices acting on crystal-frame vectors
            (e.g. ``B @ M @ B^-1`` of the Laue operators with determinant +1), identity first.
        tol: tolerance for ties (components of unit quaternions).
        chunk: rotations processed at once.

    Returns:
        ``(n_kept,)`` int64 ascending indices into the sampling.

    Raises:
        ConfigError: the operators are not proper rotations of shape ``(n_ops, 3, 3)``.
    """
    q_all = sampling.quaternions if isinstance(sampling, RotationSampling) else np.asarray(sampling, np.float64)
    ops = np.asarray(rotation_ops_cartesian, dtype=np.float64)
    if ops.ndim != 3 or ops.shape[1:] != (3, 3) or ops.shape[0] < 1:
        raise ConfigError(f"reduce_by_point_group: rotation_ops_cartesian must have shape (n_ops, 3, 3), got {ops.shape}")
    orth_err = np.abs(ops @ np.swapaxes(ops, -1, -2) - np.eye(3)).max()
    dets = np.linalg.det(ops)
    if orth_err > 1e-6 or np.any(np.abs(dets - 1) > 1e-6):
        raise ConfigError(
            "reduce_by_point_group: rotation_ops_cartesian must be proper rotations (orthogonal, det +1); "
            f"got max |g g^T - 1| = {orth_err:.3g}, determinants {np.round(dets, 6).tolist()}"
        )
    h = matrix_to_quaternion(ops)  # (n_ops, 4)
    h_others = h[np.abs(h[:, 0]) < 1 - 1e-12]  # the non-identity operations
    h_conj = quaternion_conjugate(h)
    keep = np.ones(q_all.shape[0], dtype=bool)
    if h_others.shape[0] == 0:
        return np.flatnonzero(keep)
    for s in range(0, q_all.shape[0], chunk):
        q = q_all[s : s + chunk]
        # primary key: the scalar part of the image q ⊗ conj(h) is q · h
        own = np.abs(q[:, 0])
        best_other = np.max(np.abs(q @ h_others.T), axis=1)
        keep[s : s + chunk] = own > best_other + tol
        tie = np.flatnonzero(np.abs(own - best_other) <= tol)
        if tie.size:
            # ties in |q0|: lexicographic comparison of the sign-canonical images
            qt = q[tie]
            own_c = _canonical_sign(qt, tol)  # (m, 4)
            images = _canonical_sign(quaternion_multiply(qt[:, None, :], h_conj[None, :, :]), tol)  # (m, n_ops, 4)
            diff = images - own_c[:, None, :]
            big = np.abs(diff) > tol
            first = np.argmax(big, axis=-1)
            lead = np.take_along_axis(diff, first[..., None], axis=-1)[..., 0]
            beats = big.any(axis=-1) & (lead > 0)
            keep[s + tie] = ~beats.any(axis=1)
    return np.flatnonzero(keep)


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


# ----------------------------------------------------------------------------------------------------------
# Exact reduction of a grid by the symmetries it shares with the crystal
# ----------------------------------------------------------------------------------------------------------


def grid_symmetry_orbits(
    sampling: RotationSampling, rotation_ops_cartesian, *, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Orbits of the grid under the point-group operations that map the grid onto itself.

    :func:`reduce_by_point_group` selects a fundamental zone, which is right for orientations off the grid
    but drops grid orientations whose equivalent in the zone is not a grid point. This function is the
    exact alternative for EMC on a grid: it keeps the subgroup H of operations ``g`` whose images
    ``q ⊗ conj(h_g)`` of every grid point are grid points (for the 600-cell these are the operations shared
    with the binary icosahedral group, e.g. the three 2-folds of 222), and returns one representative
    (the smallest index) per orbit of H. Every grid orientation has the same likelihood as its
    representative, so the E-step over the representatives, with the summed prior weight of each orbit,
    gives exactly the posterior of the full grid.

    Args:
        sampling: the grid.
        rotation_ops_cartesian: ``(n_ops, 3, 3)`` proper rotations acting on crystal-frame vectors.
        tol: chord distance below which two unit quaternions are the same rotation.

    Returns:
        ``(representative, orbit)``: ``representative`` ``(n_rep,)`` int64 ascending grid indices, and
        ``orbit`` ``(n_rot,)`` int64 the position in ``representative`` of each grid rotation's orbit.
    """
    ops = np.asarray(rotation_ops_cartesian, dtype=np.float64)
    q = sampling.quaternions
    tree = cKDTree(q)
    images = [np.arange(q.shape[0])]
    for g in ops[1:]:
        h_conj = quaternion_conjugate(matrix_to_quaternion(g))
        img = quaternion_multiply(q, h_conj[None, :])
        d_pos, i_pos = tree.query(img)
        d_neg, i_neg = tree.query(-img)
        idx = np.where(d_pos <= d_neg, i_pos, i_neg)
        if np.all(np.minimum(d_pos, d_neg) <= tol):
            images.append(idx)
    smallest = np.min(np.stack(images), axis=0)
    representative, orbit = np.unique(smallest, return_inverse=True)
    return representative.astype(np.int64), orbit.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Misorientation modulo the crystal's rotation group
# ----------------------------------------------------------------------------------------------------------


def symmetric_misorientation(a, b, rotation_ops_cartesian) -> np.ndarray:
    """Smallest rotation angle between orientations ``a`` and ``b`` over the crystal's proper rotations.

    A crystal in orientation ``q`` looks the same as one in ``q ⊗ conj(h_g)`` for every proper rotation
    ``g`` of its Laue group (``crystal_from_lab`` becomes ``R_g @ crystal_from_lab(q)``), so two frames'
    orientations are related by symmetry iff this angle is ~0.

    Args:
        a: ``(..., 4)`` unit quaternions.
        b: ``(..., 4)`` unit quaternions, broadcast against ``a``.
        rotation_ops_cartesian: ``(n_ops, 3, 3)`` proper rotations acting on crystal-frame vectors
            (``Crystal.rotation_ops_cartesian``).

    Returns:
        ``(...)`` float64 angles in radians, in ``[0, π]``.
    """
    ops = np.asarray(rotation_ops_cartesian, dtype=np.float64)
    h_conj = quaternion_conjugate(matrix_to_quaternion(ops))  # (n_ops, 4)
    b_images = quaternion_multiply(np.asarray(b, np.float64)[..., None, :], h_conj)  # (..., n_ops, 4)
    return misorientation_angle(np.asarray(a, np.float64)[..., None, :], b_images).min(axis=-1)
