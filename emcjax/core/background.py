"""Background M-step: the per-frame background scale c_d of the Poisson-with-background-scale likelihood.

Counts of frame d are Poisson with mean ``c_d b_t + s_rt`` (``b_t = pol_t B_d(shell_t)``, the data set's
background, photons; ``s_rt = pol_t phi_d W_rt``, the Bragg signal of rotation r). Given the responsibilities
P_dr of the kept (frame, rotation) pairs, the expected log-likelihood of frame d as a function of c is

    Q_d(c) = sum_r P_dr [ sum_{photon pixels t} K_t log(c b_t + s_rt) - c B_d ] + const,

where B_d = sum of b_t over the frame's valid, live pixels (every pixel, in a peak or not). Photons outside
the peaks of r (s_rt = 0) add K_t log c: with N_d photons in the frame and M_d = sum_r P_dr,

    dQ_d/dc = (M_d N_d - sum_{kept photons} P K) / c + sum_{kept photons} P K b / (c b + s) - M_d B_d,

a convex, decreasing function of c > 0. Newton's method from c0 = (M_d N_d - sum P K) / (M_d B_d) (where the
derivative is >= 0) increases monotonically to the root, like the phi update (emcjax.core.mstep). The kept
photons are the kept join pairs; N_d and B_d come from the frames' photon records (:func:`frame_totals`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.arrays import BlockArrays, Kept, Shared

SCALE_FLOOR = 1e-3
"""Smallest background scale the update returns (a frame without a single photon would otherwise go to 0)."""


def frame_totals(shared: Shared, local: BlockArrays) -> tuple[jax.Array, jax.Array]:
    """(photons, background) of one device's block, (n_local,) each: N_d, the frame's photons on valid pixels,
    and B_d, its expected background photons at scale 1 (pol x B over the valid pixels, dead ones left out)."""
    n_local, n_shells = local.background.shape
    ph = local.photons
    pol_per_shell = jax.ops.segment_sum(shared.polarization, shared.shell, num_segments=n_shells)
    photons = jax.ops.segment_sum(ph.count, ph.frame, num_segments=n_local)
    dead = jax.ops.segment_sum(ph.dead * ph.background, ph.frame, num_segments=n_local)
    return photons, local.background @ pol_per_shell - dead


def kept_bragg(intensity, phi, kept: Kept, shared: Shared) -> jax.Array:
    """(n,) expected Bragg photons s = pol x phi_d x W_rt of the kept join pairs (photons)."""
    ent = shared.entries
    flat = model_lib.pad_model(intensity)
    w = jnp.sum(ent.weights[kept.entry] * flat[ent.voxels[kept.entry]], axis=1)
    return kept.polarization * phi[kept.frame] * w


def newton_factor(outside, expected, pk, b, s, segment, n_segments: int, newton_steps: int = 40,
                  reduce=lambda x: x) -> jax.Array:
    """Root c > 0 of each segment's dQ/dc = outside / c + sum_t pk_t b_t / (c b_t + s_t) - expected (Newton).

    The shared solver of the per-frame scale and the per-shell correction (emcjax.core.background_shells):
    dQ/dc is convex and decreasing in c, so Newton's method from c0 = outside / expected (where it is >= 0)
    increases monotonically to the root.

    Args:
      outside, expected: (n_segments,) photons outside the peaks (P x K summed) and expected background photons
        (P x b summed over every pixel) of each segment at factor 1; already reduced over devices.
      pk, b, s: (n,) P x K (0 on padding and dead pixels), background and Bragg photons of the kept photons.
      segment: (n,) int32 segment of each kept photon.
      reduce: sum of a (2, n_segments) array over the devices holding kept photons of a segment (a psum when
        a segment's photons are spread over devices; the identity otherwise).

    Returns:
      (n_segments,) factors >= ``SCALE_FLOOR`` (``SCALE_FLOOR`` where the root lies below it or
      ``expected`` is 0).
    """
    live = pk > 0
    safe_pk = jnp.where(live, pk, 1.0)

    def grad(c):
        x = jnp.where(live, pk * b / (c[segment] * b + s), 0.0)
        sums = reduce(jnp.stack([jax.ops.segment_sum(x, segment, num_segments=n_segments),
                                 jax.ops.segment_sum(jnp.where(live, x * x / safe_pk, 0.0), segment,
                                                     num_segments=n_segments)]))
        return outside / c + sums[0] - expected, -(outside / c**2 + sums[1])

    def body(_, c):
        g, slope = grad(c)
        step = jnp.where((g > 0) & (slope < 0), -g / jnp.where(slope < 0, slope, -1.0), 0.0)
        return c + step

    ok = expected > 0
    floor = jnp.full(n_segments, SCALE_FLOOR, outside.dtype)
    c0 = jnp.maximum(jnp.where(ok, outside / jnp.where(ok, expected, 1.0), SCALE_FLOOR), SCALE_FLOOR)
    g_floor, _ = grad(floor)
    return jnp.where(ok & (g_floor > 0), jax.lax.fori_loop(0, newton_steps, body, c0), SCALE_FLOOR)


def scale_update(intensity, phi, scale, kept: Kept, shared: Shared, photons, background, newton_steps: int = 40,
                 axis=None) -> jax.Array:
    """Per-frame ML of the background scale given the responsibilities (module docstring).

    Args:
      intensity: (n_asu, n_voxels) model; phi: (n_padded,) scales (the model and phi of this M-step).
      scale: (n_frames,) current background scales c_d (frames without kept pairs keep theirs).
      kept: this device's kept pairs.
      photons, background: (n_padded,) N_d and B_d of every frame (:func:`frame_totals`, global order).
      axis: mesh axis of the frames (each frame's kept pairs live on one device; one psum at the end).

    Returns:
      (n_frames,) float32 new scales, >= ``SCALE_FLOOR``.
    """
    n_frames = scale.shape[0]
    frame = jnp.minimum(kept.frame, n_frames - 1)
    pk = kept.prob * kept.count
    live = pk > 0
    b = kept.polarization * kept.background
    s = kept_bragg(intensity, phi, kept, shared)
    pair_frame = jnp.minimum(kept.pair_frame, n_frames - 1)
    mass = jax.ops.segment_sum(kept.pair_prob, pair_frame, num_segments=n_frames)
    outside = mass * photons[:n_frames] - jax.ops.segment_sum(jnp.where(live, pk, 0.0), frame, num_segments=n_frames)
    outside = jnp.maximum(outside, 0.0)
    expected = mass * background[:n_frames]
    ok = (mass > 0) & (expected > 0)
    c = newton_factor(outside, expected, jnp.where(live, pk, 0.0), b, s, frame, n_frames, newton_steps)
    c = jnp.where(ok, c, SCALE_FLOOR)
    c, mass = (x if axis is None else jax.lax.psum(x, axis) for x in (jnp.where(ok, c, 0.0), jnp.where(ok, mass, 0.0)))
    return jnp.where(mass > 0, c, scale)
