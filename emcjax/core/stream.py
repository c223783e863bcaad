"""Streaming at O(block): a block's cached join on the device, and the M-steps' per-block statistics.

A streamed run (``EMCConfig.stream``) re-reads its frames at every E-step. Instead of rebuilding each block's
join on the host at every E-step (emcjax.join: numpy sorts), the join is built once at set-up and cached on
disk as three integer columns per pair (cell, entry, record: the pair's position in the block's pixel
records, emcjax.join.pixel_records); at every E-step the host sends the cached columns and the block's pixel
records, and :func:`cached_join` fills in the pairs' counts, dead flags, backgrounds and polarizations on the
device (gathers by record). The result is emcjax.join's join, bit for bit, so the E-step and the kept pairs
are those of the in-memory run.

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


class CachedJoin(NamedTuple):
    """The cached columns of one device's join (sorted by cell), padded to a static length.

    Attributes:
      cell: (n,) int32 cell of the pair (``local_frame * n_slots + slot``; the last cell on padding).
      entry: (n,) int32 in-peak entry.
      record: (n,) int32 the pair's pixel record (0 on padding).
      n_pairs: () int32 real pairs (the first ones).
    """

    cell: jax.Array
    entry: jax.Array
    record: jax.Array
    n_pairs: jax.Array


class Records(NamedTuple):
    """A device's pixel records of one block, beside its :class:`PhotonArrays` (same order and length).

    Attributes:
      pixel: (n,) int32 valid pixel of the record (0 on padding).
      background: (n,) float32 B_d(s_t) floored (photons per pixel per unit pol), the join's background.
      dead: (2,) int32 the dead-pixel records' range [first, stop) (emcjax.join.pixel_records lists the
        photons, then the dead pixels): a pair's dead flag without a gather.
    """

    pixel: jax.Array
    background: jax.Array
    dead: jax.Array


def cached_join(cached: CachedJoin, records: Records, photons: PhotonArrays, polarization: jax.Array) -> JoinArrays:
    """The join of one device's block from its cached columns and pixel records (emcjax.join.build_join's
    values; padding as emcjax.join.pad_join: count 0, not dead, B = 1, pol = 1)."""
    real = jnp.arange(cached.cell.shape[0]) < cached.n_pairs
    record = jnp.where(real, cached.record, 0)
    return JoinArrays(
        cell=cached.cell,
        entry=cached.entry,
        count=jnp.where(real, photons.count[record], 0.0),
        dead=(real & (record >= records.dead[0]) & (record < records.dead[1])).astype(photons.dead.dtype),
        background=jnp.where(real, records.background[record], 1.0),
        polarization=jnp.where(real, polarization[records.pixel][record], 1.0),  # per record first: one gather per pair
    )


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
