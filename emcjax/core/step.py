"""One EMC iteration as a pure function: ``update(state, batch) -> (state, diagnostics)``.

The shape of optax's ``init``/``update`` pairs and jax-md's functions that return functions:
:func:`make_update` takes the static description of a problem (:class:`StepSpec`) and returns the update of
one iteration, written for the frames of one device with every sum over frames ending in a collective over
``spec.axis`` (emcjax.emc lifts it over the mesh with ``jax.shard_map``; ``axis=None`` runs on one device):

    E-step (all blocks) -> kept pairs on the device -> intensity M-step
    [-> E-step -> phi M-step -> mean-1 normalisation]          (``update_phi``)
    [-> per-frame background scale of the likelihood]          (``refine_background``)
    [-> per-shell background correction]                       (``refine_background_shells``)

``batch`` is a :class:`Batch`: the replicated rotation set and the frames' blocks stacked on a leading
block axis. The state (:class:`emcjax.core.arrays.EMCState`) carries the model, phi, the likelihood (its
parameters are leaves) and the traced hyperparameters, so that the whole step can be jitted, vmapped over
seeds or hyperparameters and differentiated.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax.core import background as background_lib
from emcjax.core import background_shells as shells_lib
from emcjax.core import mstep
from emcjax.core.arrays import BlockArrays, EMCState, Hyper, Kept, Shared
from emcjax.core.estep import block_log_likelihood, responsibilities, rotation_tables
from emcjax.core.gradient import gradient_update
from emcjax.core.kept import flatten_blocks, kept_pairs

PIXEL_CHUNK = 8192  # valid pixels per chunk of the zero-count frame constant of non-linear likelihoods


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the compiled step depends on (static; hashable).

    Attributes:
      n_frames: frames of the data set; n_padded: frames including the padding of the last block.
      n_shells: radial shells of the background.
      max_kept: top-k cap of the responsibilities per frame.
      intensity_update: "reference", "mlem" (closed-form Poisson) or "gradient" (any likelihood).
      inner_iterations: MLEM sub-iterations.
      update_phi: run the second E-step and the phi update.
      kept_budget: kept join pairs per device and block (None: every join pair).
      gradient_steps, gradient_learning_rate: the optax M-step (log-space Adam steps and step size).
      max_entries: most in-peak entries of one rotation (exact zero terms of the gradient M-step).
      refine_background: update the likelihood's per-frame background scale (``scale``) after the other
        M-steps (emcjax.core.background).
      refine_background_shells: correct the data set's background by the state's per-shell factors
        (``background_shell``) and update them last (emcjax.core.background_shells).
      axis: mesh axis name of the frames (None: one device).
    """

    n_frames: int
    n_padded: int
    n_shells: int
    max_kept: int = 32
    intensity_update: str = "reference"
    inner_iterations: int = 1
    update_phi: bool = True
    kept_budget: int | None = None
    gradient_steps: int = 20
    gradient_learning_rate: float = 0.05
    max_entries: int = 1
    refine_background: bool = False
    refine_background_shells: bool = False
    axis: str | None = None


class Batch(NamedTuple):
    """Everything the step reads: ``shared`` (replicated) and ``blocks`` (BlockArrays, each field with a
    leading block axis; on a mesh a device axis before it)."""

    shared: Shared
    blocks: BlockArrays


class FrameStats(NamedTuple):
    """Per-frame results of an E-step, (n_padded,) in global frame order.

    Attributes:
      log_likelihood: weight_d x log p(K_d) (nats, with the frame constant; 0 for weight-0 frames).
      max_prob: probability of the most likely rotation.
      best_rotation: int32 most likely rotation (index in the rotation set).
      n_kept: int32 rotations kept.
    """

    log_likelihood: jax.Array
    max_prob: jax.Array
    best_rotation: jax.Array
    n_kept: jax.Array


class Diagnostics(NamedTuple):
    """What an iteration reports.

    Attributes:
      first: per-frame results of the first E-step (the log-likelihood of the state before the update).
      last: per-frame results of the last E-step.
      n_live: () int32 most kept join pairs of one device's block (> spec.kept_budget: pairs were dropped).
      kept: the last E-step's kept (frame, rotation) pairs (local to the device).
    """

    first: FrameStats
    last: FrameStats
    n_live: jax.Array
    kept: "KeptRotations"


