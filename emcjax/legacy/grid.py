"""The reference's Cartesian voxel grid (METHOD.md §4.2-4.3) and models moved between it and emcjax's grid."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# The reference's voxel grid (METHOD.md §4.2-4.3)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceGrid:
    """Kept (non-partial) reflections and their voxel sets S_h on the reference's Cartesian grid.

    Attributes:
      spacing: δv = min|a*|/VN (1/Å).
      hkl: (n_hkl, 3) int64 kept reflections, lexicographic (the reference's hkl_table).
      box: (hmax, kmax, lmax) of the reference's hkl box (hkl-val.dat header).
      voxels: (n_vox_total, 3) int64 grid points g (voxel units), concatenated over hkl in S_h order.
      owner: (n_vox_total,) int64 row of ``hkl`` each voxel belongs to.
      offsets: (n_hkl + 1,) int64 CSR offsets of each reflection's voxels.
    """

    spacing: float
    hkl: np.ndarray
    box: tuple[int, int, int]
    voxels: np.ndarray
    owner: np.ndarray
    offsets: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.shape[0])


def c_round(x: np.ndarray) -> np.ndarray:
    """C's ``round``: half away from zero, exactly (x - trunc(x) is exact in floating point)."""
    x = np.asarray(x, np.float64)
    whole = np.trunc(x)
    return whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), 0.0)


def reference_reciprocal(real_basis: np.ndarray) -> np.ndarray:
    """``rlatt_vec`` (3x3, columns a*, b*, c*, 1/Å) from basis-vec.dat's columns a, b, c, with the reference's
    float64 operation order (low-res-emc/setup.c ``set_intens``; METHOD.md §1)."""
    basis = np.asarray(real_basis, np.float64)
    a, b, c = basis[:, 0], basis[:, 1], basis[:, 2]

    def cross(u, v):
        return np.array([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])

    ab = cross(a, b)
    volume = abs(((0.0 + ab[0] * c[0]) + ab[1] * c[1]) + ab[2] * c[2])
    rl = np.empty((3, 3))
    rl[:, 2] = ab / volume
    rl[:, 0] = cross(b, c) / volume
    rl[:, 1] = cross(c, a) / volume
    return rl


