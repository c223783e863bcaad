"""M-step kernels: intensity updates (reference per-pixel ML + compress, MLEM) and the phi update.

They use only the join pairs of *kept* (frame, rotation) pairs (:class:`Kept`), written for the kept pairs
of one device; every sum over frames ends in ``psum(..., axis)`` so that, lifted over the mesh with
``jax.shard_map``, all devices hold the same result. ``axis=None`` runs them on one device.

Intensity updates (``EMCConfig.intensity_update``):

* ``"reference"`` (default): the reference program's per-pixel maximum likelihood followed by compression
  (METHOD.md §7.1): every in-peak entry (r, t) gets the 1-D Poisson ML value w_rt >= 0 given its kept
  frames, then each voxel is the exposure- and trilinear-weighted average of those values.
* ``"mlem"``: the multiplicative EM update of the voxels with the latent split of each photon into Bragg
  and background,

      I_v <- I_v * [sum_{d,r} P_dr sum_t K_dt phi_d w_rtv / (B_dt + phi_d W_rt)]
                 / [sum_{d,r} P_dr sum_t phi_d pol_t w_rtv],

  repeated ``inner_iterations`` times; each raises the expected complete-data log-likelihood and the model
  stays non-negative. It over-fits voxels that few pixels touch with small trilinear weights
  (docs/METHOD-NOTES.md), so it is not the default.

Both sum numerators and denominators over each reflection's stabilizer (``model.stabilizer_sum``) so that
reflections on symmetry elements keep symmetric profiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.estep import Shared, frame_signal, rotation_tables

_EPS = 1e-20


class Kept(NamedTuple):
    """Join pairs and (frame, rotation) pairs that survived pruning, on one device, zero-padded.

    Attributes:
      entry: (n,) int32 in-peak entry of each join pair.
      prob: (n,) float32 P_dr of the pair's (frame, rotation) (0 on padding).
      count: (n,) float32 photons K at the pixel.
      dead: (n,) float32 1 for a dead pixel.
      background: (n,) float32 B_d(s_t).
      polarization: (n,) float32 pol_t.
      frame: (n,) int32 global frame index.
      pair_frame: (m,) int32 global frame of each kept (frame, rotation) pair.
      pair_rotation: (m,) int32 rotation of the pair.
      pair_prob: (m,) float32 P_dr (0 on padding).
    """

    entry: jax.Array
    prob: jax.Array
    count: jax.Array
    dead: jax.Array
    background: jax.Array
    polarization: jax.Array
    frame: jax.Array
    pair_frame: jax.Array
    pair_rotation: jax.Array
    pair_prob: jax.Array


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def _scatter_voxels(values: jax.Array, entries: model_lib.Entries, index: jax.Array | None, size: int) -> jax.Array:
    """Back-projects per-entry values through the trilinear weights into the padded flat model."""
    voxels = entries.voxels if index is None else entries.voxels[index]
    weights = entries.weights if index is None else entries.weights[index]
    return jax.ops.segment_sum((values[:, None] * weights).ravel(), voxels.ravel(), num_segments=size)


def _symmetric_voxels(values: jax.Array, shape, tables) -> jax.Array:
    """Drops the sentinel and sums over each reflection's stabilizer: (n_asu * n_voxels,)."""
    return model_lib.stabilizer_sum(values[:-1].reshape(shape), tables).reshape(-1)


def entry_exposure(phi: jax.Array, kept: Kept, shared: Shared, n_shells: int, axis=None) -> jax.Array:
    """(n_entries,) c_rt = sum over kept pairs (d, r) of P_dr phi_d over frames whose shell at t is valid,
    minus kept dead pixels: how much scaled exposure each in-peak entry received."""
    n_rot = shared.entries.n_rot
    pw = kept.pair_prob * phi[kept.pair_frame]
    per_rot = _psum(jax.ops.segment_sum(pw, kept.pair_rotation, num_segments=n_rot), axis)
    masked = shared.masked_shells[kept.pair_frame]  # (pairs, n_masked)
    seg = kept.pair_rotation[:, None] * (n_shells + 1) + masked
    per_rot_shell = jax.ops.segment_sum(
        jnp.broadcast_to(pw[:, None], masked.shape).ravel(), seg.ravel(), num_segments=n_rot * (n_shells + 1)
    )
    per_rot_shell = _psum(per_rot_shell, axis).reshape(n_rot, n_shells + 1)
    ent = shared.entries
    exposure = per_rot[ent.rotation] - per_rot_shell[ent.rotation, shared.shell[ent.pixel]]
    dead = jax.ops.segment_sum(kept.prob * phi[kept.frame] * kept.dead, kept.entry, num_segments=exposure.shape[0])
    return exposure - _psum(dead, axis)


