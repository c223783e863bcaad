"""The pytrees of the EMC core.

Shapes use ``n_local`` for the frames of one device in one block, ``n_slots`` for candidate slots per frame,
``n_rot`` / ``n_entries`` for the rotations of a rotation set and their in-peak entries (emcjax.model).
Photon counts are photons; backgrounds B are photons per pixel per unit polarization x solid angle (pol);
the model W is photons per unit pol per unit phi.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.join import JoinArrays


class Shared(NamedTuple):
    """Arrays every device holds whole (replicated): the geometry and one rotation set.

    Attributes:
      entries: in-peak entries of the rotations.
      polarization: (n_pix,) float32 pol x solid angle of the valid pixels.
      shell: (n_pix,) int32 radial shell of the valid pixels.
      log_prior: (n_rot,) float32 log prior weight of each rotation (normalised; -inf on padding).
      tables: the grid's lookup tables.
    """

    entries: model_lib.Entries
    polarization: jax.Array
    shell: jax.Array
    log_prior: jax.Array
    tables: model_lib.GridTables


class PhotonArrays(NamedTuple):
    """Every photon and dead pixel of a device's frames (in and out of peaks), padded with zero counts.

    Attributes:
      frame: (n,) int32 local frame of the record.
      count: (n,) float32 photons (0 for a dead pixel and padding).
      dead: (n,) float32 1 for a dead pixel.
      background: (n,) float32 pol_t x B_d(s_t), expected background photons at the pixel (> 0).
      shell: (n,) int32 radial shell s_t of the pixel (0 on padding).
    """

    frame: jax.Array
    count: jax.Array
    dead: jax.Array
    background: jax.Array
    shell: jax.Array


class BlockArrays(NamedTuple):
    """The frames of one block on one device. Per-frame arrays live here, sharded with their frames.

    Attributes:
      frame_start: () int32 global index of the device's first frame.
      candidates: (n_local, n_slots) int32 rotation (in the rotation set) of each candidate slot.
      candidate_mask: (n_local, n_slots) bool real slots.
      join: the block's join on this device (cells local: ``local_frame * n_slots + slot``).
      cell_offsets: (n_local * n_slots + 1,) int32 CSR offsets of the join by cell.
      masked_shells: (n_local, n_masked) int32 shells excluded per frame; n_shells marks padding.
      background: (n_local, n_shells) float32 B_d(s) (0 in masked shells), photons per pixel per unit pol.
      weight: (n_local,) float32 frame weight (1 = used, 0 = rejected, another half set, or padding).
      photons: all photons and dead pixels of the frames (frame constants of the log-likelihood).
    """

    frame_start: jax.Array
    candidates: jax.Array
    candidate_mask: jax.Array
    join: JoinArrays
    cell_offsets: jax.Array
    masked_shells: jax.Array
    background: jax.Array
    weight: jax.Array
    photons: PhotonArrays


class Hyper(NamedTuple):
    """Traced hyperparameters of the E-step (in the state, like optax.inject_hyperparams: vmappable,
    schedulable).

    Attributes:
      prune_mass: () float32, keep the most likely rotations of a frame until this mass is covered.
      prune_min: () float32, drop rotations below this probability.
      inverse_temperature: () float32 beta, the E-step uses beta x log-likelihood (1: plain EM;
        < 1: deterministic annealing).
    """

    prune_mass: jax.Array
    prune_min: jax.Array
    inverse_temperature: jax.Array

    @staticmethod
    def of(prune_mass: float = 0.999, prune_min: float = 1e-4, inverse_temperature: float = 1.0) -> "Hyper":
        return Hyper(*(jnp.asarray(x, jnp.float32) for x in (prune_mass, prune_min, inverse_temperature)))


class EMCState(NamedTuple):
    """What an iteration changes (a pytree; what a checkpoint holds).

    Attributes:
      iteration: () int32, iterations done.
      intensity: (n_asu, n_voxels) float32 model (photons per unit pol per unit phi).
      phi: (n_frames,) float32 per-frame scale, mean 1 over used frames, 0 marks a blank frame.
      likelihood: the likelihood model (a pytree; its parameters are leaves).
      hyper: traced E-step hyperparameters.
      background_shell: (n_shells,) float32 per-shell factor g_s > 0 on the data set's background (unit-less;
        emcjax.core.background_shells), or None (no correction: no leaves, checkpoints unchanged).
    """

    iteration: jax.Array
    intensity: jax.Array
    phi: jax.Array
    likelihood: Any
    hyper: Hyper
    background_shell: Any = None


class Kept(NamedTuple):
    """Join pairs and (frame, rotation) pairs that survived pruning, on one device, zero-padded.

    Attributes:
      entry: (n,) int32 in-peak entry of each join pair.
      prob: (n,) float32 weight x P_dr of the pair's (frame, rotation) (0 on padding).
      count: (n,) float32 photons K at the pixel.
      dead: (n,) float32 1 for a dead pixel.
      background: (n,) float32 B_d(s_t) (photons per pixel per unit pol).
      polarization: (n,) float32 pol_t.
      frame: (n,) int32 global frame index.
      pair_frame: (m,) int32 global frame of each kept (frame, rotation) pair.
      pair_rotation: (m,) int32 rotation of the pair.
      pair_prob: (m,) float32 weight x P_dr (0 on padding).
      pair_masked: (m, n_masked) int32 masked shells of the pair's frame (n_shells = padding).
      pair_background: (m, n_shells) float32 B of the pair's frame per shell.
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
    pair_masked: jax.Array
    pair_background: jax.Array

