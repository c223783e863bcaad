"""Photon terms of candidate mode over packed record rows, in two passes (the fast form of
emcjax.core.direct.photon_terms).

The direct E-step tests every (photon record, candidate) pair of a frame. Padding every frame to the longest
frame's records (512 for ~210 at the paper's geometry) and computing model.locate's stencil (eight table reads)
for every pair costs ~160 ns per pair on a CPU. Here

* the records are packed in rows of a few dozen (emcjax.core.full_search.record_rows: each frame in its own
  rows, ~1.2x the used records), every row tested against its frame's candidates;
* pass 1 is the arithmetic in-peak test alone (full_search.peak_test: no table read), elementwise over
  (row, candidate, record), ~3 ns per pair; the pairs that pass (~14 % in candidate mode, where every candidate
  is near the truth) are compacted per chunk of rows (a cumulative sum and a scatter);
* pass 2 computes the table reads, model value and photon term of those pairs only, summed per (row,
  candidate), then per (frame, candidate).

Which pairs pass depends only on the records and the candidates, not on the model: :func:`hit_counts` sizes the
compacted arrays once per block (``max_hits``), and every E-step reports whether they sufficed. The float32
operations are model.locate's in another association order (full_search's): a record within an ulp of a peak
boundary may fall on the other side, so the terms equal photon_terms' to float32 tolerance (tested).

Shapes: ``n_local`` frames, ``n_slots`` candidate slots, ``n_rows`` record rows of ``row_length`` records.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.direct import Geometry, Records
from emcjax.core.full_search import compact_positions, record_photon_terms, peak_reflection, peak_test, peak_value
from emcjax.rotations import crystal_from_lab

ROW_LENGTH = 64  # records per row (full_search.record_rows)
ROW_CHUNK = 16  # rows per step of the loop (memory: chunk x n_slots x ROW_LENGTH x ~30 B in pass 1)


def _points(m, q):
    """Crystal-frame q, three (..., n_slots, row_length) arrays, of lab points ``q`` (..., row_length, 3) under
    crystal_from_lab ``m`` (..., n_slots, 3, 3), elementwise (no matrix products)."""
    return tuple(m[..., i, 0, None] * q[..., None, :, 0] + m[..., i, 1, None] * q[..., None, :, 1]
                 + m[..., i, 2, None] * q[..., None, :, 2] for i in range(3))


def _chunks(rows: Records, row_frame, chunk: int):
    """(pixel, count, dead, background, row_frame) split into chunks of ``chunk`` rows (padding rows are unused:
    zero counts and no dead pixel)."""
    pad = -rows.pixel.shape[0] % chunk
    xs = (*rows, row_frame)
    fills = (0, 0, 0, 1, 0)
    xs = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=f) for x, f in zip(xs, fills)]
    return [x.reshape(-1, chunk, *x.shape[1:]) for x in xs]


def _near(geometry: Geometry, rot_all, candidates, pixel, count, dead, rf):
    """Pass 1 of one chunk: (points, near (chunk, n_slots, row_length) bool) for used records."""
    m = rot_all[candidates[rf]]  # (chunk, n_slots, 3, 3)
    q = geometry.q_lab[pixel]  # (chunk, row_length, 3)
    used = (count > 0) | (dead > 0)
    return peak_test(_points(m, q), geometry.tables)[2] & used[:, None, :]


@functools.partial(jax.jit, static_argnames=("chunk",))
def hit_counts(geometry: Geometry, quaternions, candidates, rows: Records, row_frame, chunk: int = ROW_CHUNK):
    """(n_chunks,) int32 (row, candidate, record) triples of each chunk of rows that pass the arithmetic in-peak
    test: the ``max_hits`` of :func:`photon_terms` is their maximum. Model-independent."""
    rot_all = crystal_from_lab(quaternions)
    pixel, count, dead, _, rf = _chunks(rows, row_frame, chunk)
    one = lambda xs: _near(geometry, rot_all, candidates, *xs).sum(dtype=jnp.int32)
    return jax.lax.map(one, (pixel, count, dead, rf))


@functools.partial(jax.jit, static_argnames=("max_hits", "chunk"))
def photon_terms(intensity, phi_local, likelihood, geometry: Geometry, quaternions, candidates, frame_start,
                 rows: Records, row_frame, max_hits: int, chunk: int = ROW_CHUNK):
    """(n_local, n_slots) sum over each frame's records inside a peak of each candidate of the photon term
    (``photon_excess`` for photons, ``-zero_term`` for dead pixels), nats, and the most hits of one chunk ()
    (complete where <= ``max_hits``).

    Args:
      phi_local: (n_local,) float32; quaternions: (n_rot, 4) the block's rotations, ``candidates`` (n_local,
        n_slots) index them; frame_start: () int32 global index of the block's first frame.
      rows, row_frame: the records packed in rows (full_search.record_rows) and each row's local frame.
    """
    rot_all = crystal_from_lab(quaternions)
    flat = model_lib.pad_model(intensity)
    n_slots = candidates.shape[1]
    xs = _chunks(rows, row_frame, chunk)
    row_length = rows.pixel.shape[1]

    def one(c):
        pixel, count, dead, background, rf = c
        near = _near(geometry, rot_all, candidates, pixel, count, dead, rf)
        hit, hits = compact_positions(near.ravel(), max_hits)
        row, rest = jnp.divmod(hit, n_slots * row_length)
        slot, record = jnp.divmod(rest, row_length)
        frame = rf[row]
        m = rot_all[candidates[frame, slot]]  # (max_hits, 3, 3)
        px = pixel[row, record]
        q = geometry.q_lab[px]
        q_crystal = tuple(m[:, i, 0] * q[:, 0] + m[:, i, 1] * q[:, 1] + m[:, i, 2] * q[:, 2] for i in range(3))
        inside, value = peak_value(q_crystal, geometry.tables, flat)
        inside = inside & (jnp.arange(max_hits) < hits)
        terms = record_photon_terms(likelihood, inside, value, geometry.polarization[px], phi_local[frame],
                              background[row, record], count[row, record], dead[row, record], frame_start + frame)
        out = jax.ops.segment_sum(terms, row * n_slots + slot, num_segments=chunk * n_slots, indices_are_sorted=True)
        return out.reshape(chunk, n_slots), hits

    per_row, hits = jax.lax.map(one, xs)
    per_row = per_row.reshape(-1, n_slots)[: rows.pixel.shape[0]]
    photon = jax.ops.segment_sum(per_row, row_frame, num_segments=candidates.shape[0], indices_are_sorted=True)
    return photon, hits.max()


@jax.jit
def pair_inside(geometry: Geometry, quaternions, pixel) -> jax.Array:
    """(m, n_records) bool whether each record (valid pixel ``pixel`` (m, n_records)) of a kept pair lies in a
    peak of the pair's rotation (``quaternions`` (m, 4)): the test of :func:`photon_terms`, so the M-steps get
    exactly the records whose photon terms the E-step counted."""
    m = crystal_from_lab(quaternions)[:, None]  # (m, 1, 3, 3)
    return peak_reflection(_points(m, geometry.q_lab[pixel]), geometry.tables)[2][:, 0]
