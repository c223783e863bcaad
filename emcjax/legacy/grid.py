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


def _reference_reciprocal(real_basis: np.ndarray) -> np.ndarray:
    a, b, c = real_basis[:, 0], real_basis[:, 1], real_basis[:, 2]
    vol = abs(float(np.dot(np.cross(a, b), c)))
    return np.stack([np.cross(b, c) / vol, np.cross(c, a) / vol, np.cross(a, b) / vol], axis=1)


def reference_grid(real_basis: np.ndarray, r_min: float, r_max: float, vn: int, gw: float) -> ReferenceGrid:
    """The reference's hkl table and S_h (METHOD.md §4.2-4.3), in its orders.

    Boundary points at distance exactly gw are included (relative tolerance 1e-9, as emcjax's grid does).
    """
    rl = _reference_reciprocal(np.asarray(real_basis, np.float64))
    lens = np.linalg.norm(rl, axis=0)
    spacing = float(lens.min()) / vn
    box = [int(math.floor(r_max / x)) for x in lens]
    # grow the box while a lattice point on a face lies inside the sphere (oblique cells)
    for axis in range(3):
        while True:
            rng = [np.arange(-m, m + 1) for m in box]
            rng[axis] = np.array([-box[axis], box[axis]])
            g = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3) @ rl.T
            if np.any(np.einsum("ij,ij->i", g, g) < r_max**2):
                box[axis] += 1
            else:
                break
    rng = [np.arange(-m, m + 1) for m in box]
    hkl = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
    centre = (hkl @ rl.T) / spacing
    half_grid = int(math.ceil(r_max / spacing))
    ext = int(math.ceil(gw)) + 1
    cube = np.stack(np.meshgrid(*[np.arange(-ext, ext + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    # cheap pre-filter: only reflections whose sphere can touch the shell
    cn = np.linalg.norm(centre, axis=1) * spacing
    cand = np.flatnonzero((cn <= r_max + 2 * gw * spacing) & (cn >= r_min - 2 * gw * spacing))
    t = np.rint(centre[cand]).astype(np.int64)
    pts = t[:, None, :] + cube[None]  # (n, c, 3) x-major order
    d2 = np.sum((pts - centre[cand][:, None, :]) ** 2, axis=-1)
    inside = (d2 <= gw * gw * (1 + 1e-9)) & np.all(np.abs(pts) <= half_grid, axis=-1)
    r = np.linalg.norm(pts, axis=-1) * spacing
    ok = np.where(inside, (r >= r_min) & (r <= r_max), True).all(axis=1) & inside.any(axis=1)
    keep = cand[ok]
    inside = inside[ok]
    pts = pts[ok]
    counts = inside.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ReferenceGrid(spacing=spacing, hkl=hkl[keep].astype(np.int64), box=(box[0], box[1], box[2]),
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


def _interpolated_model(grid, ref: ReferenceGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    trilinear interpolation at emcjax's voxels (:func:`_interpolated_model`) is taken. So exporting the
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
    start, _ = _interpolated_model(grid, ref, values)
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