@functools.partial(jax.jit, static_argnames=("n_shells", "inner_iterations", "axis"))
def mlem_update(intensity, phi, kept: Kept, shared: Shared, n_shells: int, inner_iterations: int, axis=None):
    """Multiplicative EM update of the voxels (module docstring), ``inner_iterations`` times.

    Voxels with no exposure keep their value (0 would be absorbing under multiplicative updates).
    """
    size = intensity.size + 1
    ent = shared.entries
    pol = shared.polarization[ent.pixel]
    exposure = entry_exposure(phi, kept, shared, n_shells, axis)
    denominator = _symmetric_voxels(_scatter_voxels(exposure * pol, ent, None, size), intensity.shape, shared.tables)
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count * phi_k

    def body(_, flat_intensity):
        w = model_lib.tomogram(flat_intensity.reshape(intensity.shape), ent)[kept.entry]
        ratio = pk / (kept.background + phi_k * w)
        numerator = _psum(_scatter_voxels(ratio, ent, kept.entry, size), axis)
        numerator = _symmetric_voxels(numerator, intensity.shape, shared.tables)
        updated = flat_intensity * numerator / jnp.maximum(denominator, _EPS)
        return jnp.where(denominator > _EPS, updated, flat_intensity)

    return jax.lax.fori_loop(0, inner_iterations, body, intensity.reshape(-1)).reshape(intensity.shape)


@functools.partial(jax.jit, static_argnames=("n_shells", "newton_steps", "axis"))
def reference_update(intensity, phi, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 30, axis=None):
    """The reference's per-pixel ML + compress (METHOD.md §7.1), with w_rt >= 0.

    For each in-peak entry e = (r, t): w_e solves sum_{kept d} P_dr phi_d pol_t = sum P_dr K_dt / (B_dt/phi_d + w),
    found by Newton's method from w = 0 (monotone for this convex decreasing function); w = 0 when the
    right side at 0 is already smaller. Then I_v = sum_e c_e w_ev w_e / sum_e c_e w_ev with c_e = sum P_dr phi_d;
    voxels no kept pair observes are set to 0 (as the reference does).
    """
    ent = shared.entries
    n_entries = ent.rotation.shape[0]
    exposure = entry_exposure(phi, kept, shared, n_shells, axis)
    a = exposure * shared.polarization[ent.pixel]
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count
    b = kept.background / jnp.maximum(phi_k, _EPS)
    live = (pk > 0) & (phi_k > 0)

    def g_and_slope(w):
        x = jnp.where(live, pk / (b + w[kept.entry]), 0.0)
        g = _psum(jax.ops.segment_sum(x, kept.entry, num_segments=n_entries), axis) - a
        curvature = jnp.where(live, x * x / jnp.maximum(pk, _EPS), 0.0)
        return g, -_psum(jax.ops.segment_sum(curvature, kept.entry, num_segments=n_entries), axis)

    def body(_, w):
        g, slope = g_and_slope(w)
        step = jnp.where(slope < 0, -g / jnp.minimum(slope, -_EPS), 0.0)
        return jnp.where(g > 0, w + step, w)

    w0 = jnp.zeros(n_entries, jnp.float32)
    g0, _ = g_and_slope(w0)
    w = jnp.where(g0 > 0, jax.lax.fori_loop(0, newton_steps, body, w0), 0.0)
    size = intensity.size + 1
    numerator = _symmetric_voxels(_scatter_voxels(exposure * w, ent, None, size), intensity.shape, shared.tables)
    denominator = _symmetric_voxels(_scatter_voxels(exposure, ent, None, size), intensity.shape, shared.tables)
    updated = jnp.where(denominator > _EPS, numerator / jnp.maximum(denominator, _EPS), 0.0)
    return updated.reshape(intensity.shape)


@functools.partial(jax.jit, static_argnames=("n_shells", "newton_steps", "axis"))
def phi_update(intensity, phi, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 40, axis=None):
    """Per-frame 1-D Poisson ML of phi >= 0 given the responsibilities (METHOD.md §7.3).

    Maximises sum_{kept r} P_dr [sum_t K_dt log(B_dt + phi W_rt) - phi S_dr] by Newton's method from phi = 0
    (the gradient is convex and decreasing in phi); phi = 0 when the gradient at 0 is <= 0 (a blank frame).
    Returns the new, unnormalised phi of all frames.
    """
    n_frames = phi.shape[0]
    tables = rotation_tables(intensity, shared, n_shells)
    signal = frame_signal(tables, kept.pair_rotation, shared.masked_shells[kept.pair_frame])
    w = tables.tomogram[kept.entry]
    expected = jax.ops.segment_sum(kept.pair_prob * signal, kept.pair_frame, num_segments=n_frames)
    dead = jax.ops.segment_sum(kept.prob * kept.dead * kept.polarization * w, kept.frame, num_segments=n_frames)
    expected = _psum(expected - dead, axis)
    pk = kept.prob * kept.count

    def grad(p):
        x = pk * w / (kept.background + p[kept.frame] * w)
        g = _psum(jax.ops.segment_sum(x, kept.frame, num_segments=n_frames), axis) - expected
        curvature = jax.ops.segment_sum(x * x / jnp.maximum(pk, _EPS), kept.frame, num_segments=n_frames)
        return g, -_psum(curvature, axis)

    def body(_, p):
        g, slope = grad(p)
        return jnp.where(g > 0, p - g / jnp.minimum(slope, -_EPS), p)

    p0 = jnp.zeros(n_frames, jnp.float32)
    g0, _ = grad(p0)
    p = jax.lax.fori_loop(0, newton_steps, body, p0)
    return jnp.where((g0 > 0) & shared.frame_valid, p, 0.0)
