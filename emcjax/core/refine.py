"""Continuous orientation refinement: gradient ascent of one frame's log-likelihood in its rotation.

A frame's rotation is ``q(v) = q0 * dq(v)`` with the small rotation ``dq(v) = (1, v/2) / |(1, v/2)|``
(``v`` (3,) rad, angle ``2 atan(|v|/2)``, about the crystal-frame axis ``v``), around a start rotation ``q0``
(one of the frame's most probable ones in the last E-step). Its log-likelihood under the current model
(photons per unit pol per unit phi), up to constants (METHOD.md §5, emcjax.core.estep) is

    L(v) = sum over the frame's photons p   photon_excess(K_p, pol_p phi W(R(v)^T q_p), pol_p B_p)
           - phi S(v)

* photon term: every photon of the frame (not only those in a peak at ``q0``), the model W interpolated
  trilinearly (:func:`emcjax.model.locate`) at the photon's q rotated into the crystal frame: exact, and
  differentiable in ``v`` (piecewise linear inside a peak, 0 outside every peak).
* expected signal S(v) = sum over in-peak pixels of pol W (the zero-count term, exact for Poisson
  likelihoods): evaluated from the reflections near the Ewald sphere at ``q0`` (those within reach for any
  rotation up to ``max_angle`` away). For reflection h, the pixels inside its peak sample the Ewald sphere
  where it cuts the peak, so ``S_h ~= c_h ∫_plane W_h dA`` with ``c_h = pol / (Ewald-sphere area per
  pixel)`` at the pixel the reflection projects onto (held at ``q0``; 0 off the detector or in the frame's
  masked shells), and the plane integral approximated by a Gaussian in the excitation error ``e_h(v) =
  |R(v) G_h + k| - 1/λ`` with the mean and variance of the model's voxel profile along the sphere's normal
  (plus the trilinear stencil's own variance) and total ``V_cell sum_v I_hv``. An approximation, used only
  for the gradient: the refined rotations then enter the exact E-step.
* dead pixels and non-linear zero terms (negative binomial) are left out of the refinement (the latter
  approximated by the linear term -phi S).

The ascent takes ``steps`` Adam steps (optax), cosine-decaying from ``learning_rate`` (rad), with ``v``
projected back onto the ball ``|v| <= max_angle`` after each step. Pure JAX; :func:`refine_frames` is
vmapped over frames and start rotations (emcjax.refinement plans the chunks over the device mesh).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from emcjax import model as model_lib
from emcjax.rotations import quaternion_to_matrix

_EXACT = jax.lax.Precision.HIGHEST


class FramePhotons(NamedTuple):
    """The photons of frames, padded per frame to one length (zero counts on padding).

    Attributes:
      q_lab: (..., n_photons, 3) float32 lab-frame q of the photon's pixel (1/Å).
      count: (..., n_photons) float32 photons.
      polarization: (..., n_photons) float32 pol x solid angle of the pixel.
      background: (..., n_photons) float32 pol x B, expected background photons at the pixel (> 0).
    """

    q_lab: jax.Array
    count: jax.Array
    polarization: jax.Array
    background: jax.Array


class SignalGeometry(NamedTuple):
    """What the expected-signal approximation needs (replicated device arrays).

    Attributes:
      centres: (n_refl, 3) float32 crystal-frame reflection centres B @ hkl (1/Å).
      voxel_offset: (n_voxels, 3) float32 crystal-frame offset of each voxel from its peak centre (1/Å).
      stencil_var: (3, 3) float32 covariance of the trilinear stencil (1/Å²).
      cell_volume: () float32 reciprocal-space volume of one grid cell (1/Å³).
      k_beam: (3,) float32 b̂/λ (the Ewald sphere is |q + k_beam| = 1/λ).
      beam_px: (3,) float32 b, sample -> beam centre (pixels).
      centre_px: (2,) float32 beam centre (row, col).
      shape: (2,) int32 detector rows, columns.
      pixel_weight: (rows * cols,) float32 pol / (Ewald-sphere area of the pixel, 1/Å²), 0 on invalid pixels.
      pixel_shell: (rows * cols,) int32 radial shell of each raw pixel (0 where invalid).
      reach: (n_refl,) float32 |e_h| (1/Å) within which a reflection is kept: peak radius + |G_h| x max_angle.
    """

    centres: jax.Array
    voxel_offset: jax.Array
    stencil_var: jax.Array
    cell_volume: jax.Array
    k_beam: jax.Array
    beam_px: jax.Array
    centre_px: jax.Array
    shape: jax.Array
    pixel_weight: jax.Array
    pixel_shell: jax.Array
    reach: jax.Array


class RefineSettings(NamedTuple):
    """Static settings of the ascent."""

    steps: int = 30
    learning_rate: float = 0.003
    max_angle: float = 0.035
    max_reflections: int = 256


def small_rotation(v: jax.Array) -> jax.Array:
    """(4,) unit quaternion of the small rotation ``v`` (3,) rad: ``(1, v/2)`` normalised."""
    q = jnp.concatenate([jnp.ones((1,), v.dtype), 0.5 * v])
    return q / jnp.sqrt(jnp.sum(q * q))


def quaternion_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """Hamilton product ``a * b`` of scalar-first quaternions (4,)."""
    a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
    b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
    return jnp.stack([
        a0 * b0 - a1 * b1 - a2 * b2 - a3 * b3,
        a0 * b1 + a1 * b0 + a2 * b3 - a3 * b2,
        a0 * b2 - a1 * b3 + a2 * b0 + a3 * b1,
        a0 * b3 + a1 * b2 - a2 * b1 + a3 * b0,
    ])


def rotated(q0: jax.Array, v: jax.Array) -> jax.Array:
    """The rotation ``q0 * dq(v)`` (4,)."""
    return quaternion_product(q0, small_rotation(v))


def photon_term(intensity_flat, tables, rotation, phi, photons: FramePhotons, likelihood, frame) -> jax.Array:
    """Sum over one frame's photons of photon_excess at the model interpolated in ``rotation`` (3, 3), nats."""
    q_crystal = jnp.einsum("ji,pj->pi", rotation, photons.q_lab, precision=_EXACT)  # R^T q
    _, voxels, weights = jax.vmap(model_lib.locate, in_axes=(0, None))(q_crystal, tables)
    w = jnp.sum(weights * intensity_flat[voxels], axis=1)
    bragg = photons.polarization * phi * w
    excess = likelihood.photon_excess(photons.count, bragg, photons.background, frame)
    return jnp.sum(jnp.where(photons.count > 0, excess, 0.0))