def lattice_points(rl: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    """rvec_i = ((rl[i][0]*h + rl[i][1]*k) + rl[i][2]*l) for (n, 3) hkl, summed left to right like the C."""
    h = hkl.astype(np.float64)
    return np.stack([((0.0 + rl[i, 0] * h[:, 0]) + rl[i, 1] * h[:, 1]) + rl[i, 2] * h[:, 2] for i in range(3)], axis=1)


def _sum_squares(v: np.ndarray) -> np.ndarray:
    return ((0.0 + v[..., 0] * v[..., 0]) + v[..., 1] * v[..., 1]) + v[..., 2] * v[..., 2]


def reference_grid(real_basis: np.ndarray, r_min: float, r_max: float, vn: int, gw: float) -> ReferenceGrid:
    """The reference's hkl table and S_h (METHOD.md §4.2-4.3), in its orders and with its float64 arithmetic.

    Every quantity is computed with the operations of low-res-emc/setup.c ``set_intens`` in the same order
    (numpy float64 gives the C program's bits), so points at distance exactly gw fall the same way: the
    reciprocal basis (:func:`reference_reciprocal`), ``min_rcell = sqrt(min_j sum_i rl[i][j]^2)``,
    ``rescale = VN / min_rcell``, the peak centre ``q_i = rvec_i * rescale``, ``t_i = round(q_i)`` (half away
    from zero), and for each offset o in the cube ``-(ceil(gw)+1)..ceil(gw)+1`` (x-major)
    ``d_i = (t_i + o_i) - q_i``, kept iff ``d_0^2 + d_1^2 + d_2^2 <= gw^2``, no tolerance. A reflection is
    partial (dropped) if a kept point has ``|t + o|^2 / rescale^2`` (integer numerator) above ``r_max^2`` or
    below ``r_min^2``.

    Args:
      real_basis: (3, 3) columns a, b, c in Å, the values of aux/basis-vec.dat.
      r_min, r_max: the reference's limits ``q_px * (1/wl/D)`` in 1/Å (squared here, as ``pow(x, 2)``).
      vn, gw: VN and gw.
    """
    rl = reference_reciprocal(real_basis)
    rmax2, rmin2 = float(r_max) * float(r_max), float(r_min) * float(r_min)
    norms = _sum_squares(rl.T)
    min_rcell = math.sqrt(float(norms.min()))
    box = [int(math.floor(math.sqrt(rmax2 / float(x)))) for x in norms]
    # grow the box while a lattice point on a face lies strictly inside the sphere (h faces first)
    while True:
        for axis in range(3):
            rng = [np.arange(-m, m + 1) for m in box]
            rng[axis] = np.array([-box[axis], box[axis]])
            faces = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
            if np.any(_sum_squares(lattice_points(rl, faces)) < rmax2):
                box[axis] += 1
                break
        else:
            break
    rescale = vn / min_rcell
    half_grid = int(math.ceil(math.sqrt(rmax2) / min_rcell * vn))  # (Nx - 1) / 2
    rng = [np.arange(-m, m + 1) for m in box]
    hkl = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
    centre = lattice_points(rl, hkl) * rescale  # voxel units
    # pre-filter: reflections whose sphere lies wholly outside [r_min, r_max] are partial for sure
    margin = (gw + 2.0) / rescale
    cn = np.sqrt(_sum_squares(centre)) / rescale
    cand = np.flatnonzero((cn <= math.sqrt(rmax2) + margin) & (cn >= math.sqrt(rmin2) - margin))
    q = centre[cand]
    t = c_round(q).astype(np.int64)
    ext = int(math.ceil(gw)) + 1
    cube = np.stack(np.meshgrid(*[np.arange(-ext, ext + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = t[:, None, :] + cube[None]  # (n, c, 3) integer grid points, x-major order
    diff = pts.astype(np.float64) - q[:, None, :]
    inside = _sum_squares(diff) <= gw * gw
    norm = np.sum(pts * pts, axis=-1).astype(np.float64) / (rescale * rescale)
    partial = np.any(inside & ((norm > rmax2) | (norm < rmin2)), axis=1)
    inside &= np.all(np.abs(pts) <= half_grid, axis=-1)
    ok = ~partial & inside.any(axis=1)
    keep = cand[ok]
    inside, pts = inside[ok], pts[ok]
    counts = inside.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ReferenceGrid(spacing=min_rcell / vn, hkl=hkl[keep].astype(np.int64), box=(box[0], box[1], box[2]),
                         voxels=pts[inside].astype(np.int64),
                         owner=np.repeat(np.arange(keep.shape[0]), counts).astype(np.int64),
                         offsets=offsets)


def _snap(x: np.ndarray) -> np.ndarray:
    r = np.rint(x)
    return np.where(np.abs(x - r) < 1e-7, r, x)


_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], np.int64)


def _encode(parts: list[np.ndarray], span: int) -> np.ndarray:
    key = np.zeros(parts[0].shape, np.int64)
    for p in parts:
        key = key * span + (p + span // 2)
    return key


def _reference_sampling(grid, ref: ReferenceGrid) -> tuple[np.ndarray, np.ndarray]:
    """The linear map from emcjax's model to the reference's voxels: (columns, weights), each (n_ref, 8).

    Row r is reference voxel r (finish_intensity.bin order); its value is sum_k weights[r, k] *
    flat[columns[r, k]] with ``flat`` the asymmetric-unit model raveled, column ``n_asu * n_voxels`` (the
    zero sentinel) for corners outside the support and for reflections emcjax does not model. W is evaluated
    like ``emcjax.model.slice_points`` (trilinear on the lattice-aligned grid, corners outside the support
    dropped) but in float64 and with the reflection fixed to the voxel's own h (so a voxel at exactly the
    support radius is not lost to rounding).
    """
    full_to_asu = grid.full_to_asu()
    n_vox = grid.n_voxels
    sentinel = grid.n_asu * n_vox
    span = 2 * int(np.abs(grid.hkl).max() + np.abs(ref.hkl).max() + 2) + 1
    our_keys = _encode([grid.hkl[:, 0], grid.hkl[:, 1], grid.hkl[:, 2]], span)
    order = np.argsort(our_keys)
    ref_keys = _encode([ref.hkl[:, 0], ref.hkl[:, 1], ref.hkl[:, 2]], span)
    at = np.clip(np.searchsorted(our_keys[order], ref_keys), 0, len(order) - 1)
    ours_of_ref = np.where(our_keys[order][at] == ref_keys, order[at], -1)
    refl = ours_of_ref[ref.owner]
    q = ref.voxels * ref.spacing  # crystal frame, 1/Å
    frac = q @ np.linalg.inv(grid.crystal.reciprocal_basis).T
    local = _snap(grid.divisions * (frac - ref.hkl[ref.owner]))
    base = np.floor(local).astype(np.int64)
    t = local - base
    off_span = 2 * int(np.abs(grid.offsets).max() + 3) + 1
    off_keys = _encode([grid.offsets[:, i].astype(np.int64) for i in range(3)], off_span)
    off_order = np.argsort(off_keys)
    columns = np.empty((ref.n_voxels, 8), np.int64)
    weights = np.empty((ref.n_voxels, 8))
    for k, c in enumerate(_CORNERS):
        corner = base + c
        key = _encode([corner[:, i] for i in range(3)], off_span)
        pos = np.clip(np.searchsorted(off_keys[off_order], key), 0, n_vox - 1)
        j = np.where(off_keys[off_order][pos] == key, off_order[pos], n_vox)
        columns[:, k] = np.where(refl >= 0, full_to_asu[np.maximum(refl, 0), j], sentinel)
        weights[:, k] = np.prod(np.where(c == 1, t, 1.0 - t), axis=1)
    return columns, weights


def model_to_reference(grid, intensity: np.ndarray, ref: ReferenceGrid) -> np.ndarray:
    """emcjax's model W(q) at every reference voxel (float64, in finish_intensity.bin order).

    Reflections emcjax does not model (systematic absences, reflections its non-partial rule drops) get 0.
    """
    flat = np.append(np.asarray(intensity, np.float64).ravel(), 0.0)
    columns, weights = _reference_sampling(grid, ref)
    return np.sum(weights * flat[columns], axis=1)


def interpolated_model(grid, ref: ReferenceGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's model W(q) at emcjax's voxels, averaged over symmetry mates.

    For every reflection h of ``grid.hkl`` that the reference also holds and every voxel j, W is the
    reference's trilinear interpolation (METHOD.md §5.2: corners outside S_h dropped, no renormalisation) at
    G_h + offset_j; the value lands on the asymmetric-unit voxel that (h, j) shows, averaged over the mates.

    Returns:
      ((n_asu, n_voxels) float64 model, (n_asu, n_voxels) int64 number of mates averaged; 0 = no data, 0).
    """
    values = np.asarray(values, np.float64)
    span = 2 * int(np.abs(grid.hkl).max() + np.abs(ref.hkl).max() + 2) + 1
    ref_keys = _encode([ref.hkl[:, i] for i in range(3)], span)  # sorted: lexicographic hkl
    our_keys = _encode([grid.hkl[:, i] for i in range(3)], span)
    at = np.clip(np.searchsorted(ref_keys, our_keys), 0, len(ref_keys) - 1)
    ref_of_ours = np.where(ref_keys[at] == our_keys, at, -1)
    hs = np.flatnonzero(ref_of_ours >= 0)
    n_vox = grid.n_voxels
    h_idx = np.repeat(hs, n_vox)
    j_idx = np.tile(np.arange(n_vox), hs.shape[0])
    q = (grid.hkl[h_idx] + grid.offsets[j_idx] / grid.divisions) @ grid.crystal.reciprocal_basis.T
    u = _snap(q / ref.spacing)
    base = np.floor(u).astype(np.int64)
    t = u - base
    vspan = 2 * int(max(np.abs(ref.voxels).max(), np.abs(base).max()) + 3) + 1
    vox_keys = ref.owner * vspan**3 + _encode([ref.voxels[:, i] for i in range(3)], vspan)
    vorder = np.argsort(vox_keys)
    sorted_keys = vox_keys[vorder]
    owner = ref_of_ours[h_idx]
    value = np.zeros(h_idx.shape[0])
    for c in _CORNERS:
        corner = base + c
        key = owner * vspan**3 + _encode([corner[:, i] for i in range(3)], vspan)
        pos = np.clip(np.searchsorted(sorted_keys, key), 0, len(vorder) - 1)
        hit = sorted_keys[pos] == key
        w = np.prod(np.where(c == 1, t, 1.0 - t), axis=1)
        value += np.where(hit, w * values[vorder[pos]], 0.0)
    target = grid.full_to_asu()[h_idx, j_idx]
    size = grid.n_asu * n_vox
    total = np.bincount(target, weights=value, minlength=size)[:size]
    count = np.bincount(target, minlength=size)[:size]
    model = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return model.reshape(grid.model_shape), count.reshape(grid.model_shape)


def reference_to_model(grid, ref: ReferenceGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The emcjax model whose reference-voxel values (:func:`model_to_reference`) best match ``values``.

    Least squares over every reference voxel of every symmetry mate, solved per unique reflection (the map is
    block diagonal: a reference voxel only sees its own reflection's profile). Where the reference's voxels
    do not determine emcjax's (grids that do not coincide), the solution closest to the reference's own
    trilinear interpolation at emcjax's voxels (:func:`interpolated_model`) is taken. So exporting the
    imported model reproduces the file exactly (up to rounding) whenever it came from an emcjax export, and
    on grids that coincide the model itself comes back exactly. Voxels no reference voxel sees keep the
    interpolated value.

    Returns:
      ((n_asu, n_voxels) float64 model, (n_asu, n_voxels) int64 number of reference voxels that see each voxel).
    """
    values = np.asarray(values, np.float64)
    columns, weights = _reference_sampling(grid, ref)
    n_asu, n_vox = grid.model_shape
    live = columns < n_asu * n_vox
    weights = np.where(live, weights, 0.0)
    has = np.any(live & (weights > 0), axis=1)
    start, _ = interpolated_model(grid, ref, values)
    columns, weights, values = columns[has], weights[has], values[has]
    block = columns[np.arange(columns.shape[0]), np.argmax(live[has], axis=1)] // n_vox  # one reflection per row
    j = np.where(columns < n_asu * n_vox, columns % n_vox, 0)
    normal = np.zeros((n_asu, n_vox, n_vox))
    rhs = np.zeros((n_asu, n_vox))
    np.add.at(normal, (block[:, None, None], j[:, :, None], j[:, None, :]), weights[:, :, None] * weights[:, None, :])
    np.add.at(rhs, (block[:, None], j), weights * values[:, None])
    count = np.zeros((n_asu, n_vox), np.int64)
    np.add.at(count, (block[:, None], j), (weights > 0).astype(np.int64))
    residual = rhs - np.einsum("aij,aj->ai", normal, start)
    model = start + np.einsum("aij,aj->ai", np.linalg.pinv(normal, rcond=1e-10, hermitian=True), residual)
    return model, count

