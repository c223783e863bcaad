"""Closed-form M-steps of the Poisson likelihoods: intensity updates (per-pixel ML + compress, MLEM) and phi.

They use only the join pairs of *kept* (frame, rotation) pairs (:class:`emcjax.core.arrays.Kept`) of one
device. With a mesh axis name (``axis``) the in-peak entries are split over the devices: every device gathers
all devices' kept photons once (``all_gather``), solves the entries of its own slice with no communication
inside the Newton loop, and back-projects its slice onto the voxels; one ``psum`` of the voxel sums ends
the update. ``axis=None`` runs on one device.
Each frame's kept pairs live on one device, so the phi update needs no communication until its single
final ``psum``. All divisions are guarded with ``where`` on both sides (no epsilon), so reverse-mode
gradients through the updates are finite.

Intensity updates (``EMCConfig.intensity_update``):

* ``"reference"`` (default): the reference program's per-pixel maximum likelihood followed by compression
  (METHOD.md §7.1): every in-peak entry (r, t) gets the 1-D Poisson ML value w_rt >= 0 given its kept
  frames, then each voxel is the exposure- and trilinear-weighted average of those values.
* ``"mlem"``: the multiplicative EM update of the voxels with the latent split of each photon into Bragg
  and background, ``I_v <- I_v [sum P K phi w_v / (B + phi W)] / [sum P phi pol w_v]``, repeated
  ``inner_iterations`` times (docs/METHOD-NOTES.md: it over-fits weakly observed voxels).

Both sum numerators and denominators over each reflection's stabilizer (``model.stabilizer_sum``). The
background is the likelihood's (``background_mean``; a per-frame background scale enters here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.arrays import Kept, Shared
from emcjax.core.estep import frame_signal, rotation_tables
from emcjax.errors import ConfigError


def require_poisson(likelihood, rule: str) -> None:
    """The closed forms are the Poisson ML; other likelihoods take the gradient M-step."""
    if not getattr(likelihood, "poisson_counts", False):
        raise ConfigError(
            f"intensity_update={rule!r} is the closed-form Poisson update; likelihood "
            f"{type(likelihood).__name__} needs intensity_update='gradient'"
        )


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def _slice_of_device(n: int, axis) -> tuple[jax.Array | int, int]:
    """(start, size) of this device's slice of n items (n divisible by the axis size)."""
    if axis is None:
        return 0, n
    size = n // jax.lax.axis_size(axis)
    return jax.lax.axis_index(axis) * size, size


def _sum_to_slice(values: jax.Array, axis, start, size) -> jax.Array:
    """Sum over devices of per-entry values, this device's slice only."""
    if axis is None:
        return jax.lax.dynamic_slice_in_dim(values, start, size)
    return jax.lax.psum_scatter(values, axis, tiled=True)


def _all_slices(values: jax.Array, axis) -> jax.Array:
    return values if axis is None else jax.lax.all_gather(values, axis, tiled=True)


def _safe_divide(numerator, denominator):
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def kept_background(likelihood, kept: Kept) -> jax.Array:
    """(n,) background of every kept join pair in the likelihood's terms, per unit pol (photons)."""
    pol = jnp.where(kept.polarization > 0, kept.polarization, 1.0)
    return likelihood.background_mean(pol * kept.background, kept.frame) / pol


def entry_exposure(phi, kept: Kept, shared: Shared, n_shells: int, axis, start, size) -> jax.Array:
    """(size,) c_rt of this device's entries: sum over kept pairs (d, r) of P_dr phi_d over frames whose shell
    at t is valid, minus kept dead pixels: the scaled exposure each in-peak entry received."""
    ent = shared.entries
    n_rot = ent.n_rot
    pw = kept.pair_prob * phi[kept.pair_frame]
    per_rot = _psum(jax.ops.segment_sum(pw, kept.pair_rotation, num_segments=n_rot), axis)
    seg = kept.pair_rotation[:, None] * (n_shells + 1) + kept.pair_masked
    per_rot_shell = jax.ops.segment_sum(
        jnp.broadcast_to(pw[:, None], seg.shape).ravel(), seg.ravel(), num_segments=n_rot * (n_shells + 1)
    )
    per_rot_shell = _psum(per_rot_shell, axis).reshape(n_rot, n_shells + 1)
    rotation = jax.lax.dynamic_slice_in_dim(ent.rotation, start, size)
    pixel = jax.lax.dynamic_slice_in_dim(ent.pixel, start, size)
    exposure = per_rot[rotation] - per_rot_shell[rotation, shared.shell[pixel]]
    dead = jax.ops.segment_sum(kept.prob * phi[kept.frame] * kept.dead, kept.entry, num_segments=ent.rotation.shape[0])
    return exposure - _sum_to_slice(dead, axis, start, size)