class NearReflections(NamedTuple):
    """One start rotation's reflections within reach of the Ewald sphere and their signal profiles."""

    centre: jax.Array  # (h, 3) crystal-frame centre
    weight: jax.Array  # (h,) c_h x V_cell x sum_v I_hv (0 on padding)
    mean: jax.Array  # (h,) mean voxel offset along the normal (1/Å)
    var: jax.Array  # (h,) variance along the normal (1/Å²)


def near_reflections(intensity_flat, tables, q0, frame_background, geo: SignalGeometry, max_reflections: int):
    """The reflections of rotation ``q0`` that a rotation up to ``max_angle`` away can bring onto the Ewald
    sphere, with the weights and Gaussian profiles of :func:`expected_signal`; and how many there were."""
    rot0 = quaternion_to_matrix(q0)
    g = jnp.einsum("ij,hj->hi", rot0, geo.centres, precision=_EXACT)  # lab positions
    s = g + geo.k_beam
    s_norm = jnp.sqrt(jnp.sum(s * s, axis=1))
    inv_wl = jnp.sqrt(jnp.sum(geo.k_beam * geo.k_beam))
    near = jnp.abs(s_norm - inv_wl) <= geo.reach
    count = near.sum(dtype=jnp.int32)
    if max_reflections == 0:  # only the count
        return None, count
    (idx,) = jnp.nonzero(near, size=max_reflections, fill_value=0)
    used = jnp.arange(max_reflections) < count
    s, s_norm = s[idx], s_norm[idx]
    # the pixel the reflection projects onto (direction s from the sample)
    ahead = s[:, 2] < 0
    scale = geo.beam_px[2] / jnp.where(ahead, s[:, 2], -1.0)
    row = jnp.round(s[:, 0] * scale - geo.beam_px[0] + geo.centre_px[0]).astype(jnp.int32)
    col = jnp.round(s[:, 1] * scale - geo.beam_px[1] + geo.centre_px[1]).astype(jnp.int32)
    on = ahead & (row >= 0) & (row < geo.shape[0]) & (col >= 0) & (col < geo.shape[1])
    raw = jnp.where(on, row * geo.shape[1] + col, 0)
    background = frame_background[geo.pixel_shell[raw]]
    c = jnp.where(on & used & (background >= 0), geo.pixel_weight[raw], 0.0)
    # the voxel profile along the sphere's normal, in the crystal frame
    normal = jnp.einsum("ji,hj->hi", rot0, s / s_norm[:, None], precision=_EXACT)
    values = intensity_flat[tables.full_to_asu[idx, :-1]]  # (h, n_voxels)
    along = jnp.einsum("vi,hi->hv", geo.voxel_offset, normal)
    total = values.sum(axis=1)
    safe = jnp.where(total > 0, total, 1.0)
    mean = jnp.sum(values * along, axis=1) / safe
    var = jnp.sum(values * (along - mean[:, None]) ** 2, axis=1) / safe
    var = var + jnp.einsum("hi,ij,hj->h", normal, geo.stencil_var, normal)
    return NearReflections(geo.centres[idx], c * geo.cell_volume * total, mean, var), count


