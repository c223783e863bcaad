"""The model at single points (kernels of one point, lifted with vmap): the reflection whose peak holds a
crystal-frame q, its trilinear stencil into the padded asymmetric-unit model, the model's value at arbitrary
points, and the projection of a model onto the symmetric ones (stabilizer sums).

A detector pixel at crystal-frame q samples the model by trilinear interpolation (METHOD.md §5.2): the pixel
belongs to reflection h iff |q - B hkl_h| <= radius; the 8 grid corners around it contribute with
trilinear weights, corners outside the support are dropped without renormalisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.model.grid import GridTables


# The precision of the matmuls that map q (1/Å) between frames and to fractional hkl: full float32 products;
# accelerators may otherwise use reduced-precision (e.g. TF32) products, whose ~5e-4 relative error would move
# pixels across peak boundaries.
EXACT_PRECISION = jax.lax.Precision.HIGHEST


# The 8 corners of a grid cell, (8, 3) int, in the order (dx, dy, dz) = (0,0,0), (0,0,1), ..., (1,1,1).
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.int32)


def nearest_reflection(q_crystal: jax.Array, tables: GridTables) -> tuple[jax.Array, jax.Array]:
    """Reflection whose support contains ``q_crystal`` (3,) 1/Å: (index or -1, fractional coords (3,))."""
    frac = jnp.matmul(tables.frac_from_q, q_crystal, precision=EXACT_PRECISION)
    hkl = jnp.round(frac)
    delta = q_crystal - jnp.matmul(tables.q_from_frac, hkl, precision=EXACT_PRECISION)
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
    refl, frac = nearest_reflection(q_crystal, tables)
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


def integrated_intensity(intensity: np.ndarray) -> np.ndarray:
    """(n_asu,) integrated intensity of each unique reflection: the sum of its voxels."""
    return np.asarray(intensity).sum(axis=1)
