"""Candidate mode by direct photon-peak tests: the E-step without per-rotation in-peak entry tables.

When almost every candidate rotation belongs to one frame (a few hundred candidates per frame from spot
matching on a fine grid), building every candidate's in-peak entries costs far more than the photons that
need them. Here every (photon record, candidate) pair is tested directly on the device:

    q_crystal = C_r q_t (C_r = crystal_from_lab of the candidate), nearest lattice point, in-peak distance
    test and trilinear model value (``model.locate``), then the likelihood's photon term,

vectorised over records x candidates, frames in chunks (``lax.map``). This is exactly the join of the table
path (emcjax.join): a record is in the join of (frame, r) iff its pixel is an in-peak entry of r, which is
the same test on the same float32 q. The expected signal S(r, shell) comes from the reflections near the
Ewald sphere (:func:`exact_signal`: each candidate's in-peak pixels are found as the entries are, then sliced
and summed, never stored), so the log-likelihoods equal the table path's up to float32 summation order.

Shapes: ``n_local`` frames of the block, ``n_slots`` candidate slots per frame, ``n_records`` photon and
dead-pixel records per frame (padded with zero counts), ``n_rot`` distinct candidate rotations of the block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.arrays import BlockArrays, Hyper, Shared
from emcjax.core.estep import RotationTables, frame_signal, local_phi, responsibilities
from emcjax.core.step import frame_constants
from emcjax.rotations import crystal_from_lab

FRAME_CHUNK = 8  # frames per step of the photon x candidate loop (memory: chunk x n_slots x n_records x ~80 B)


class Records(NamedTuple):
    """A block's photon and dead-pixel records, padded per frame (device arrays).

    Attributes:
      pixel: (n_local, n_records) int32 valid pixel (0 on padding).
      count: (n_local, n_records) float32 photons (0 for dead pixels and padding).
      dead: (n_local, n_records) float32 1 for a dead pixel.
      background: (n_local, n_records) float32 B_d(s_t), photons per pixel per unit pol (floored; 1 on padding).
    """

    pixel: jax.Array
    count: jax.Array
    dead: jax.Array
    background: jax.Array


class DirectBlock(NamedTuple):
    """One block of the direct path (a pytree).

    Attributes:
      local: per-frame arrays (``join`` and ``cell_offsets`` are None; ``candidates`` index ``quaternions``).
      quaternions: (n_rot, 4) float32 the block's distinct candidate rotations.
      log_prior: (n_rot,) float32 their log prior (normalised over the sampling; -inf on padding).
      records: the frames' photon and dead-pixel records padded per frame, or None: only the reference
        :func:`photon_terms` (and :func:`estep_direct` without ``photon``) read them; a run passes the packed
        ``rows`` instead (emcjax.direct_blocks.DirectBlockData.with_device_records builds them on demand).
      frame_reflections: (n_local, h) int32 reflections that can cut the Ewald sphere at any of the frame's
        candidates (the tabulated signal, emcjax.core.cut_signal), or None.
      rows, row_frame: the same records packed in rows (emcjax.core.packed_photons), each row's local frame.
    """

    local: BlockArrays
    quaternions: jax.Array
    log_prior: jax.Array
    records: Records | None = None
    frame_reflections: jax.Array | None = None
    rows: Records | None = None
    row_frame: jax.Array | None = None


def _in_peak(rot: jax.Array, q_lab: jax.Array, tables: model_lib.GridTables):
    """(refl, voxels, weights) of lab points ``q_lab`` (..., 3) at crystal_from_lab matrices ``rot`` (..., 3, 3)
    (broadcast): q_crystal computed elementwise, as the entries are (model.build_entries_by_reflection)."""
    q_crystal = jnp.sum(rot * q_lab[..., None, :], axis=-1)
    shape = q_crystal.shape[:-1]
    refl, voxels, weights = jax.vmap(model_lib.locate, in_axes=(0, None))(q_crystal.reshape(-1, 3), tables)
    return refl.reshape(shape), voxels.reshape(*shape, 8), weights.reshape(*shape, 8)


def photon_terms(intensity, phi_local, likelihood, geometry: "Geometry", block: DirectBlock) -> jax.Array:
    """(n_local, n_slots) sum over the frame's records inside a peak of the candidate of the photon term
    (``photon_excess`` for photons, ``-zero_term`` for dead pixels), nats: the join part of L_dr."""
    local, rec = block.local, block.records
    if rec is None:
        raise ValueError("photon_terms needs the block's records padded per frame (DirectBlockData.with_device_records)")
    n_local, n_slots = local.candidates.shape
    rot_all = crystal_from_lab(block.quaternions)
    flat = model_lib.pad_model(intensity)
    frames = local.frame_start + jnp.arange(n_local)

    def one(xs):
        cand, pixel, count, dead, background, phi_d, frame = xs
        refl, voxels, weights = _in_peak(rot_all[cand][:, None], geometry.q_lab[pixel][None, :], geometry.tables)
        pol = geometry.polarization[pixel][None, :]
        bragg = pol * phi_d * jnp.sum(weights * flat[voxels], axis=-1)  # (n_slots, n_records)
        bg = pol * background[None, :]
        inside = refl >= 0
        photon = jnp.where(inside & (count > 0), likelihood.photon_excess(count, bragg, bg, frame), 0.0)
        return jnp.sum(photon - jnp.where(inside, dead * likelihood.zero_term(bragg, bg, frame), 0.0), axis=1)

    xs = (local.candidates, rec.pixel, rec.count, rec.dead, rec.background, phi_local, frames)
    pad = -n_local % FRAME_CHUNK
    xs = jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), xs)
    chunks = jax.tree.map(lambda x: x.reshape(-1, FRAME_CHUNK, *x.shape[1:]), xs)
    out = jax.lax.map(lambda c: jax.vmap(one)(c), chunks)
    return out.reshape(-1, n_slots)[:n_local]


class Geometry(NamedTuple):
    """Replicated geometry of the direct kernels: ``Shared`` fields plus the valid pixels' lab q."""

    polarization: jax.Array  # (n_pix,) float32 pol x solid angle
    shell: jax.Array  # (n_pix,) int32
    tables: model_lib.GridTables
    q_lab: jax.Array  # (n_pix, 3) float32 lab-frame q (1/Å)


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_box", "n_shells"))
def exact_signal(intensity, quaternions, proj, geometry: Geometry, shape, h_max: int, n_box: int, n_shells: int):
    """Expected Bragg photons S[r, shell] at phi = 1 of a chunk of rotations, summed over their in-peak pixels
    found from the reflections near the Ewald sphere (model.reflection_pixels) without storing entries.

    Returns ``(signal (n_rot, n_shells) float32, counts (n_rot,) int32)``: complete where counts <= h_max.
    """
    pixel, counts = model_lib.reflection_pixels(quaternions, proj, geometry.tables, shape, h_max, n_box)
    rot = crystal_from_lab(quaternions)
    inside = pixel >= 0
    safe = jnp.maximum(pixel, 0)
    _, voxels, weights = _in_peak(rot[:, None], geometry.q_lab[safe], geometry.tables)
    value = jnp.sum(weights * model_lib.pad_model(intensity)[voxels], axis=-1) * geometry.polarization[safe]
    seg = jnp.arange(pixel.shape[0])[:, None] * n_shells + geometry.shell[safe]
    signal = jax.ops.segment_sum(jnp.where(inside, value, 0.0).ravel(), seg.ravel(), num_segments=pixel.shape[0] * n_shells)
    return signal.reshape(-1, n_shells), counts