class KeptRotations(NamedTuple):
    """Kept (frame, rotation) pairs: (m,) int32 global frame, int32 rotation (in the rotation set), float32
    weight x probability (0 on padding)."""

    frame: jax.Array
    rotation: jax.Array
    prob: jax.Array


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def frame_constants(likelihood, shared: Shared, local: BlockArrays) -> jax.Array:
    """(n_local,) sum over the frame's valid pixels of log p(K_t | background) (nats)."""
    n_local, n_shells = local.background.shape
    frame = local.frame_start + jnp.arange(n_local)
    ph = local.photons
    ph_frame = local.frame_start + ph.frame
    mu0 = likelihood.background_mean(ph.background, ph_frame)
    zero = likelihood.log_prob(jnp.zeros_like(ph.count), mu0, ph_frame)
    per_record = jnp.where(ph.count > 0, likelihood.log_prob(ph.count, mu0, ph_frame) - zero, 0.0) - ph.dead * zero
    records = jax.ops.segment_sum(per_record, ph.frame, num_segments=n_local)
    if likelihood.linear_zero_term:  # log p(0 | mu) = -mu
        pol_per_shell = jax.ops.segment_sum(shared.polarization, shared.shell, num_segments=n_shells)
        return records - likelihood.background_mean(local.background @ pol_per_shell, frame)
    n_pix = shared.polarization.shape[0]
    n_chunks = -(-n_pix // PIXEL_CHUNK)
    pad = n_chunks * PIXEL_CHUNK - n_pix
    pol = jnp.pad(shared.polarization, (0, pad)).reshape(n_chunks, -1)
    shell = jnp.pad(shared.shell, (0, pad)).reshape(n_chunks, -1)

    def chunk(total, xs):
        p, s = xs
        bg = local.background[:, s]
        valid = (bg > 0) & (p > 0)[None, :]
        mu = likelihood.background_mean(jnp.where(valid, p * bg, 1.0), frame[:, None])
        z = likelihood.log_prob(jnp.zeros_like(mu), mu, frame[:, None])
        return total + jnp.sum(jnp.where(valid, z, 0.0), axis=1), None

    zero_total, _ = jax.lax.scan(chunk, jnp.zeros(n_local, records.dtype), (pol, shell))
    return records + zero_total


def estep_block(tables, phi, state: EMCState, shared: Shared, local: BlockArrays, spec: StepSpec):
    """E-step of one device's block: ``(kept, n_live, (log_likelihood, max_prob, best_rotation, n_kept))``
    with per-frame arrays (n_local,)."""
    logl = block_log_likelihood(tables, phi, state.likelihood, shared, local)
    resp = responsibilities(logl, shared, local, state.hyper, spec.max_kept)
    kept, n_live = kept_pairs(resp, local, spec.kept_budget, not state.likelihood.linear_zero_term)
    constant = frame_constants(state.likelihood, shared, local)
    weight = local.weight
    used = (weight > 0) & jnp.isfinite(resp.log_evidence)
    log_likelihood = jnp.where(used, weight * (jnp.where(used, resp.log_evidence, 0.0) + constant), 0.0)
    best = local.candidates[jnp.arange(resp.slot.shape[0]), resp.best_slot]
    stats = (log_likelihood, resp.max_prob, best, jnp.sum(resp.prob > 0, axis=1, dtype=jnp.int32))
    return kept, n_live, stats


def map_blocks(fn, blocks: BlockArrays):
    """``fn`` over the leading block axis (``lax.map``); one block is passed whole (no per-block slice
    copies of the join)."""
    if blocks.frame_start.shape[0] == 1:
        return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], blocks)))
    return jax.lax.map(fn, blocks)


def _global_frames(values: jax.Array, blocks: BlockArrays, n_padded: int, axis) -> jax.Array:
    """(n_blocks, n_local) per-frame values of this device -> (n_padded,) in global order, on every device."""
    index = blocks.frame_start[:, None] + jnp.arange(values.shape[1])[None, :]
    return _psum(jnp.zeros(n_padded, values.dtype).at[index.ravel()].set(values.ravel()), axis)


def estep_all(intensity, phi, state: EMCState, batch: Batch, spec: StepSpec):
    """E-step over every block of the device: ``(kept, FrameStats, n_live, tables)``; kept flattened over
    blocks, ``tables`` the rotation tables of ``intensity``."""
    shared = batch.shared
    tables = rotation_tables(intensity, shared, spec.n_shells)
    kept, n_live, stats = map_blocks(lambda b: estep_block(tables, phi, state, shared, b, spec), batch.blocks)
    stats = FrameStats(*(_global_frames(v, batch.blocks, spec.n_padded, spec.axis) for v in stats))
    n_live = jnp.max(n_live) if spec.axis is None else jax.lax.pmax(jnp.max(n_live), spec.axis)
    return flatten_blocks(kept), stats, n_live, tables


def intensity_mstep(intensity, phi, likelihood, kept: Kept, shared: Shared, spec: StepSpec):
    """The configured intensity update on the kept pairs."""
    args = (intensity, phi, likelihood, kept, shared, spec.n_shells)
    if spec.intensity_update == "reference":
        mstep.require_poisson(likelihood, "reference")
        return mstep.reference_update(*args, axis=spec.axis)
    if spec.intensity_update == "mlem":
        mstep.require_poisson(likelihood, "mlem")
        return mstep.mlem_update(*args, spec.inner_iterations, axis=spec.axis)
    return gradient_update(*args, steps=spec.gradient_steps, learning_rate=spec.gradient_learning_rate,
                           max_entries=spec.max_entries, axis=spec.axis)


