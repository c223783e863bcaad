"""E-step kernels: log-likelihood of (frame, candidate rotation) pairs and responsibilities.

Model (METHOD.md §5-7): the count of valid pixel t of frame d at orientation r follows the likelihood
``p(K | mu)`` (emcjax.likelihood) with expected photons ``mu_drt = mu0_dt + b_drt``, background
``mu0_dt = background_mean(pol_t B_d(s_t))`` (the likelihood's model of the data set's background) and Bragg part ``b_drt = pol_t phi_d W_rt``. Pixels outside every
peak of r do not depend on r, so up to per-frame constants

    L_dr = sum_{join pairs (t, r) of d} [photon_excess(K_dt, b, mu0) - dead_dt zero_term(b, mu0)] + Z_dr,
    Z_dr = sum_{in-peak pixels t of r in the valid shells of d} zero_term(b_drt, mu0_dt),

where the join (emcjax.join) holds the photons and dead pixels of d inside a peak at r. For likelihoods whose
zero-count term is linear (``zero_term = -b``: Poisson), ``Z_dr = -phi_d S_dr`` with the expected signal
``S_dr = S_r(all shells) - sum over the frame's masked shells of S_r(shell)``, one table per rotation and
shell. Otherwise Z is summed exactly over the in-peak entries, all frames of the device at once, in chunks of
entries: n_local x n_entries evaluations per block (docs/RESEARCH.md gives the cost).

The posterior uses ``beta x L_dr + log w_r`` (beta: inverse temperature, 1 for plain EM). Everything here is
written for the frames of one device; emcjax.emc lifts it over the mesh with ``jax.shard_map``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.arrays import BlockArrays, Hyper, Shared

ZERO_TERM_CHUNK = 4096  # in-peak entries per chunk of the exact zero-count term


class RotationTables(NamedTuple):
    """Per-rotation quantities of the current model, computed once per E-step.

    Attributes:
      tomogram: (n_entries,) float32 W at every in-peak entry.
      signal: (n_rot, n_shells + 1) float32 expected Bragg photons per shell at phi = 1 (last column 0).
      total: (n_rot,) float32 expected Bragg photons over all shells at phi = 1.
    """

    tomogram: jax.Array
    signal: jax.Array
    total: jax.Array


@functools.partial(jax.jit, static_argnames="n_shells")
def rotation_tables(intensity: jax.Array, shared: Shared, n_shells: int) -> RotationTables:
    """Tomograms and expected signals of every rotation for the model ``intensity`` (n_asu, n_voxels)."""
    s = model_lib.expected_signal(intensity, shared.entries, shared.polarization, shared.shell, n_shells)
    return RotationTables(
        tomogram=model_lib.tomogram(intensity, shared.entries),
        signal=jnp.concatenate([s, jnp.zeros((s.shape[0], 1), s.dtype)], axis=1),
        total=s.sum(axis=1),
    )


def frame_signal(tables: RotationTables, rotation: jax.Array, masked_shells: jax.Array) -> jax.Array:
    """Expected Bragg photons S_dr at phi = 1 over the frame's valid shells.

    Args:
      tables: rotation tables.
      rotation: (...,) int32 rotations.
      masked_shells: (..., n_masked) int32 the frame's excluded shells (n_shells = padding).
    """
    return tables.total[rotation] - tables.signal[rotation[..., None], masked_shells].sum(axis=-1)


def local_phi(phi: jax.Array, local: BlockArrays) -> jax.Array:
    """(n_local,) phi of the device's frames (``phi`` holds every frame, padded to whole blocks)."""
    return jax.lax.dynamic_slice(phi, (local.frame_start,), (local.candidates.shape[0],))


def join_terms(likelihood, tables_tomogram: jax.Array, phi_frame: jax.Array, frame: jax.Array, join) -> jax.Array:
    """Per join pair: photon_excess for photons, -zero_term for dead pixels, 0 for padding (nats)."""
    bragg = join.polarization * phi_frame * tables_tomogram[join.entry]
    background = join.polarization * join.background  # the data set's; the likelihood applies its own model
    photon = jnp.where(join.count > 0, likelihood.photon_excess(join.count, bragg, background, frame), 0.0)
    return photon - join.dead * likelihood.zero_term(bragg, background, frame)