@jax.jit
def candidate_signal(signal: jax.Array, local: BlockArrays) -> jax.Array:
    """(n_local, n_slots) S_dr over each frame's valid shells from the (n_rot, n_shells) signal of the block's
    rotations (``estep.frame_signal``)."""
    padded = jnp.concatenate([signal, jnp.zeros((signal.shape[0], 1), signal.dtype)], axis=1)
    tables = RotationTables(tomogram=None, signal=padded, total=signal.sum(axis=1))
    return frame_signal(tables, local.candidates, local.masked_shells[:, None, :])


class DirectEStep(NamedTuple):
    """A block's E-step: the pruned posterior and what the M-step handoff needs.

    Attributes:
      logl: (n_local, n_slots) float32 L_dr (no prior, no frame constant).
      slot, prob: (n_local, k) kept candidate slots and weight x probability (0 where pruned).
      inside: (n_local, k, n_records) bool whether each record lies in a peak of the kept slot's rotation (None
        with packed photon terms).
      stats: (log_likelihood, max_prob, best_rotation (block rotation index), n_kept), (n_local,) each.
    """

    logl: jax.Array
    slot: jax.Array
    prob: jax.Array
    inside: jax.Array
    stats: tuple


@functools.partial(jax.jit, static_argnames=("k",))
def estep_direct(intensity, phi, state_likelihood, hyper: Hyper, geometry: Geometry, block: DirectBlock,
                 signal: jax.Array, k: int, photon: jax.Array | None = None) -> DirectEStep:
    """E-step of one block by direct photon-peak tests; ``signal`` (n_local, n_slots) the expected signal S_dr
    at phi = 1 of every candidate over the frame's valid shells (:func:`candidate_signal` of
    :func:`exact_signal`, or emcjax.core.cut_signal.frame_signal); ``photon`` (n_local, n_slots) the photon
    terms (emcjax.core.packed_photons.photon_terms; then ``inside`` is None: the caller tests the kept pairs'
    records itself, packed_photons.pair_inside), else :func:`photon_terms` here."""
    local = block.local
    phi_local = local_phi(phi, local)
    packed = photon
    if photon is None:
        photon = photon_terms(intensity, phi_local, state_likelihood, geometry, block)
    if not state_likelihood.linear_zero_term:
        raise NotImplementedError("the direct path needs a likelihood whose zero-count term is linear (Poisson)")
    zero = -phi_local[:, None] * signal
    logl = photon + zero
    shared = Shared(entries=None, polarization=geometry.polarization, shell=geometry.shell, log_prior=block.log_prior,
                    tables=geometry.tables)
    resp = responsibilities(logl, shared, local, hyper, k)
    constant = frame_constants(state_likelihood, shared, local)
    used = (local.weight > 0) & jnp.isfinite(resp.log_evidence)
    log_likelihood = jnp.where(used, local.weight * (jnp.where(used, resp.log_evidence, 0.0) + constant), 0.0)
    rows = jnp.arange(local.candidates.shape[0])
    best = local.candidates[rows, resp.best_slot]
    inside = None
    if packed is None:
        kept_rot = crystal_from_lab(block.quaternions)[local.candidates[rows[:, None], resp.slot]]  # (n_local, k, 3, 3)
        refl, _, _ = _in_peak(kept_rot[:, :, None], geometry.q_lab[block.records.pixel][:, None, :], geometry.tables)
        inside = refl >= 0
    stats = (log_likelihood, resp.max_prob, best, jnp.sum(resp.prob > 0, axis=1, dtype=jnp.int32))
    return DirectEStep(logl, resp.slot, resp.prob * local.weight[:, None], inside, stats)
