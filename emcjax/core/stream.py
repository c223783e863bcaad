"""Streaming at O(block): the join of a block built on the device, and the M-steps' per-block statistics.

A streamed run (``EMCConfig.stream``) re-reads its frames at every E-step. Instead of rebuilding each block's
join on the host (emcjax.join, numpy sorts), the host sends the block's pixel records only (photons and dead
pixels, padded to a static length) and :func:`expand_join` lists every (record, in-peak entry at its pixel)
pair on the device with a cumulative sum (record-major order, not sorted by cell: the E-step's segment sums
and :func:`emcjax.core.kept.kept_pairs_by_mask` do not need it). This holds when every frame has every
rotation of one rotation set as candidates (a full search), so that every entry at a record's pixel belongs
to one of the frame's cells (``cell = frame * n_slots + rotation``).

The M-steps then need of a block's kept pairs only (:func:`intensity_statistics`): sums per rotation, per
(rotation, masked shell) and per entry (the exposure of each in-peak entry, reducible over blocks), and the
kept photon terms (entry, P K, B / phi) that the intensity update's per-entry Newton solve needs whole
(emcjax.streaming keeps those on disk, grouped by entry). The phi update and the background scale are
per-frame, so they run on the block's kept pairs as soon as its E-step is done. Everything here is pure JAX,
written for one device (emcjax.streaming lifts it over the mesh).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax.core.arrays import Kept, PhotonArrays
from emcjax.core.mstep import kept_background
from emcjax.join import JoinArrays


class EntryIndex(NamedTuple):
    """The in-peak entries of a rotation set indexed by pixel, on the device (replicated).

    Attributes:
      pixel_start: (n_pix + 2,) int32 CSR offsets of ``by_pixel``; pixel ``n_pix`` (padding records) has none.
      by_pixel: (n_entries,) int32 entry ids sorted by pixel.
      rotation: (n_entries,) int32 rotation of each entry (its candidate slot in a full search).
    """

    pixel_start: jax.Array
    by_pixel: jax.Array
    rotation: jax.Array


class Records(NamedTuple):
    """A device's pixel records of one block, beside its :class:`PhotonArrays` (same order and length).

    Attributes:
      pixel: (n,) int32 valid pixel of the record (n_pix on padding).
      background: (n,) float32 B_d(s_t) floored (photons per pixel per unit pol), the join's background.
    """

    pixel: jax.Array
    background: jax.Array


def expand_join(index: EntryIndex, records: Records, photons: PhotonArrays, polarization: jax.Array, n_local: int,
                n_slots: int, length: int) -> tuple[JoinArrays, jax.Array]:
    """The join of one device's block: every record x every in-peak entry at its pixel, ``length`` pairs.

    The real pairs come first (record-major); the rest is padding like emcjax.join.pad_join (count 0, not
    dead, B = 1, pol = 1, last cell). Returns ``(join, n_pairs)``, n_pairs the real pairs (> length: pairs
    were dropped; the caller sizes ``length`` from the data at set-up).
    """
    first = index.pixel_start[records.pixel]
    count = index.pixel_start[records.pixel + 1] - first
    ends = jnp.cumsum(count)
    n_pairs = ends[-1]
    position = jnp.arange(length, dtype=jnp.int32)
    # owner of pair j = number of records whose range ends at or before j (a scatter of ones and a cumsum)
    owner = jnp.cumsum(jnp.zeros(length + 1, jnp.int32).at[jnp.minimum(ends, length)].add(1))[:length]
    owner = jnp.minimum(owner, records.pixel.shape[0] - 1)
    real = position < n_pairs
    entry = index.by_pixel[jnp.where(real, first[owner] + position - (ends[owner] - count[owner]), 0)]
    join = JoinArrays(
        cell=jnp.where(real, photons.frame[owner] * n_slots + index.rotation[entry], n_local * n_slots - 1),
        entry=jnp.where(real, entry, 0),
        count=jnp.where(real, photons.count[owner], 0.0),
        dead=jnp.where(real, photons.dead[owner], 0.0),
        background=jnp.where(real, records.background[owner], 1.0),
        polarization=jnp.where(real, polarization[records.pixel[owner]], 1.0),
    )
    return join, n_pairs


class IntensitySums(NamedTuple):
    """Per-device sums over the kept pairs of the blocks seen so far (reducible: added block by block).

    Attributes:
      per_rotation: (n_rot,) sum of P_dr phi_d over kept (frame, rotation) pairs.
      per_rotation_shell: (n_rot, n_shells + 1) the same per masked shell of the frame (last: padding).
      dead: (n_entries,) sum of P phi over kept dead pixels of each entry.
    """

    per_rotation: jax.Array
    per_rotation_shell: jax.Array
    dead: jax.Array

    @staticmethod
    def zeros(n_rot: int, n_shells: int, n_entries: int, dtype=jnp.float32) -> "IntensitySums":
        return IntensitySums(jnp.zeros(n_rot, dtype), jnp.zeros((n_rot, n_shells + 1), dtype),
                             jnp.zeros(n_entries, dtype))


class PhotonTerms(NamedTuple):
    """The kept photon terms of one block (static length; pk = 0 marks an empty slot).

    Attributes:
      entry: (n,) int32 in-peak entry.
      pk: (n,) float32 weight x P_dr x K_dt.
      b: (n,) float32 the likelihood's background over phi_d, per unit pol (photons).
    """

    entry: jax.Array
    pk: jax.Array
    b: jax.Array


def intensity_statistics(sums: IntensitySums, phi, likelihood, kept: Kept) -> tuple[IntensitySums, PhotonTerms]:
    """Adds one block's kept pairs to ``sums`` and returns its photon terms (the terms of
    emcjax.core.mstep.reference_update: photons of frames with phi > 0).

    The sums are scatter-adds into the running totals, so one device's totals are the same float sums, in
    the same order, as one segment sum over the kept pairs of all its blocks.
    """
    n_rot, width = sums.per_rotation_shell.shape
    pw = kept.pair_prob * phi[kept.pair_frame]
    seg = kept.pair_rotation[:, None] * width + kept.pair_masked
    per_rotation_shell = sums.per_rotation_shell.reshape(-1).at[seg.ravel()].add(
        jnp.broadcast_to(pw[:, None], seg.shape).ravel())
    phi_k = phi[kept.frame]
    dead = sums.dead.at[kept.entry].add(kept.prob * phi_k * kept.dead)
    new = IntensitySums(sums.per_rotation.at[kept.pair_rotation].add(pw), per_rotation_shell.reshape(n_rot, width),
                        dead)
    pk = kept.prob * kept.count
    photon = (pk > 0) & (phi_k > 0)
    b = jnp.where(photon, kept_background(likelihood, kept) / jnp.where(photon, phi_k, 1.0), 1.0)
    return new, PhotonTerms(kept.entry, jnp.where(photon, pk, 0.0), b)
