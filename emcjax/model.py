"""The intensity model: voxel profiles around every reflection, and slicing it with the Ewald sphere.

The 3D intensity W(q) is non-zero only inside small spheres (radius ``radius`` in 1/Å) around the
reciprocal-lattice nodes kept by :func:`make_grid`; inside each sphere the peak profile is free and sampled
on a grid aligned with the reciprocal lattice (``divisions`` points per reciprocal axis, see
docs/ARCHITECTURE.md "Voxel grid"). Every reflection has the same set of integer voxel ``offsets``, so the
model is one dense array

    intensity: (n_asu, n_voxels) float32   photons per unit polarization factor per unit phi

over the asymmetric unit; reflection ``h`` (a mate ``M_g @ hkl_a`` of unique reflection ``a``) reads voxel
``j`` from ``intensity[a, perm[g, j]]``. That map is stored flat (``ReciprocalGrid.full_to_asu``) so that
slicing gathers directly from the asymmetric unit and back-projection scatters directly into it: symmetry
costs nothing at run time.

A detector pixel at crystal-frame q samples the model by trilinear interpolation (METHOD.md §5.2): the pixel
belongs to reflection h iff |q - B hkl_h| <= radius; the 8 grid corners around it contribute with
trilinear weights, corners outside the support are dropped without renormalisation.

For one orientation the pixels inside any peak are its *in-peak entries* (pixel, reflection, 8 voxel
indices, 8 weights). They depend on geometry only, are built once per run on the device
(:func:`build_entries`, which tests every pixel, or :func:`build_entries_by_reflection`, which tests only
the pixels around the projections of the reflections near the Ewald sphere; same result), and make a
tomogram (the model sliced at every in-peak pixel of every rotation) a single gather (:func:`tomogram`); the
expected Bragg signal of a rotation is a segment sum (:func:`expected_signal`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.crystal import AsymmetricUnit, Crystal, asymmetric_unit, lattice_grid_divisions, reflections
from emcjax.errors import ConfigError
from emcjax.rotations import crystal_from_lab

# Full float32 matrix products: accelerators may otherwise use reduced-precision (e.g. TF32) products, whose
# ~5e-4 relative error would move pixels across peak boundaries.
_EXACT = jax.lax.Precision.HIGHEST

# The 8 corners of a grid cell, (8, 3) int, in the order (dx, dy, dz) = (0,0,0), (0,0,1), ..., (1,1,1).
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int32)


class GridTables(NamedTuple):
    """Device arrays needed by the slicing kernels (a pytree).

    Attributes:
      frac_from_q: (3, 3) float32, B^-1: fractional hkl of a crystal-frame q (1/Å).
      q_from_frac: (3, 3) float32, B: crystal-frame q (1/Å) of fractional hkl.
      divisions: (3,) float32, grid points per reciprocal axis.
      radius_sq: () float32, squared support radius (1/Å^2).
      hkl_min: (3,) int32, smallest h, k, l of the reflection lookup box.
      refl_lookup: (nh, nk, nl) int32, index of reflection (h, k, l) in ``ReciprocalGrid.hkl`` or -1.
      box_min: (3,) int32, smallest voxel offset represented in ``box_lookup``.
      box_lookup: (bx, by, bz) int32, voxel index of an integer offset, or n_voxels outside the support.
      full_to_asu: (n_refl, n_voxels + 1) int32, flat index into the padded asymmetric-unit model of
        voxel j of reflection h; column n_voxels (outside the support) points at the zero sentinel.
      stabilizer: (n_asu, n_ops, n_voxels) int32, for each Laue operator g that maps unique reflection a
        onto itself the flat index of voxel ``perm[g, j]`` of a, else the zero sentinel (see
        :func:`stabilizer_sum`).
    """

    frac_from_q: jax.Array
    q_from_frac: jax.Array
    divisions: jax.Array
    radius_sq: jax.Array
    hkl_min: jax.Array
    refl_lookup: jax.Array
    box_min: jax.Array
    box_lookup: jax.Array
    full_to_asu: jax.Array
    stabilizer: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ReciprocalGrid:
    """Where the model lives: reflections, their asymmetric unit and the voxel offsets of every peak.

    Attributes:
      crystal: the crystal (cell, space group).
      hkl: (n_refl, 3) int32, every reflection whose whole peak sphere lies in [q_min, q_max].
      asu: asymmetric-unit map of ``hkl`` (``asu.hkl`` are the rows of the model).
      divisions: (3,) int, grid points per reciprocal axis.
      offsets: (n_voxels, 3) int32, integer grid offsets of a peak's voxels (same for every reflection).
      radius: support radius of a peak in 1/Å (``gw * min|a*| / vn``).
      perm: (n_ops, n_voxels) int32, ``perm[g, j]``: the voxel of the representative that voxel j of
        a mate ``M_g @ hkl_a`` shows.
      q_min, q_max: the shell in 1/Å the reflections were selected from.
    """

    crystal: Crystal
    hkl: np.ndarray
    asu: AsymmetricUnit
    divisions: np.ndarray
    offsets: np.ndarray
    radius: float
    perm: np.ndarray
    q_min: float
    q_max: float

    @property
    def n_refl(self) -> int:
        return int(self.hkl.shape[0])

    @property
    def n_asu(self) -> int:
        return int(self.asu.hkl.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def model_shape(self) -> tuple[int, int]:
        """Shape of the intensity array: (n_asu, n_voxels)."""
        return (self.n_asu, self.n_voxels)

    def voxel_q(self) -> np.ndarray:
        """(n_voxels, 3) float64 crystal-frame q offset (1/Å) of each voxel from its peak centre."""
        return (self.offsets / self.divisions) @ self.crystal.reciprocal_basis.T

    def full_to_asu(self) -> np.ndarray:
        """(n_refl, n_voxels + 1) int32 flat asymmetric-unit index; last column is the zero sentinel."""
        flat = self.asu.index[:, None] * self.n_voxels + self.perm[self.asu.op]
        sentinel = np.full((self.n_refl, 1), self.n_asu * self.n_voxels)
        return np.concatenate([flat, sentinel], axis=1).astype(np.int32)

    def stabilizer(self) -> np.ndarray:
        """(n_asu, n_ops, n_voxels) int32 flat voxel indices under each operator of a reflection's stabilizer.

        A reflection on a symmetry element (e.g. hk0 under 4/mmm) is mapped onto itself by some operators;
        its profile must be invariant under them: I[a, j] == I[a, perm[g, j]]. Entries for operators outside
        the stabilizer point at the zero sentinel.
        """
        hkl = self.asu.hkl
        images = np.einsum("gij,aj->agi", self.crystal.laue_ops, hkl)
        fixed = np.all(images == hkl[:, None, :], axis=-1)  # (n_asu, n_ops)
        flat = np.arange(self.n_asu)[:, None, None] * self.n_voxels + self.perm[None, :, :]
        return np.where(fixed[:, :, None], flat, self.n_asu * self.n_voxels).astype(np.int32)

    @functools.cached_property
    def tables(self) -> GridTables:
        """Device lookup tables for the kernels (computed once)."""
        hkl_min = self.hkl.min(axis=0)
        extent = self.hkl.max(axis=0) - hkl_min + 1
        refl_lookup = np.full(extent, -1, dtype=np.int32)
        refl_lookup[tuple((self.hkl - hkl_min).T)] = np.arange(self.n_refl, dtype=np.int32)
        box_min = self.offsets.min(axis=0) - 1
        box_extent = self.offsets.max(axis=0) + 2 - box_min + 1
        box_lookup = np.full(box_extent, self.n_voxels, dtype=np.int32)
        box_lookup[tuple((self.offsets - box_min).T)] = np.arange(self.n_voxels, dtype=np.int32)
        basis = self.crystal.reciprocal_basis
        return GridTables(
            frac_from_q=jnp.asarray(np.linalg.inv(basis), jnp.float32),
            q_from_frac=jnp.asarray(basis, jnp.float32),
            divisions=jnp.asarray(self.divisions, jnp.float32),
            radius_sq=jnp.asarray(self.radius**2, jnp.float32),
            hkl_min=jnp.asarray(hkl_min, jnp.int32),
            refl_lookup=jnp.asarray(refl_lookup),
            box_min=jnp.asarray(box_min, jnp.int32),
            box_lookup=jnp.asarray(box_lookup),
            full_to_asu=jnp.asarray(self.full_to_asu()),
            stabilizer=jnp.asarray(self.stabilizer()),
        )


def make_grid(crystal: Crystal, d_min: float, d_max: float, vn: int = 10, gw: float = 2.0) -> ReciprocalGrid:
    """Builds the reflections and voxel grid of a model to resolution ``d_min``.

    Args:
      crystal: cell and space group.
      d_min: high-resolution limit in Å (pixels and peaks beyond 1/d_min are not modelled).
      d_max: low-resolution limit in Å (the beam stop; ``inf`` for none).
      vn: grid points per shortest reciprocal-lattice vector (the reference's ``VN``).
      gw: support radius of a peak in units of the grid spacing min|a*|/vn (the reference's ``gw``).

    Returns:
      The grid. A reflection is kept only if its whole support sphere lies in [1/d_max, 1/d_min] (the
      reference's non-partial rule), and systematic absences are left out.

    Raises:
      ConfigError: a non-positive ``vn`` or ``gw``, or a ``gw`` so large that neighbouring peaks overlap.
    """
    if vn < 1:
        raise ConfigError(f"vn must be a positive integer, got vn={vn}")
    if not gw > 0:
        raise ConfigError(f"gw must be positive (grid spacings), got gw={gw}")
    basis = crystal.reciprocal_basis
    lengths = np.linalg.norm(basis, axis=0)
    radius = gw * lengths.min() / vn
    if 2 * radius >= lengths.min():
        raise ConfigError(
            f"gw={gw} with vn={vn} makes peaks of radius {radius:.3g} 1/Å that overlap their neighbours "
            f"(shortest reciprocal vector {lengths.min():.3g} 1/Å); use gw < vn/2"
        )
    real_lengths = np.linalg.norm(crystal.real_basis, axis=0)
    if np.max(radius * real_lengths) >= 0.5:
        raise ConfigError(
            f"gw={gw} with vn={vn} is too large for this oblique cell: a peak sphere spans more than half a "
            "lattice spacing along some reciprocal axis; lower gw or raise vn"
        )
    q_min = 0.0 if not np.isfinite(d_max) else 1.0 / d_max
    q_max = 1.0 / d_min
    hkl = reflections(crystal, d_min=d_min, d_max=d_max, margin=radius)
    if hkl.shape[0] == 0:
        raise ConfigError(f"no reflection of cell {crystal.cell} lies between d_max={d_max} Å and d_min={d_min} Å")
    asu = asymmetric_unit(crystal, hkl)
    divisions = np.asarray(lattice_grid_divisions(crystal, vn), dtype=np.int64)

    # Integer offsets o with |B diag(N)^-1 o| <= radius; the extent along axis i is radius * |a_i| * N_i.
    half = np.ceil(radius * real_lengths * divisions).astype(int)
    axes = [np.arange(-m, m + 1) for m in half]
    box = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    dq = (box / divisions) @ basis.T
    offsets = box[np.einsum("ij,ij->i", dq, dq) <= radius**2 * (1 + 1e-9)].astype(np.int32)

    # Voxel j of mate M @ hkl_a shows the representative's voxel at offset D M^-1 D^-1 o_j.
    index_of = {tuple(o): j for j, o in enumerate(offsets.tolist())}
    ops = crystal.laue_ops
    perm = np.empty((ops.shape[0], offsets.shape[0]), dtype=np.int32)
    for g, m in enumerate(ops):
        conj = np.diag(divisions) @ np.linalg.inv(m) @ np.diag(1.0 / divisions)
        mapped = np.rint(offsets @ conj.T).astype(int)
        try:
            perm[g] = [index_of[tuple(o)] for o in mapped.tolist()]
        except KeyError as err:  # pragma: no cover - lattice_grid_divisions guarantees closure
            raise ConfigError(f"voxel offsets are not closed under Laue operator {g}: {m.tolist()}") from err
    return ReciprocalGrid(
        crystal=crystal,
        hkl=hkl,
        asu=asu,
        divisions=divisions,
        offsets=offsets,
        radius=float(radius),
        perm=perm,
        q_min=q_min,
        q_max=q_max,
    )


# ---------------------------------------------------------------------------------------------------------
# Kernels (one point; lifted with vmap)
# ---------------------------------------------------------------------------------------------------------


def _nearest_reflection(q_crystal: jax.Array, tables: GridTables) -> tuple[jax.Array, jax.Array]:
    """Reflection whose support contains ``q_crystal`` (3,) 1/Å: (index or -1, fractional coords (3,))."""
    frac = jnp.matmul(tables.frac_from_q, q_crystal, precision=_EXACT)
    hkl = jnp.round(frac)
    delta = q_crystal - jnp.matmul(tables.q_from_frac, hkl, precision=_EXACT)
    inside = jnp.dot(delta, delta) <= tables.radius_sq
    idx = hkl.astype(jnp.int32) - tables.hkl_min
    shape = jnp.asarray(tables.refl_lookup.shape, jnp.int32)
    in_box = jnp.all((idx >= 0) & (idx < shape))
    refl = tables.refl_lookup[tuple(jnp.clip(idx, 0, shape - 1))]
    return jnp.where(inside & in_box, refl, -1), frac


def locate(q_crystal: jax.Array, tables: GridTables) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Trilinear stencil of one crystal-frame point.

    Args:
      q_crystal: (3,) float32 crystal-frame q in 1/Å.
      tables: the grid's device tables.

    Returns:
      ``(refl, voxels, weights)``: reflection index (-1 when the point is in no peak), (8,) int32 flat
      indices into the padded asymmetric-unit model (:func:`pad_model`), (8,) float32 trilinear weights
      (zero for corners outside the support and for points in no peak).
    """
    refl, frac = _nearest_reflection(q_crystal, tables)
    local = tables.divisions * (frac - jnp.round(frac))  # grid units from the peak centre
    base = jnp.floor(local)
    t = local - base
    corners = base.astype(jnp.int32)[None, :] + jnp.asarray(_CORNERS) - tables.box_min  # (8, 3)
    box_shape = jnp.asarray(tables.box_lookup.shape, jnp.int32)
    corners = jnp.clip(corners, 0, box_shape - 1)
    vox = tables.box_lookup[corners[:, 0], corners[:, 1], corners[:, 2]]  # (8,) voxel index or n_voxels
    voxels = tables.full_to_asu[jnp.maximum(refl, 0), vox]
    c = jnp.asarray(_CORNERS, jnp.float32)
    weights = jnp.prod(c * t + (1 - c) * (1 - t), axis=1)
    n_vox = tables.full_to_asu.shape[1] - 1
    weights = jnp.where((vox < n_vox) & (refl >= 0), weights, 0.0)
    return refl, voxels, weights


def stabilizer_sum(values: jax.Array, tables: GridTables) -> jax.Array:
    """Sum of (n_asu, n_voxels) per-voxel values over each reflection's stabilizer.

    The M-steps accumulate numerators and denominators per voxel through one operator per reflection;
    summing both over the stabilizer before dividing makes the update invariant under the operators that
    fix a reflection (the asymmetric-unit storage takes care of all others).
    """
    return pad_model(values)[tables.stabilizer].sum(axis=1)


def symmetrize(intensity: jax.Array, tables: GridTables) -> jax.Array:
    """Projects a model onto the symmetric ones: each profile averaged over its reflection's stabilizer."""
    order = (tables.stabilizer[:, :, 0] < intensity.size).sum(axis=1)
    return stabilizer_sum(intensity, tables) / order[:, None].astype(intensity.dtype)


def pad_model(intensity: jax.Array) -> jax.Array:
    """Flattens (n_asu, n_voxels) intensity and appends the zero sentinel: (n_asu*n_voxels + 1,)."""
    return jnp.concatenate([intensity.reshape(-1), jnp.zeros((1,), intensity.dtype)])


@jax.jit
def slice_points(intensity: jax.Array, q_crystal: jax.Array, tables: GridTables) -> jax.Array:
    """Model value W(q) at arbitrary crystal-frame points.

    Args:
      intensity: (n_asu, n_voxels) float32 model.
      q_crystal: (..., 3) float32 points in 1/Å.
      tables: grid tables.

    Returns:
      (...,) float32 W, zero outside every peak.
    """
    flat = pad_model(intensity)
    pts = q_crystal.reshape(-1, 3)
    _, voxels, weights = jax.vmap(locate, in_axes=(0, None))(pts, tables)
    return jnp.sum(weights * flat[voxels], axis=1).reshape(q_crystal.shape[:-1])


# ---------------------------------------------------------------------------------------------------------
# In-peak entries of a set of rotations
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entries:
    """In-peak pixel entries of a set of rotations, flat and sorted by rotation.

    Attributes:
      rotation: (n_entries,) int32 local rotation index (0..n_rot-1, position in the quaternion list given).
      pixel: (n_entries,) int32 valid-pixel index.
      voxels: (n_entries, 8) int32 flat indices into the padded asymmetric-unit model.
      weights: (n_entries, 8) float32 trilinear weights.
      n_rot: number of rotations.
    """

    rotation: jax.Array
    pixel: jax.Array
    voxels: jax.Array
    weights: jax.Array
    n_rot: int

    @property
    def n_entries(self) -> int:
        return int(self.rotation.shape[0])


jax.tree_util.register_dataclass(
    Entries, data_fields=["rotation", "pixel", "voxels", "weights"], meta_fields=["n_rot"]
)


@jax.jit
def _classify(quaternions: jax.Array, q_lab: jax.Array, tables: GridTables) -> jax.Array:
    """(n_rot_chunk, n_pix) int32 reflection index of every (rotation, pixel), -1 outside all peaks."""
    rot = crystal_from_lab(quaternions)  # (r, 3, 3)
    q_crystal = jnp.einsum("rij,pj->rpi", rot, q_lab, precision=_EXACT)
    refl, _ = jax.vmap(jax.vmap(_nearest_reflection, in_axes=(0, None)), in_axes=(0, None))(q_crystal, tables)
    return refl


@jax.jit
def _stencils(quaternions, rotation, pixel, q_lab, tables):
    rot = crystal_from_lab(quaternions)[rotation]
    q_crystal = jnp.einsum("eij,ej->ei", rot, q_lab[pixel], precision=_EXACT)
    _, voxels, weights = jax.vmap(locate, in_axes=(0, None))(q_crystal, tables)
    return voxels, weights


def build_entries(
    grid: ReciprocalGrid, q_lab: np.ndarray, quaternions: np.ndarray, *, chunk: int = 64
) -> Entries:
    """In-peak entries of every rotation, computed on the device in chunks of rotations.

    Args:
      grid: the model grid.
      q_lab: (n_pix, 3) lab-frame pixel q in 1/Å (the detector's valid pixels).
      quaternions: (n_rot, 4) orientations (scalar first).
      chunk: rotations per device call (bounds memory at chunk x n_pix).

    Returns:
      The entries, sorted by rotation then pixel.
    """
    tables = grid.tables
    q_dev = jnp.asarray(q_lab, jnp.float32)
    quats = jnp.asarray(quaternions, jnp.float32)
    n_rot = int(quaternions.shape[0])
    rotation, pixel = [], []
    for start in range(0, n_rot, chunk):
        block = quats[start : start + chunk]
        if block.shape[0] < chunk:  # keep one compiled shape
            block = jnp.concatenate([block, jnp.tile(block[:1], (chunk - block.shape[0], 1))])
        refl = np.asarray(_classify(block, q_dev, tables))[: min(chunk, n_rot - start)]
        r, p = np.nonzero(refl >= 0)
        rotation.append(r.astype(np.int32) + start)
        pixel.append(p.astype(np.int32))
    rotation = np.concatenate(rotation)
    pixel = np.concatenate(pixel)
    return _entries_from_pairs(rotation, pixel, quats, q_dev, tables, n_rot)


def _entries_from_pairs(rotation, pixel, quats, q_dev, tables, n_rot) -> Entries:
    """Entries of sorted (rotation, pixel) pairs (host int32 arrays): trilinear stencils on the device."""
    voxels, weights = [], []
    step = 1 << 18
    for start in range(0, rotation.shape[0], step):
        r = rotation[start : start + step]
        p = pixel[start : start + step]
        # padded to one of few lengths (the power of two above, below ``step``): few compiled shapes
        pad = (step if rotation.shape[0] > step else 1 << max(r.shape[0] - 1, 0).bit_length()) - r.shape[0]
        v, w = _stencils(quats, jnp.asarray(np.pad(r, (0, pad))), jnp.asarray(np.pad(p, (0, pad))), q_dev, tables)
        voxels.append(v[: r.shape[0]])
        weights.append(w[: r.shape[0]])
    if not voxels:
        voxels, weights = [jnp.zeros((0, 8), jnp.int32)], [jnp.zeros((0, 8), jnp.float32)]
    return Entries(
        rotation=jnp.asarray(rotation),
        pixel=jnp.asarray(pixel),
        voxels=jnp.concatenate(voxels),
        weights=jnp.concatenate(weights),
        n_rot=n_rot,
    )


# ---------------------------------------------------------------------------------------------------------
# In-peak entries driven by reflections (same result as build_entries, without testing every pixel)
# ---------------------------------------------------------------------------------------------------------


class _ProjectionTables(NamedTuple):
    """Device arrays of :func:`_reflection_pixels` (a pytree; all float32 unless said)."""

    centres: jax.Array  # (n_refl, 3) crystal-frame reflection centres G = B @ hkl, 1/Å
    centres_sq: jax.Array  # (n_refl,) |G|²
    k_beam: jax.Array  # (3,) b̂/λ: the Ewald sphere is |q + k_beam| = 1/λ
    shell_lo: jax.Array  # () a reflection can hold pixels only if shell_lo <= |G|² + 2 G·(C k_beam) ...
    shell_hi: jax.Array  # () ... <= shell_hi (i.e. | |g + k_beam| - 1/λ | <= the radius, with margin)
    cos_min: jax.Array  # () ... and if its direction g + k_beam is within acos(cos_min) of the normal -z
    beam_px: jax.Array  # (3,) b, sample -> beam centre on the detector, pixel units
    centre_px: jax.Array  # (2,) beam centre (row, col)
    half_width: jax.Array  # () half-width w (pixels) of the box around a reflection's projection
    pixel_map: jax.Array  # (num_rows * num_cols,) int32 raw pixel id -> valid index or -1
    q_lab: jax.Array  # (n_pix, 3) lab-frame pixel q


def _projection_bounds(grid: ReciprocalGrid, detector) -> tuple[float, float, float]:
    """Conservative bounds for the reflection-driven search: ``(shell_tol, cos_min, half_width)``.

    A valid pixel t with |q_t - g| <= r (r = grid.radius, g = C^T G_h the reflection's lab position) obeys:

    * the Ewald sphere: |q_t + b̂/λ| = 1/λ, so with s = g + b̂/λ, | |s| - 1/λ | <= r (= shell_tol);
    * direction: λ s and the unit vector Ŝ_t = λ (q_t + b̂/λ) are λ r apart; the distance from Ŝ_t to the
      ray along ŝ is sin α (α the angle between Ŝ_t and ŝ, when α < 90°, else >= 1), so sin α <= λ r;
    * detector: the angle φ of a direction from the detector normal (-z) is at most φ_det (the largest
      over the valid pixels) for Ŝ_t, so at most φ_det + α along the arc from Ŝ_t to ŝ, and cos φ(ŝ) >=
      cos(φ_det + α_max) (= cos_min);
    * the map from a direction u to its detector point P(u) = L u_xy / (-u_z) (pixels, L = |b_z|) stretches
      arcs by at most L / cos² φ (radially; L / cos φ tangentially), so |P(ŝ) - P(Ŝ_t)| <= L α / cos²(φ_det
      + α) (= half_width), which bounds both the row and the column offset of the pixel from P(ŝ).

    Every bound gets a relative margin of 1e-3 (float32 arithmetic in the kernel and in the inside test).
    """
    g = detector.geometry
    r = grid.radius * (1.0 + 1e-3)
    wl = g.wavelength_A
    if not wl * r < 1.0:
        raise ConfigError(f"peak radius {grid.radius} 1/Å is not small against the Ewald sphere 1/λ = {1 / wl} 1/Å")
    alpha = math.asin(wl * r)
    b = g.beam_vector_px
    rows, cols = np.divmod(np.asarray(detector.pixel_id, np.int64), g.num_cols)
    sx = b[0] + rows - g.beam_center_px[0]
    sy = b[1] + cols - g.beam_center_px[1]
    length = abs(b[2])
    phi_det = float(np.max(np.arctan2(np.hypot(sx, sy), length)))
    phi = (phi_det + alpha) * (1.0 + 1e-6) + 1e-6
    if not phi < 0.5 * math.pi - 1e-3:
        raise ConfigError(
            f"detector {g} sees directions up to {math.degrees(phi_det):.3g}° from its normal: the reflection-driven "
            "search needs them below 90°; use build_entries"
        )
    half_width = length * alpha / math.cos(phi) ** 2 * (1.0 + 1e-3) + 0.05
    return r + 1e-6, math.cos(phi), half_width


def _near_sphere(rot: jax.Array, proj: _ProjectionTables) -> jax.Array:
    """(n_refl,) bool: reflections of one rotation whose peak can touch the Ewald sphere.

    |C^T G + k|² - 1/λ² = |G|² + 2 G·(C k) (|k| = 1/λ): three multiply-adds per reflection.
    """
    k_crystal = jnp.sum(rot * proj.k_beam[None, :], axis=1)  # C k, elementwise (no matmul precision mode)
    d = proj.centres_sq + 2.0 * (
        proj.centres[:, 0] * k_crystal[0] + proj.centres[:, 1] * k_crystal[1] + proj.centres[:, 2] * k_crystal[2]
    )
    return (d >= proj.shell_lo) & (d <= proj.shell_hi)


@jax.jit
def _count_candidates(quaternions, proj: _ProjectionTables):
    """(n_rot_chunk,) int32 number of reflections near the Ewald sphere of every rotation."""
    rot = crystal_from_lab(quaternions)
    return jax.vmap(lambda m: _near_sphere(m, proj).sum(dtype=jnp.int32))(rot)


def box_pixels(rot: jax.Array, proj: _ProjectionTables, shape, h_max: int, n_box: int):
    """Pixels in the box around the projection of every reflection near the Ewald sphere at crystal_from_lab
    ``rot`` (3, 3): ``(pixel, refl, count)``: (h_max * n_box²,) int32 valid-pixel index (-1 off the detector,
    masked, or padding), the reflection whose box holds it (same shape), and the reflections near the sphere
    (the result is complete only where count <= h_max). A box pixel is in-peak for ``rot`` iff the reflection
    its crystal-frame q rounds to (``locate``) is its box's reflection."""
    num_rows, num_cols = shape
    n_refl = proj.centres.shape[0]
    step = jnp.arange(n_box, dtype=jnp.int32)
    d_row = jnp.repeat(step, n_box)  # (n_box²,)
    d_col = jnp.tile(step, n_box)
    near = _near_sphere(rot, proj)
    count = near.sum(dtype=jnp.int32)
    (refl,) = jnp.nonzero(near, size=h_max, fill_value=n_refl)
    used = refl < n_refl
    refl = jnp.minimum(refl, n_refl - 1)
    # Lab position g = C^T G of the selected reflections, elementwise; its projection onto the detector.
    g = jnp.sum(rot[None, :, :] * proj.centres[refl][:, :, None], axis=1)  # (h_max, 3)
    s = g + proj.k_beam
    s_norm = jnp.sqrt(jnp.sum(s * s, axis=1))
    ahead = s[:, 2] <= -proj.cos_min * s_norm  # within the cone of directions that can reach a pixel
    scale = proj.beam_px[2] / jnp.where(ahead, s[:, 2], -1.0)  # pixels per 1/Å along s, > 0
    row = s[:, 0] * scale - proj.beam_px[0] + proj.centre_px[0]
    col = s[:, 1] * scale - proj.beam_px[1] + proj.centre_px[1]
    w = proj.half_width
    used = used & ahead & (row + w >= 0) & (row - w <= num_rows - 1) & (col + w >= 0) & (col - w <= num_cols - 1)
    row0 = jnp.ceil(jnp.where(used, row - w, 0.0)).astype(jnp.int32)
    col0 = jnp.ceil(jnp.where(used, col - w, 0.0)).astype(jnp.int32)
    rows = row0[:, None] + d_row[None, :]  # (h_max, n_box²)
    cols = col0[:, None] + d_col[None, :]
    on_det = used[:, None] & (rows >= 0) & (rows < num_rows) & (cols >= 0) & (cols < num_cols)
    pid = jnp.where(on_det, rows * num_cols + cols, 0)
    pixel = jnp.where(on_det, proj.pixel_map[pid], -1)
    return pixel.reshape(-1), jnp.broadcast_to(refl[:, None], pixel.shape).reshape(-1), count


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_box"))
def _reflection_pixels(quaternions, proj: _ProjectionTables, tables: GridTables, shape, h_max, n_box):
    """In-peak pixels of a chunk of rotations found from their reflections near the Ewald sphere.

    Returns ``(pixels, counts)``: (n_rot_chunk, h_max * n_box²) int32 valid-pixel index of every kept
    (rotation, box slot), -1 elsewhere; (n_rot_chunk,) int32 reflections near the sphere per rotation (the
    result is complete only where counts <= h_max).
    """
    near_pixel = jax.vmap(jax.vmap(_nearest_reflection, in_axes=(0, None)), in_axes=(0, None))
    rot = crystal_from_lab(quaternions)
    pixel, refl, count = jax.vmap(lambda m: box_pixels(m, proj, shape, h_max, n_box))(rot)  # (r, h_max * n_box²) each, (r,)
    # The inside test of build_entries (_classify), on the same (rotation, pixel)-shaped batch.
    q_crystal = jnp.sum(rot[:, None, :, :] * proj.q_lab[jnp.maximum(pixel, 0)][:, :, None, :], axis=-1)
    found, _ = near_pixel(q_crystal, tables)
    keep = (pixel >= 0) & (found == refl)
    return jnp.where(keep, pixel, -1), count


def near_sphere(rot: jax.Array, proj: _ProjectionTables) -> jax.Array:
    """(n_refl,) bool reflections whose peak can touch the Ewald sphere at crystal_from_lab ``rot`` (3, 3)."""
    return _near_sphere(rot, proj)


def bucket_count(n: int) -> int:
    """``n`` rounded up to a multiple of 32 (few distinct compiled shapes)."""
    return _bucket(n)


def near_sphere_counts(quaternions: jax.Array, proj: _ProjectionTables) -> jax.Array:
    """(n_rot,) int32 reflections whose peak can touch the Ewald sphere at each rotation (the ``h_max`` that
    :func:`reflection_pixels` needs is their maximum)."""
    return _count_candidates(quaternions, proj)


def reflection_pixels(quaternions: jax.Array, proj: _ProjectionTables, tables: GridTables, shape, h_max: int,
                      n_box: int):
    """In-peak pixels of a chunk of rotations (valid-pixel index or -1, (n_rot, h_max * n_box²)) and the
    reflections near the sphere per rotation (complete where <= h_max); see :func:`build_entries_by_reflection`."""
    return _reflection_pixels(quaternions, proj, tables, shape, h_max, n_box)


def _bucket(n: int) -> int:
    """Rounds a candidate count up to a multiple of 32 (few distinct compiled shapes)."""
    return max(32, -(-n // 32) * 32)


_PROJECTIONS = weakref.WeakKeyDictionary()  # detector -> {grid: projection_setup's result}


def projection_setup(grid: ReciprocalGrid, detector) -> tuple[_ProjectionTables, tuple[int, int], int]:
    """Device tables of the reflection-driven pixel search: ``(proj, (num_rows, num_cols), n_box)``, n_box the
    side of the pixel box tested around each reflection's projection (:func:`_projection_bounds`).

    Computed once per (grid, detector) pair (both immutable) and reused while both live: the bounds scan every
    valid pixel (~0.3 s at 1.4 M pixels), and entries are built for new rotations at every E-step of the
    direct candidate path."""
    per_grid = _PROJECTIONS.setdefault(detector, weakref.WeakKeyDictionary())
    if grid not in per_grid:
        per_grid[grid] = _projection_setup(grid, detector)
    return per_grid[grid]


def _projection_setup(grid: ReciprocalGrid, detector) -> tuple[_ProjectionTables, tuple[int, int], int]:
    geo = detector.geometry
    shape = (geo.num_rows, geo.num_cols)
    shell_tol, cos_min, half_width = _projection_bounds(grid, detector)
    n_box = int(math.floor(2 * half_width)) + 1
    b = geo.beam_vector_px
    inv_wl = 1.0 / geo.wavelength_A
    centres = grid.hkl @ grid.crystal.reciprocal_basis.T
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    proj = _ProjectionTables(
        centres=f32(centres),
        centres_sq=f32(np.einsum("ij,ij->i", centres, centres)),
        k_beam=f32(b / np.linalg.norm(b) / geo.wavelength_A),
        shell_lo=f32((inv_wl - shell_tol) ** 2 - inv_wl**2 - 1e-5 * inv_wl**2),
        shell_hi=f32((inv_wl + shell_tol) ** 2 - inv_wl**2 + 1e-5 * inv_wl**2),
        cos_min=f32(cos_min),
        beam_px=f32(b),
        centre_px=f32(geo.beam_center_px),
        half_width=f32(half_width),
        pixel_map=jnp.asarray(detector.pixel_map()),
        q_lab=f32(detector.q),
    )
    return proj, shape, n_box


def build_entries_by_reflection(
    grid: ReciprocalGrid, detector, quaternions: np.ndarray, *, chunk: int = 64, h_max: int | None = None
) -> Entries:
    """In-peak entries of every rotation, found from the reflections near the Ewald sphere.

    Same result as ``build_entries(grid, detector.q, quaternions)`` (same pairs, stencils and order), but
    instead of testing every pixel against every rotation it projects each reflection whose peak can touch
    the Ewald sphere onto the detector and tests only the pixels in a small box around its projection (the
    box half-width is a proven bound, see :func:`_projection_bounds`). A pixel is kept by exactly the test of
    :func:`build_entries`: its float32 crystal-frame q rounds to that reflection and lies within the radius,
    evaluated by the same kernel on a (rotation, pixel)-shaped batch (bitwise the same entries on the CPU in
    the tests; differently fused float32 arithmetic could only flip pixels within ~1e-5 of a peak boundary).
    Cost per rotation: three multiply-adds per reflection, then ~(reflections near the sphere) x (box pixels)
    tests instead of n_pix.

    Args:
      grid: the model grid.
      detector: an :class:`emcjax.detector.Detector` (its valid pixels are the pixel indices).
      quaternions: (n_rot, 4) orientations (scalar first).
      chunk: rotations per device call.
      h_max: reflections near the Ewald sphere per rotation held by the padded kernel; None counts them
        for every rotation first. A chunk with more is recomputed with a larger ``h_max``.

    Returns:
      The entries, sorted by rotation then pixel.
    """
    proj, shape, n_box = projection_setup(grid, detector)
    tables = grid.tables
    quats = jnp.asarray(quaternions, jnp.float32)
    n_rot = int(quaternions.shape[0])
    if h_max is None:  # the largest count over all rotations (cheap: three multiply-adds per reflection)
        step = max(chunk, min(1024, 1 << max(n_rot - 1, 0).bit_length()))
        most = 0
        for start in range(0, n_rot, step):
            block = quats[start : start + step]
            if block.shape[0] < step:
                block = jnp.concatenate([block, jnp.tile(block[:1], (step - block.shape[0], 1))])
            most = max(most, int(np.max(_count_candidates(block, proj))))
        h_max = _bucket(most)
    rotation, pixel = [], []
    for start in range(0, n_rot, chunk):
        block = quats[start : start + chunk]
        n = block.shape[0]
        if n < chunk:  # keep one compiled shape
            block = jnp.concatenate([block, jnp.tile(block[:1], (chunk - n, 1))])
        while True:
            found, counts = _reflection_pixels(block, proj, tables, shape, h_max, n_box)
            most = int(np.max(counts))
            if most <= h_max:
                break
            h_max = _bucket(most)
        found = np.sort(np.asarray(found)[:n], axis=1)  # per rotation: the -1 slots first, then pixels ascending
        kept = found >= 0
        rotation.append(np.repeat(np.arange(start, start + n, dtype=np.int32), kept.sum(axis=1)))
        pixel.append(found[kept].astype(np.int32))
    rotation = np.concatenate(rotation) if rotation else np.zeros(0, np.int32)
    pixel = np.concatenate(pixel) if pixel else np.zeros(0, np.int32)
    return _entries_from_pairs(rotation, pixel, quats, jnp.asarray(detector.q, jnp.float32), tables, n_rot)


@jax.jit
def tomogram(intensity: jax.Array, entries: Entries) -> jax.Array:
    """Model value W at every in-peak entry: (n_entries,) float32 (photons per unit pol per unit phi)."""
    flat = pad_model(intensity)
    return jnp.sum(entries.weights * flat[entries.voxels], axis=1)


@functools.partial(jax.jit, static_argnames="n_shells")
def expected_signal(
    intensity: jax.Array, entries: Entries, polarization: jax.Array, shell: jax.Array, n_shells: int
) -> jax.Array:
    """Expected Bragg photons of each rotation per radial shell at phi = 1.

    S[r, s] = sum over in-peak pixels t of rotation r in shell s of pol_t W_rt.

    Args:
      intensity: (n_asu, n_voxels) model.
      entries: in-peak entries of the rotations.
      polarization: (n_pix,) polarization x solid-angle factor of the valid pixels.
      shell: (n_pix,) int32 radial shell of the valid pixels.
      n_shells: number of shells.

    Returns:
      (n_rot, n_shells) float32.
    """
    w = tomogram(intensity, entries) * polarization[entries.pixel]
    seg = entries.rotation * n_shells + shell[entries.pixel]
    return jax.ops.segment_sum(w, seg, num_segments=entries.n_rot * n_shells).reshape(entries.n_rot, n_shells)


def integrated_intensity(intensity: np.ndarray) -> np.ndarray:
    """(n_asu,) integrated intensity of each unique reflection: the sum of its voxels."""
    return np.asarray(intensity).sum(axis=1)
