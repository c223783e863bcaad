"""The reference's rotation sampling: the n-refined 600-cell, one of ±q, with its weights; the container.

The sampling (METHOD.md §9.1) restates the construction of the reference's ``make-quaternion`` program in
vectorised numpy: same points, same half-sphere selection, same weights, and the reference's loop order
(vertex numbering, edge/face/cell order), so that index ``r`` of :func:`sample_600cell` ``(n)`` is meant to be
row ``r`` of the reference file ``c-quaternion<n>.bin`` (points and weights are tested against an
independent loop restatement; the order is restated from the C source but has not been compared with a
file written by the C program). Quaternion conventions: :mod:`emcjax.rotations`.

Everything here is numpy set-up code (float64).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from emcjax.errors import ConfigError

__all__ = [
    "COVERING_RADIUS_COEFF",
    "RotationSampling",
    "sample_600cell",
    "n_rotations_600cell",
]

TAU = (1.0 + np.sqrt(5.0)) / 2.0
"""Golden ratio."""

COVERING_RADIUS_COEFF = 0.944
"""The reference's angular resolution ``0.944 / n`` rad of the n-refined sampling (METHOD.md §9.1). Measured
here, it is the covering radius (the largest misorientation between any rotation and its nearest sample:
0.927/n at n = 4, 0.942/n at n = 6); the mean nearest-neighbour misorientation between samples is ~1.28/n."""


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


def exact_to_float(v_int: np.ndarray, denom: float) -> np.ndarray:
    """``(..., 4, 2)`` or ``(..., 8)`` exact ``(a, b)`` pairs -> ``(..., 4)`` float ``(a + τ b) / denom``."""
    v = v_int.reshape(v_int.shape[:-2] + (8,)) if v_int.shape[-2:] == (4, 2) else v_int
    return (v[..., 0::2] + TAU * v[..., 1::2]) / denom


@dataclasses.dataclass(frozen=True)
class Polytope600Cell:
    """Vertices, edges, faces and cells of the 600-cell (:func:`polytope_600cell`)."""

    vert_int: np.ndarray  # (120, 8) exact (a, b) pairs, value (a + b τ)/2
    vert: np.ndarray  # (120, 4) float
    edges: np.ndarray  # (720, 2) sorted vertex indices, lexicographic order
    faces: np.ndarray  # (1200, 3)
    cells: np.ndarray  # (600, 4)
    vertex_cell: np.ndarray  # (120,) index into cells
    edge_cell_vsum: np.ndarray  # (720, 4) vertex sum of the cell used for the edge's weights
    face_cell_vsum: np.ndarray  # (1200, 4)
    cell_vsum: np.ndarray  # (600, 4)


_POLYTOPE: Polytope600Cell | None = None


def polytope_600cell() -> Polytope600Cell:
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
    vert = exact_to_float(vert_int, 2.0)
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

    _POLYTOPE = Polytope600Cell(
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


def interior_lattice(dim: int, n: int) -> np.ndarray:
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
    poly = polytope_600cell()
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
        bary = interior_lattice(dim, n).astype(np.float64)  # (n_pts, dim+1)
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
            v_q = exact_to_float(p_int[s_idx, p_idx], 2.0 * n)  # (m, 4)
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