def _back_project(values, shared: Shared, start, size, shape, axis) -> jax.Array:
    """Sum over devices of this device's entry values through the trilinear weights, stabilizer-summed:
    (n_asu * n_voxels,)."""
    voxels = jax.lax.dynamic_slice_in_dim(shared.entries.voxels, start, size)
    weights = jax.lax.dynamic_slice_in_dim(shared.entries.weights, start, size)
    flat = jax.ops.segment_sum((values[:, None] * weights).ravel(), voxels.ravel(), num_segments=shape[0] * shape[1] + 1)
    flat = _psum(flat, axis)
    return model_lib.stabilizer_sum(flat[:-1].reshape(shape), shared.tables).reshape(-1)


def reference_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 30,
                     axis=None):
    """The reference's per-pixel ML + compress (METHOD.md §7.1), with w_rt >= 0.

    For each in-peak entry e = (r, t): w_e solves sum_{kept d} P_dr phi_d pol_t = sum P_dr K_dt / (B_dt/phi_d + w),
    found by Newton's method from w = 0 (monotone for this convex decreasing function); w = 0 when the
    right side at 0 is already smaller. Then I_v = sum_e c_e w_ev w_e / sum_e c_e w_ev with c_e = sum P_dr phi_d;
    voxels no kept pair observes are set to 0 (as the reference does).
    """
    n_entries = shared.entries.rotation.shape[0]
    start, size = _slice_of_device(n_entries, axis)
    exposure = entry_exposure(phi, kept, shared, n_shells, axis, start, size)
    a = exposure * shared.polarization[jax.lax.dynamic_slice_in_dim(shared.entries.pixel, start, size)]
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count
    live = (pk > 0) & (phi_k > 0)
    b = jnp.where(live, kept_background(likelihood, kept) / jnp.where(live, phi_k, 1.0), 1.0)
    # Every device's kept photons, gathered once; each device solves the entries of its slice with no
    # communication inside the Newton loop (terms of other slices go to the dropped segment ``size``).
    entry, pk, b, live = (_all_slices(x, axis) for x in (kept.entry, pk, b, live))
    local = entry - start
    live &= (local >= 0) & (local < size)
    # Newton only on the entries that kept photons touch (at most one per term), compactly numbered
    n_terms = entry.shape[0]
    touched, compact = jnp.unique(jnp.where(live, local, size), size=n_terms, fill_value=size, return_inverse=True)
    compact = compact.reshape(-1)
    a_touched = jnp.append(a, 0.0)[touched]
    safe_pk = jnp.where(live, pk, 1.0)

    def g_and_slope(w):
        x = jnp.where(live, pk / (b + w[compact]), 0.0)
        g = jax.ops.segment_sum(x, compact, num_segments=n_terms) - a_touched
        curvature = jax.ops.segment_sum(jnp.where(live, x * x / safe_pk, 0.0), compact, num_segments=n_terms)
        return g, -curvature

    def body(_, w):
        g, slope = g_and_slope(w)
        descending = slope < 0
        step = jnp.where(descending, -g / jnp.where(descending, slope, -1.0), 0.0)
        return jnp.where(g > 0, w + step, w)

    w0 = jnp.zeros(n_terms, intensity.dtype)
    g0, _ = g_and_slope(w0)
    w_touched = jnp.where((g0 > 0) & (touched < size), jax.lax.fori_loop(0, newton_steps, body, w0), 0.0)
    w = jnp.zeros(size + 1, intensity.dtype).at[touched].set(w_touched)[:size]
    numerator = _back_project(exposure * w, shared, start, size, intensity.shape, axis)
    denominator = _back_project(exposure, shared, start, size, intensity.shape, axis)
    return _safe_divide(numerator, denominator).reshape(intensity.shape)