def expected_signal(rotation, near: NearReflections, geo: SignalGeometry) -> jax.Array:
    """Approximate S (photons at phi = 1) of the start rotation's near reflections in ``rotation`` (3, 3)."""
    s = jnp.einsum("ij,hj->hi", rotation, near.centre, precision=_EXACT) + geo.k_beam
    inv_wl = jnp.sqrt(jnp.sum(geo.k_beam * geo.k_beam))
    offset = inv_wl - jnp.sqrt(jnp.sum(s * s, axis=1))  # where the sphere cuts the peak, along the normal
    density = jnp.exp(-0.5 * (offset - near.mean) ** 2 / near.var) / jnp.sqrt(2 * jnp.pi * near.var)
    return jnp.sum(near.weight * density)


def frame_objective(v, q0, intensity_flat, tables, phi, photons, near, geo, likelihood, frame) -> jax.Array:
    """L(v) of one frame around start rotation ``q0`` (nats, up to the frame's constant)."""
    rotation = quaternion_to_matrix(rotated(q0, v))
    return photon_term(intensity_flat, tables, rotation, phi, photons, likelihood, frame) - phi * expected_signal(
        rotation, near, geo
    )


def refine_one(q0, intensity_flat, tables, phi, photons, frame_background, geo, likelihood, frame,
               settings: RefineSettings):
    """Gradient ascent from ``q0`` (4,): ``(refined quaternion (4,), L gain (nats), near reflections needed)``."""
    near, count = near_reflections(intensity_flat, tables, q0, frame_background, geo, settings.max_reflections)

    def loss(v):
        return -frame_objective(v, q0, intensity_flat, tables, phi, photons, near, geo, likelihood, frame)

    schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.steps, alpha=0.05)
    opt = optax.adam(schedule)
    v0 = jnp.zeros(3, jnp.float32)

    def step(carry, _):
        v, opt_state = carry
        grad = jax.grad(loss)(v)
        updates, opt_state = opt.update(grad, opt_state, v)
        v = optax.apply_updates(v, updates)
        norm = jnp.sqrt(jnp.sum(v * v))
        v = v * jnp.minimum(1.0, settings.max_angle / jnp.maximum(norm, 1e-12))
        return (v, opt_state), None

    (v, _), _ = jax.lax.scan(step, (v0, opt.init(v0)), None, length=settings.steps)
    gain = loss(v0) - loss(v)
    return rotated(q0, v), gain, count


def refine_frames(intensity, tables, start, phi, photons: FramePhotons, frame_background, frame_index,
                  geo: SignalGeometry, likelihood, settings: RefineSettings):
    """Refines every frame's start rotations.

    Args:
      intensity: (n_asu, n_voxels) model.
      tables: grid tables.
      start: (n, k, 4) start quaternions of n frames (k per frame).
      phi: (n,) frame scales.
      photons: the n frames' photons (leading axis n).
      frame_background: (n, n_shells) background per shell (< 0: masked shell).
      frame_index: (n,) int32 global frame index (per-frame likelihood parameters).
      geo: expected-signal geometry.
      likelihood: the likelihood model.
      settings: static ascent settings.

    Returns:
      ``(refined (n, k, 4), gain (n, k) nats, near reflections (n, k) int32)``.
    """
    flat = model_lib.pad_model(intensity)

    def per_frame(q_k, phi_d, ph, bg, d):
        return jax.vmap(lambda q0: refine_one(q0, flat, tables, phi_d, ph, bg, geo, likelihood, d, settings))(q_k)

    return jax.vmap(per_frame)(start, phi, photons, frame_background, frame_index)