def exact_zero_terms(likelihood, tomogram: jax.Array, phi_local: jax.Array, shared: Shared, local: BlockArrays):
    """(n_local, n_rot) Z_dr summed over every in-peak entry of every rotation (non-linear zero terms).

    Cost: n_local x n_entries evaluations of ``zero_term`` (chunks of ``ZERO_TERM_CHUNK`` entries).
    """
    ent = shared.entries
    n_local = phi_local.shape[0]
    n_entries = ent.rotation.shape[0]
    n_chunks = -(-n_entries // ZERO_TERM_CHUNK)
    pad = n_chunks * ZERO_TERM_CHUNK - n_entries
    pixel = jnp.pad(ent.pixel, (0, pad)).reshape(n_chunks, -1)
    rotation = jnp.pad(ent.rotation, (0, pad)).reshape(n_chunks, -1)
    w = jnp.pad(tomogram, (0, pad)).reshape(n_chunks, -1)
    real = (jnp.arange(n_chunks * ZERO_TERM_CHUNK) < n_entries).reshape(n_chunks, -1)
    frame = local.frame_start + jnp.arange(n_local)[:, None]

    def chunk(total, xs):
        pix, rot, w_c, ok = xs
        pol = shared.polarization[pix]
        bg = local.background[:, shared.shell[pix]]  # (n_local, chunk)
        valid = ok[None, :] & (bg > 0)
        z = likelihood.zero_term(pol * phi_local[:, None] * w_c, pol * jnp.where(valid, bg, 1.0), frame)
        z = jnp.where(valid, z, 0.0)
        return total + jax.ops.segment_sum(z.T, rot, num_segments=ent.n_rot).T, None

    total, _ = jax.lax.scan(chunk, jnp.zeros((n_local, ent.n_rot), tomogram.dtype), (pixel, rotation, w, real))
    return total


def block_log_likelihood(tables: RotationTables, phi: jax.Array, likelihood, shared: Shared, local: BlockArrays):
    """Log-likelihood L_dr (no prior, up to the frame constant) of every (frame, candidate slot) of one device.

    Args:
      tables: rotation tables of the current model.
      phi: (n_frames_padded,) float32 scales of all frames.
      likelihood: the likelihood model.
      shared: replicated arrays.
      local: this device's frames.

    Returns:
      (n_local, n_slots) float32 in nats (0 on padding slots: mask with ``local.candidate_mask``).
    """
    n_local, n_slots = local.candidates.shape
    join = local.join
    phi_local = local_phi(phi, local)
    frame_of_pair = join.cell // n_slots
    terms = join_terms(likelihood, tables.tomogram, phi_local[frame_of_pair], local.frame_start + frame_of_pair, join)
    photon = jax.ops.segment_sum(terms, join.cell, num_segments=n_local * n_slots, indices_are_sorted=True)
    if likelihood.linear_zero_term:
        zero = -phi_local[:, None] * frame_signal(tables, local.candidates, local.masked_shells[:, None, :])
    else:
        z = exact_zero_terms(likelihood, tables.tomogram, phi_local, shared, local)
        zero = jnp.take_along_axis(z, local.candidates, axis=1)
    return photon.reshape(n_local, n_slots) + zero


def log_posterior(logl: jax.Array, shared: Shared, local: BlockArrays, inverse_temperature=1.0) -> jax.Array:
    """beta x L_dr + log w_r on real slots, -inf on padding slots and padding frames (weight-0 frames keep
    their posterior: rejection is applied to the M-steps)."""
    value = inverse_temperature * logl + shared.log_prior[local.candidates]
    return jnp.where(local.candidate_mask, value, -jnp.inf)


class Responsibilities(NamedTuple):
    """Pruned posterior over rotations, padded (n_frames, k).

    Attributes:
      slot: (n_frames, k) int32 candidate slot, most likely first.
      prob: (n_frames, k) float32 renormalised probability (0 where pruned).
      log_evidence: (n_frames,) float32 log sum_r w_r p(K_d | r) at beta = 1, before pruning (nats, up to the
        frame constant).
      max_prob: (n_frames,) float32 probability of the most likely rotation before pruning.
      best_slot: (n_frames,) int32 slot of the most likely rotation.
    """

    slot: jax.Array
    prob: jax.Array
    log_evidence: jax.Array
    max_prob: jax.Array
    best_slot: jax.Array


def _safe_exp_diff(a, b, finite):
    return jnp.where(finite, jnp.exp(jnp.where(finite, a - b, 0.0)), 0.0)


def prune(log_posterior: jax.Array, hyper: Hyper, k: int, log_evidence: jax.Array | None = None) -> Responsibilities:
    """Softmax over candidates, then the reference's pruning (METHOD.md §6.5) capped at the top ``k``.

    Keeps the most likely rotations until their cumulative probability reaches ``hyper.prune_mass``, drops
    those below ``hyper.prune_min`` (the most likely one is always kept), renormalises (prune_mass = 1 and
    prune_min = 0 with k = n_slots: soft responsibilities). Frames without candidates (a row of -inf) get
    no rotation (probabilities 0, log evidence -inf). The thresholds are traced: ``vmap`` over them works.

    Args:
      log_posterior: (n_frames, n_slots) log w_r + beta L_dr, -inf on padding.
      hyper: the thresholds.
      k: static top-k cap.
      log_evidence: (n_frames,) what to report as the log evidence (default: log-sum-exp of the rows).
    """
    k = min(k, log_posterior.shape[1])
    top, slot = jax.lax.top_k(log_posterior, k)
    norm = jax.nn.logsumexp(log_posterior, axis=1)
    finite = jnp.isfinite(norm)
    p = _safe_exp_diff(top, norm[:, None], finite[:, None] & jnp.isfinite(top))
    before = jnp.cumsum(p, axis=1) - p
    keep = (before < hyper.prune_mass) & (p >= hyper.prune_min)
    keep = keep.at[:, 0].set(finite)
    p = jnp.where(keep, p, 0.0)
    total = p.sum(axis=1, keepdims=True)
    p = jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), 0.0)
    # max over the row, not top[:, 0]: slicing top_k's output makes XLA:CPU fall back to a full sort (30x slower)
    max_prob = _safe_exp_diff(jnp.max(log_posterior, axis=1), norm, finite)
    log_evidence = norm if log_evidence is None else log_evidence
    best_slot = jnp.argmax(log_posterior, axis=1).astype(jnp.int32)  # not slot[:, 0]: see max_prob
    return Responsibilities(slot.astype(jnp.int32), p, log_evidence, max_prob, best_slot)


def responsibilities(logl: jax.Array, shared: Shared, local: BlockArrays, hyper: Hyper, k: int) -> Responsibilities:
    """:func:`prune` of the tempered posterior of one device's block; the log evidence is at beta = 1."""
    tempered = log_posterior(logl, shared, local, hyper.inverse_temperature)
    log_evidence = jax.lax.cond(  # a second log-sum-exp only when annealing
        hyper.inverse_temperature == 1.0,
        lambda: jax.nn.logsumexp(tempered, axis=1),
        lambda: jax.nn.logsumexp(log_posterior(logl, shared, local), axis=1),
    )
    return prune(tempered, hyper, k, log_evidence)