def mlem_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, inner_iterations: int = 1,
                axis=None):
    """Multiplicative EM update of the voxels (module docstring), ``inner_iterations`` times.

    Voxels with no exposure keep their value (0 would be absorbing under multiplicative updates).
    """
    ent = shared.entries
    start, size = _slice_of_device(ent.rotation.shape[0], axis)
    exposure = entry_exposure(phi, kept, shared, n_shells, axis, start, size)
    pol = shared.polarization[jax.lax.dynamic_slice_in_dim(ent.pixel, start, size)]
    denominator = _back_project(exposure * pol, shared, start, size, intensity.shape, axis)
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count * phi_k
    background = kept_background(likelihood, kept)
    voxels, weights = ent.voxels[kept.entry], ent.weights[kept.entry]
    n_flat = intensity.size + 1

    def body(_, flat):
        w = jnp.sum(weights * jnp.append(flat, 0.0)[voxels], axis=1)  # the model at the kept entries
        ratio = pk / (background + phi_k * w)
        numerator = _psum(jax.ops.segment_sum((ratio[:, None] * weights).ravel(), voxels.ravel(), num_segments=n_flat), axis)
        numerator = model_lib.stabilizer_sum(numerator[:-1].reshape(intensity.shape), shared.tables).reshape(-1)
        return jnp.where(denominator > 0, flat * _safe_divide(numerator, denominator), flat)

    return jax.lax.fori_loop(0, inner_iterations, body, intensity.reshape(-1)).reshape(intensity.shape)


def phi_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 40,
               axis=None, tables=None):
    """Per-frame 1-D Poisson ML of phi >= 0 given the responsibilities (METHOD.md §7.3).

    Maximises sum_{kept r} P_dr [sum_t K_dt log(B_dt + phi W_rt) - phi S_dr] by Newton's method from phi = 0
    (the gradient is convex and decreasing in phi); phi = 0 when the gradient at 0 is <= 0 (a blank frame).
    Frames without any kept weight (weight 0: rejected, other half set, padding) keep their phi.
    ``tables``: the rotation tables of ``intensity`` when the caller has them (the E-step's).

    Returns:
      ``(phi, used)``: the new, unnormalised phi of all frames and which frames were updated.
    """
    n_frames = phi.shape[0]
    tables = rotation_tables(intensity, shared, n_shells) if tables is None else tables
    signal = frame_signal(tables, kept.pair_rotation, kept.pair_masked)
    w = tables.tomogram[kept.entry]
    expected = jax.ops.segment_sum(kept.pair_prob * signal, kept.pair_frame, num_segments=n_frames)
    expected -= jax.ops.segment_sum(kept.prob * kept.dead * kept.polarization * w, kept.frame, num_segments=n_frames)
    pk = kept.prob * kept.count
    live = pk > 0
    safe_pk = jnp.where(live, pk, 1.0)
    background = kept_background(likelihood, kept)

    def grad(p):  # local sums: every frame's kept pairs are on one device
        x = jnp.where(live, pk * w / (background + p[kept.frame] * w), 0.0)
        g = jax.ops.segment_sum(x, kept.frame, num_segments=n_frames) - expected
        curvature = jax.ops.segment_sum(jnp.where(live, x * x / safe_pk, 0.0), kept.frame, num_segments=n_frames)
        return g, -curvature

    def body(_, p):
        g, slope = grad(p)
        descending = (g > 0) & (slope < 0)
        return jnp.where(descending, p - g / jnp.where(descending, slope, -1.0), p)

    p0 = jnp.zeros(n_frames, phi.dtype)
    g0, _ = grad(p0)
    p = jnp.where(g0 > 0, jax.lax.fori_loop(0, newton_steps, body, p0), 0.0)
    mass = jax.ops.segment_sum(kept.pair_prob, kept.pair_frame, num_segments=n_frames)
    p, mass = _psum(jnp.stack([jnp.where(mass > 0, p, 0.0), mass]), axis)
    used = mass > 0
    return jnp.where(used, p, phi), used


def normalise_phi(intensity, phi, used):
    """Mean-1 phi over the used frames, the inverse factor on the model (the likelihood is unchanged)."""
    n_used = jnp.sum(used)
    mean = _safe_divide(jnp.sum(jnp.where(used, phi, 0.0)), n_used.astype(phi.dtype))
    ok = mean > 0
    factor = jnp.where(ok, mean, 1.0)
    return intensity * factor, phi / factor
