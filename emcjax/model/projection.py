"""Set-up of the reflection-driven pixel search (emcjax.model.entries_by_reflection): the proven bounds on where
a reflection's in-peak pixels can lie (:func:`projection_bounds`) and the device tables of the search
(:func:`projection_setup`, computed once per grid and detector).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.errors import ConfigError
from emcjax.model.grid import ReciprocalGrid


class ProjectionTables(NamedTuple):
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


def projection_bounds(grid: ReciprocalGrid, detector) -> tuple[float, float, float]:
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


_PROJECTIONS = weakref.WeakKeyDictionary()  # detector -> {grid: projection_setup's result}


def projection_setup(grid: ReciprocalGrid, detector) -> tuple[ProjectionTables, tuple[int, int], int]:
    """Device tables of the reflection-driven pixel search: ``(proj, (num_rows, num_cols), n_box)``, n_box the
    side of the pixel box tested around each reflection's projection (:func:`projection_bounds`).

    Computed once per (grid, detector) pair (both immutable) and reused while both live: the bounds scan every
    valid pixel (~0.3 s at 1.4 M pixels), and entries are built for new rotations at every E-step of the
    direct candidate path."""
    per_grid = _PROJECTIONS.setdefault(detector, weakref.WeakKeyDictionary())
    if grid not in per_grid:
        per_grid[grid] = _projection_setup(grid, detector)
    return per_grid[grid]


def _projection_setup(grid: ReciprocalGrid, detector) -> tuple[ProjectionTables, tuple[int, int], int]:
    geo = detector.geometry
    shape = (geo.num_rows, geo.num_cols)
    shell_tol, cos_min, half_width = projection_bounds(grid, detector)
    n_box = int(math.floor(2 * half_width)) + 1
    b = geo.beam_vector_px
    inv_wl = 1.0 / geo.wavelength_A
    centres = grid.hkl @ grid.crystal.reciprocal_basis.T
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    proj = ProjectionTables(
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
