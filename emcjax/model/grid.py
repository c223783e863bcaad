"""Where the model lives: the reflections kept to a resolution, their asymmetric unit, the voxel offsets of
every peak (:func:`make_grid`) and the device lookup tables of the slicing kernels (:class:`GridTables`).

The 3D intensity W(q) is non-zero only inside small spheres (radius ``radius`` in 1/Å) around the
reciprocal-lattice nodes kept by :func:`make_grid`; inside each sphere the peak profile is free and sampled
on a grid aligned with the reciprocal lattice (``divisions`` points per reciprocal axis, see
docs/ARCHITECTURE.md "Voxel grid"). Every reflection has the same set of integer voxel ``offsets``; the map from
voxel j of reflection h to the asymmetric-unit model is ``ReciprocalGrid.full_to_asu`` (see emcjax.model).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.crystal import AsymmetricUnit, Crystal, asymmetric_unit, lattice_grid_divisions, reflections
from emcjax.errors import ConfigError


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