def phi_mstep(intensity, phi, likelihood, kept: Kept, shared: Shared, spec: StepSpec, tables=None):
    """phi update (closed form for Poisson, gradient otherwise), then the mean-1 normalisation."""
    if getattr(likelihood, "poisson_counts", False) and spec.intensity_update != "gradient":
        phi, used = mstep.phi_update(intensity, phi, likelihood, kept, shared, spec.n_shells, axis=spec.axis,
                                     tables=tables)
    else:
        mass = _psum(jax.ops.segment_sum(kept.pair_prob, kept.pair_frame, num_segments=phi.shape[0]), spec.axis)
        used = mass > 0
        new = gradient_update(intensity, phi, likelihood, kept, shared, spec.n_shells, steps=spec.gradient_steps,
                              learning_rate=spec.gradient_learning_rate, max_entries=spec.max_entries, wrt="phi",
                              axis=spec.axis)
        phi = jnp.where(used, new, phi)
    return mstep.normalise_phi(intensity, phi, used)


def background_mstep(intensity, phi, likelihood, kept: Kept, shared: Shared, totals, spec: StepSpec):
    """The likelihood with its per-frame background scale refined on the kept pairs; ``totals``: (photons,
    background) per frame, (n_padded,) each (:func:`frame_totals`)."""
    scale = jnp.broadcast_to(jnp.asarray(likelihood.scale, phi.dtype), (spec.n_frames,))
    scale = background_lib.scale_update(intensity, phi, scale, kept, shared, *totals, axis=spec.axis)
    return dataclasses.replace(likelihood, scale=scale)


def frame_totals(batch: Batch, spec: StepSpec):
    """(photons, background at scale 1) of every frame, (n_padded,) each, on every device."""
    totals = map_blocks(lambda b: background_lib.frame_totals(batch.shared, b), batch.blocks)
    return tuple(_global_frames(v, batch.blocks, spec.n_padded, spec.axis) for v in totals)


def make_update(spec: StepSpec):
    """The update of one iteration for problems described by ``spec``: ``update(state, batch)``."""

    def update(state: EMCState, batch: Batch) -> tuple[EMCState, Diagnostics]:
        shells = state.background_shell
        if spec.refine_background_shells:
            batch = batch._replace(blocks=shells_lib.corrected_blocks(batch.blocks, batch.shared, shells))
        phi = jnp.pad(state.phi, (0, spec.n_padded - spec.n_frames))
        kept, first, n_live, _ = estep_all(state.intensity, phi, state, batch, spec)
        intensity = intensity_mstep(state.intensity, phi, state.likelihood, kept, batch.shared, spec)
        last = first
        if spec.update_phi:
            kept, last, n_live_2, tables = estep_all(intensity, phi, state, batch, spec)
            n_live = jnp.maximum(n_live, n_live_2)
            intensity, phi = phi_mstep(intensity, phi, state.likelihood, kept, batch.shared, spec, tables)
        likelihood = state.likelihood
        if spec.refine_background:
            likelihood = background_mstep(intensity, phi, likelihood, kept, batch.shared, frame_totals(batch, spec),
                                          spec)
        if spec.refine_background_shells:
            likelihood, shells = shells_lib.shell_mstep(intensity, phi, likelihood, shells, kept, batch, spec)
        new = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi[: spec.n_frames],
                             likelihood=likelihood, background_shell=shells)
        pairs = KeptRotations(kept.pair_frame, kept.pair_rotation, kept.pair_prob)
        return new, Diagnostics(first=first, last=last, n_live=n_live, kept=pairs)

    return update


def marginal_log_likelihood(intensity, phi, likelihood, batch: Batch, spec: StepSpec) -> jax.Array:
    """sum_d weight_d log sum_r w_r p(K_d | r) over the device's frames (nats; psum over ``spec.axis``).

    Differentiable in the model, phi and the likelihood's parameters (``jax.grad`` through the public API).
    """
    phi = jnp.pad(phi, (0, spec.n_padded - spec.n_frames))
    tables = rotation_tables(intensity, batch.shared, spec.n_shells)
    hyper = Hyper.of()

    def one(local):
        logl = block_log_likelihood(tables, phi, likelihood, batch.shared, local)
        resp = responsibilities(logl, batch.shared, local, hyper, 1)
        constant = frame_constants(likelihood, batch.shared, local)
        used = (local.weight > 0) & jnp.isfinite(resp.log_evidence)
        return jnp.sum(jnp.where(used, local.weight * (jnp.where(used, resp.log_evidence, 0.0) + constant), 0.0))

    return _psum(jnp.sum(map_blocks(one, batch.blocks)), spec.axis)

