"""E-step kernels: log-likelihood of (frame, candidate rotation) pairs and pruned responsibilities.

Model (METHOD.md §5-7): the photon count of valid pixel t in frame d at orientation r is Poisson with mean
``lambda_drt = pol_t (B_d(s_t) + phi_d W_rt)``. Up to per-frame constants

    L_dr = log w_r + sum_{join pairs (t, r) of d} [K_dt log1p(phi_d W_rt / B_dt) + dead_dt phi_d pol_t W_rt]
                   - phi_d S_dr,        S_dr = sum_{valid t of d} pol_t W_rt,

where the join (emcjax.join) holds the photons and dead pixels of d that lie inside a peak at r, and
S_dr = S_r(all shells) - sum over the frame's masked shells of S_r(shell) comes from the expected signal
per rotation and shell. Everything here is written for the frames of one device; emcjax.emc lifts it over
the mesh with ``jax.shard_map``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.join import JoinArrays

_EPS = 1e-20


class Shared(NamedTuple):
    """Arrays every device holds whole (replicated).

    Attributes:
      entries: in-peak entries of the rotations.
      polarization: (n_pix,) float32 pol x solid angle of the valid pixels.
      shell: (n_pix,) int32 radial shell of the valid pixels.
      log_prior: (n_rot,) float32 log prior weight of each rotation (normalised).
      tables: the grid's lookup tables.
      masked_shells: (n_frames_padded, n_masked) int32 shells excluded per frame; n_shells marks padding.
      frame_valid: (n_frames_padded,) bool, False for frames added to fill the last block.
    """

    entries: model_lib.Entries
    polarization: jax.Array
    shell: jax.Array
    log_prior: jax.Array
    tables: model_lib.GridTables
    masked_shells: jax.Array
    frame_valid: jax.Array


class BlockArrays(NamedTuple):
    """The frames of one block on one device.

    Attributes:
      frame_start: () int32 global index of the device's first frame.
      candidates: (n_local, n_slots) int32 rotation of each candidate slot.
      candidate_mask: (n_local, n_slots) bool real slots.
      join: the block's join on this device (cells local: ``local_frame * n_slots + slot``).
    """

    frame_start: jax.Array
    candidates: jax.Array
    candidate_mask: jax.Array
    join: JoinArrays


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


def block_log_likelihood(tables: RotationTables, phi: jax.Array, shared: Shared, local: BlockArrays) -> jax.Array:
    """Log-posterior (unnormalised) of every (frame, candidate slot) of one device's block.

    Args:
      tables: rotation tables of the current model.
      phi: (n_frames_padded,) float32 scales of all frames.
      shared: replicated arrays.
      local: this device's frames.

    Returns:
      (n_local, n_slots) float32 L_dr in nats (up to the frame constant), -inf on padding slots.
    """
    n_local, n_slots = local.candidates.shape
    join = local.join
    phi_local = jax.lax.dynamic_slice(phi, (local.frame_start,), (n_local,))
    bragg = phi_local[join.cell // n_slots] * tables.tomogram[join.entry]
    terms = join.count * jnp.log1p(bragg / join.background) + join.dead * join.polarization * bragg
    photon = jax.ops.segment_sum(terms, join.cell, num_segments=n_local * n_slots, indices_are_sorted=True)
    masked = jax.lax.dynamic_slice_in_dim(shared.masked_shells, local.frame_start, n_local, axis=0)
    signal = frame_signal(tables, local.candidates, masked[:, None, :])
    logl = photon.reshape(n_local, n_slots) - phi_local[:, None] * signal + shared.log_prior[local.candidates]
    return jnp.where(local.candidate_mask, logl, -jnp.inf)


@functools.partial(jax.jit, static_argnames="n_shells")
def log_likelihood(intensity: jax.Array, phi: jax.Array, shared: Shared, local: BlockArrays, n_shells: int) -> jax.Array:
    """:func:`block_log_likelihood` of the model ``intensity`` (convenience for one device's block)."""
    return block_log_likelihood(rotation_tables(intensity, shared, n_shells), phi, shared, local)


class Responsibilities(NamedTuple):
    """Pruned posterior over rotations, padded (n_frames, k).

    Attributes:
      slot: (n_frames, k) int32 candidate slot, most likely first.
      prob: (n_frames, k) float32 renormalised probability (0 where pruned).
      log_evidence: (n_frames,) float32 log sum_r exp(L_dr) before pruning (nats, up to the frame constant).
      max_prob: (n_frames,) float32 probability of the most likely rotation before pruning.
    """

    slot: jax.Array
    prob: jax.Array
    log_evidence: jax.Array
    max_prob: jax.Array


@functools.partial(jax.jit, static_argnames=("k", "prune_mass", "prune_min"))
def responsibilities(logl: jax.Array, k: int, prune_mass: float, prune_min: float) -> Responsibilities:
    """Softmax over candidates, then the reference's pruning (METHOD.md §6.5) capped at the top ``k``.

    Keeps the most likely rotations until their cumulative probability reaches ``prune_mass``, drops those
    below ``prune_min`` (the most likely one is always kept), renormalises. Frames without candidates get
    no rotation (probabilities 0, log evidence -inf).
    """
    k = min(k, logl.shape[1])
    top, slot = jax.lax.top_k(logl, k)
    log_evidence = jax.nn.logsumexp(logl, axis=1)
    finite = jnp.isfinite(log_evidence)
    p = jnp.where(finite[:, None], jnp.exp(top - jnp.where(finite, log_evidence, 0.0)[:, None]), 0.0)
    before = jnp.cumsum(p, axis=1) - p
    keep = (before < prune_mass) & (p >= prune_min)
    keep = keep.at[:, 0].set(finite)
    p = jnp.where(keep, p, 0.0)
    p = p / jnp.maximum(p.sum(axis=1, keepdims=True), _EPS)
    # max over the row, not top[:, 0]: slicing top_k's output makes XLA:CPU fall back to a full sort (30x slower)
    max_prob = jnp.where(finite, jnp.exp(jnp.max(logl, axis=1) - jnp.where(finite, log_evidence, 0.0)), 0.0)
    return Responsibilities(slot=slot.astype(jnp.int32), prob=p, log_evidence=log_evidence, max_prob=max_prob)
