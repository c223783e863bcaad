"""Per-shell background correction: a factor g_s on the data set's background of radial shell s, shared by all
frames and refined in the M-step (``--emc.refine-background-shells``).

With the correction the expected photons of valid pixel t (shell s_t) of frame d at rotation r are

    mu = c_d g_{s_t} pol_t B_d(s_t) + pol_t phi_d W_rt

(c_d: the likelihood's per-frame background scale, 1 for plain Poisson; B_d(s): the data set's recorded
background, photons per pixel per unit pol). The correction is applied to the data: the blocks' background
arrays are multiplied by g (:func:`corrected_blocks`), so that the E-step, the M-steps and the per-frame scale
update see g B as the data set's background and need no change.

M-step. Given the responsibilities P_dr of the kept pairs, the expected complete-data log-likelihood as a
function of a multiplicative update h_s of the current factors (g_s -> h_s g_s) is, shell by shell,

    Q_s(h) = sum_{kept photons t in s} P K log(h b_t + s_t) + O_s log h - h E_s + const,

with b_t = c_d g_s pol_t B_d(s) the current background photons at the photon's pixel, s_t = pol_t phi_d W_rt,
O_s = sum_d M_d N_ds - sum_{kept photons in s} P K the photons of shell s outside the peaks of the kept
rotations (M_d = sum_r P_dr, N_ds the frame's photons in shell s) and E_s = sum_d M_d c_d g_s [B_d(s) Pol_s -
dead_ds] the expected background photons of shell s (Pol_s = sum of pol over the shell's valid pixels; dead
pixels left out). dQ_s/dh is convex and decreasing in h: Newton's method from h0 = O_s / E_s
(:func:`emcjax.core.background.newton_factor`), the sums over kept photons reduced over the devices at every
step (each device holds photons of every shell). Frames are weighted by their frame weights, like every M-step.

Gauge. The likelihood sees the products c_d g_s only. When the per-frame scales are refined as well
(``refine_background``) the factors are rescaled after the update so that sum_s g_s R_s = sum_s R_s (R_s: the
recorded background photons of shell s over the used frames) and the per-frame scales take the inverse
factor: no likelihood changes. Without per-frame refinement g also carries the overall background level.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from emcjax.core.arrays import BlockArrays, Kept, Shared
from emcjax.core.background import SCALE_FLOOR, kept_bragg, newton_factor


def entry_shell(shared: Shared, entry: jax.Array) -> jax.Array:
    """int32 radial shell of the pixel of each in-peak entry (any shape)."""
    return shared.shell[shared.entries.pixel[entry]]


def corrected_blocks(blocks: BlockArrays, shared: Shared, factor: jax.Array) -> BlockArrays:
    """``blocks`` with the background of shell s multiplied by ``factor[s]`` ((n_shells,), unit-less): the
    per-shell table, the join pairs and the photon records. Any leading axes (one block, or blocks stacked)."""
    join = blocks.join
    if join is not None:
        join = join._replace(background=join.background * factor[entry_shell(shared, join.entry)])
    ph = blocks.photons
    return blocks._replace(background=blocks.background * factor, join=join,
                           photons=ph._replace(background=ph.background * factor[ph.shell]))


def frame_scale(likelihood, n_frames: int, n_padded: int) -> jax.Array:
    """(n_padded,) the likelihood's background factor c_d of every frame (1 for padding frames and for
    likelihoods without a per-frame scale)."""
    c = jnp.broadcast_to(likelihood.background_mean(jnp.ones(n_frames), jnp.arange(n_frames)), (n_frames,))
    return jnp.pad(c, (0, n_padded - n_frames), constant_values=1.0)


def shell_totals(shared: Shared, blocks: BlockArrays, mass, scale, factor, n_shells: int) -> jax.Array:
    """(3, n_shells) per-shell sums over the frames of ``blocks`` (stacked: a leading block axis), corrected by
    ``factor`` (:func:`corrected_blocks`): photons sum_d M_d N_ds, expected background photons E_s (module
    docstring), and the recorded background photons R_s of the used frames (weights; before the correction).

    Args:
      mass: (n_padded,) M_d, the kept probability mass of every frame (weight x sum_r P_dr).
      scale: (n_padded,) c_d (:func:`frame_scale`).
      factor: (n_shells,) current g_s.
    """
    n_local = blocks.background.shape[1]
    frame = blocks.frame_start[:, None] + jnp.arange(n_local)[None, :]
    pol = jax.ops.segment_sum(shared.polarization, shared.shell, num_segments=n_shells)
    ph = blocks.photons
    ph_frame = blocks.frame_start[:, None] + ph.frame
    mc = mass * scale
    photons = jax.ops.segment_sum((mass[ph_frame] * ph.count).ravel(), ph.shell.ravel(), num_segments=n_shells)
    dead = jax.ops.segment_sum((mc[ph_frame] * ph.dead * ph.background).ravel(), ph.shell.ravel(),
                               num_segments=n_shells)
    expected = jnp.einsum("bl,bls->s", mc[frame], blocks.background) * pol - dead
    recorded = jnp.einsum("bl,bls->s", blocks.weight, blocks.background) * pol / factor
    return jnp.stack([photons, jnp.maximum(expected, 0.0), recorded])


def shell_update(intensity, phi, likelihood, kept: Kept, shared: Shared, totals, n_frames: int,
                 newton_steps: int = 40, axis=None) -> jax.Array:
    """(n_shells,) ML multiplicative update h_s of the per-shell factors given the responsibilities.

    Args:
      intensity: (n_asu, n_voxels) model; phi: (n_padded,) scales (those of this M-step).
      likelihood: a Poisson likelihood (its per-frame background scale enters b).
      kept: this device's kept pairs (backgrounds already corrected by the current factors).
      totals: (3, n_shells) :func:`shell_totals` summed over every device.
      axis: mesh axis of the frames (None: one device).

    Returns:
      (n_shells,) h_s >= ``SCALE_FLOOR`` (1 for shells without expected background).
    """
    n_shells = totals.shape[1]
    reduce = (lambda x: x) if axis is None else (lambda x: jax.lax.psum(x, axis))
    pk = kept.prob * kept.count
    pk = jnp.where(pk > 0, pk, 0.0)
    shell = entry_shell(shared, kept.entry)
    frame = jnp.minimum(kept.frame, n_frames - 1)
    b = likelihood.background_mean(kept.polarization * kept.background, frame)
    s = kept_bragg(intensity, phi, kept, shared)
    inside = reduce(jax.ops.segment_sum(pk, shell, num_segments=n_shells))
    outside = jnp.maximum(totals[0] - inside, 0.0)
    h = newton_factor(outside, totals[1], pk, b, s, shell, n_shells, newton_steps, reduce=reduce)
    return jnp.where(totals[1] > 0, h, 1.0)


def shell_mstep(intensity, phi, likelihood, factor, kept: Kept, batch, spec):
    """The per-shell factors after one M-step, and the likelihood (its per-frame scales re-gauged when they
    are refined too; module docstring).

    Args:
      factor: (n_shells,) current g_s.
      batch: the step's :class:`emcjax.core.step.Batch`, its blocks corrected by ``factor``.
      spec: the :class:`emcjax.core.step.StepSpec` (n_frames, n_padded, n_shells, refine_background, axis).

    Returns:
      ``(likelihood, factor)``: new (n_shells,) float32 factors >= ``SCALE_FLOOR``.
    """
    reduce = (lambda x: x) if spec.axis is None else (lambda x: jax.lax.psum(x, spec.axis))
    mass = reduce(jax.ops.segment_sum(kept.pair_prob, jnp.minimum(kept.pair_frame, spec.n_padded - 1),
                                      num_segments=spec.n_padded))
    scale = frame_scale(likelihood, spec.n_frames, spec.n_padded)
    totals = reduce(shell_totals(batch.shared, batch.blocks, mass, scale, factor, spec.n_shells))
    h = shell_update(intensity, phi, likelihood, kept, batch.shared, totals, spec.n_frames, axis=spec.axis)
    new = jnp.maximum(factor * h, SCALE_FLOOR)
    if spec.refine_background:
        recorded = totals[2]
        gauge = jnp.sum(new * recorded) / jnp.maximum(jnp.sum(recorded), 1e-30)
        gauge = jnp.where(gauge > 0, gauge, 1.0)
        new = new / gauge
        likelihood = dataclasses.replace(likelihood, scale=likelihood.scale * gauge)
    return likelihood, new.astype(factor.dtype)
