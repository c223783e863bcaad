"""M-steps of the direct candidate path without the kept rotations' in-peak entry tables.

The table path's closed-form M-steps (emcjax.core.mstep) read per-entry sums over the in-peak entries (r, t)
of the kept rotations: ~25,000 per rotation at the paper's detector, built, indexed and padded on the host
for every E-step. But in both updates only the entries that a kept photon (or dead pixel) falls in carry
anything beyond an exposure:

* reference update: an entry without a kept photon gets w_e = 0 (the gradient at 0 is minus its exposure),
  so it adds nothing to the numerator sum_e c_e w_ev w_e and only c_e w_ev to the denominator, with
  c_e = sum_{kept (d, r)} P_dr phi_d over the frames whose shell at t is valid (no dead pixel there);
* phi update: it needs S_dr of every kept pair (the E-step's, same model) and the model W at every kept
  join pair.

So the touched entries (the distinct (rotation, pixel) of the kept join pairs, a few hundred per frame) are
built on the device from the records the E-step already tested, the table path's update runs on them, and
the exposure of every other in-peak entry is back-projected straight from the reflections near the Ewald
sphere (:func:`exposure_projection`: every kept rotation's in-peak pixels found as the entries are,
``model.box_pixels`` + ``model.locate``, projected and summed, never stored). The result is the table
path's M-step; only the float32 summation order differs.

Shapes: ``n_union`` kept rotations (padded with zero exposure), ``n`` kept join pairs (= touched entries,
padded), ``m`` kept (frame, rotation) pairs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.model import entries as model_entries
from emcjax.model import slicing as model_slicing
from emcjax.core import mstep
from emcjax.core.arrays import Kept, Shared
from emcjax.core.direct import Geometry
from emcjax.rotations import crystal_from_lab

ROTATION_CHUNK = 16  # kept rotations per step of the exposure projection (memory: chunk x h_max x n_box² x ~40 B)
IN_PEAK_PER_ROTATION = 32768  # in-peak pixels per rotation the compacted stencils hold at first (~25,000 at 4 Å on a Pilatus 6M)


class DirectKept(NamedTuple):
    """Kept pairs of the direct path with their touched entries (device arrays, one device).

    Attributes:
      kept: the kept pairs (:class:`emcjax.core.arrays.Kept`); ``entry`` numbers the touched entries,
        ``pair_rotation`` the union's rotations.
      quaternions: (n_union, 4) float32 the kept rotations (padding repeats one; no pair refers to it).
      touched_rotation: (n,) int32 union rotation of each touched entry; touched_pixel: (n,) int32 its pixel;
      touched: (n,) bool real touched entries (False on padding).
      pair_signal: (m,) float32 S_dr at phi = 1 of every kept pair over its frame's valid shells (the E-step's).
    """

    kept: Kept
    quaternions: jax.Array
    touched_rotation: jax.Array
    touched_pixel: jax.Array
    touched: jax.Array
    pair_signal: jax.Array


def touched_entries(dk: DirectKept, geometry: Geometry) -> model_lib.Entries:
    """The touched entries with their trilinear stencils (zero weight on padding), as ``model.Entries``."""
    voxels, weights = model_entries.entry_stencils(dk.quaternions, dk.touched_rotation, dk.touched_pixel, geometry.q_lab,
                                              geometry.tables)  # those of the entries (model.entries_from_pairs)
    weights = jnp.where(dk.touched[:, None], weights, 0.0)
    return model_lib.Entries(dk.touched_rotation, dk.touched_pixel, voxels, weights, n_rot=dk.quaternions.shape[0])


def _shared(dk: DirectKept, geometry: Geometry) -> Shared:
    return Shared(entries=touched_entries(dk, geometry), polarization=geometry.polarization, shell=geometry.shell,
                  log_prior=None, tables=geometry.tables)


def _in_peak_reflection(rot, q_lab, tables):
    """(...) int32 reflection whose peak holds lab points ``q_lab`` (..., 3) at ``rot`` (..., 3, 3), -1 for none,
    q_crystal computed elementwise (the in-peak test of the entries)."""
    q_crystal = jnp.sum(rot * q_lab[..., None, :], axis=-1)
    refl, _ = jax.vmap(model_slicing.nearest_reflection, in_axes=(0, None))(q_crystal.reshape(-1, 3), tables)
    return refl.reshape(q_crystal.shape[:-1])


@functools.partial(jax.jit, static_argnames=("n_shells",))
def exposure_rows(phi, dk: DirectKept, n_shells: int) -> jax.Array:
    """(n_union, n_shells) c of an entry of each kept rotation without dead pixels, by the entry's shell: sum of
    P_dr phi_d over the rotation's kept pairs whose frame does not mask the shell (0 on padding)."""
    per_rot, per_rot_shell = mstep.rotation_sums(phi, dk.kept, dk.quaternions.shape[0], n_shells, None)
    return per_rot[:, None] - per_rot_shell[:, :n_shells]


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_box", "cap"), donate_argnums=(0,))
def _project_chunk(acc, rows, quats, proj, geometry: Geometry, shape, h_max: int, n_box: int, cap: int):
    """``acc`` plus one chunk's projection (:func:`exposure_projection`): the in-peak test on every box slot, the
    stencils and the scatter only for the in-peak ones, compacted to ``cap`` (about a third of the slots).
    Returns (acc, in-peak slots): the sum is complete only where their number is <= cap."""
    rot = crystal_from_lab(quats)
    pixel, refl, _ = jax.vmap(lambda m: model_lib.box_pixels(m, proj, shape, h_max, n_box))(rot)
    safe = jnp.maximum(pixel, 0)
    found = _in_peak_reflection(rot[:, None], geometry.q_lab[safe], geometry.tables)
    inside = ((pixel >= 0) & (found == refl)).ravel()
    (slot,) = jnp.nonzero(inside, size=cap, fill_value=inside.shape[0])
    used = slot < inside.shape[0]
    slot = jnp.minimum(slot, inside.shape[0] - 1)
    r = slot // pixel.shape[1]
    px = safe.ravel()[slot]
    q_crystal = jnp.einsum("eij,ej->ei", rot[r], geometry.q_lab[px], precision=jax.lax.Precision.HIGHEST)
    _, voxels, weights = jax.vmap(model_lib.locate, in_axes=(0, None))(q_crystal, geometry.tables)
    value = jnp.where(used, rows[r, geometry.shell[px]], 0.0)
    acc = acc + jax.ops.segment_sum((value[:, None] * weights).ravel(), voxels.ravel(), num_segments=acc.shape[0])
    return acc, inside.sum(dtype=jnp.int32)


def exposure_projection(rows, quaternions, n_rotations: int, proj, geometry: Geometry, shape, h_max: int, n_box: int,
                        n_flat: int) -> jax.Array:
    """(n_flat,) sum over every in-peak pixel t of the first ``n_rotations`` rotations r of ``rows[r, shell(t)]``
    times the trilinear weights of (r, t) on each voxel of the padded model (before the stabilizer sum).

    ``rows`` (n_union, n_shells) from :func:`exposure_rows`, ``quaternions`` (n_union, 4), n_union a multiple of
    ``ROTATION_CHUNK``: one compiled call per chunk of ``ROTATION_CHUNK`` rotations, whatever the union's size
    (stencils as in ``model.entry_stencils``, matmul q, so that the sums are the table path's).
    ``h_max`` >= the reflections near the sphere at every rotation (``model.near_sphere_counts``); ``n_flat``
    the padded model's size. A box pixel is in-peak by the test of the entries (``model.box_pixels``).
    """
    acc = jnp.zeros(n_flat, rows.dtype)
    cap = ROTATION_CHUNK * IN_PEAK_PER_ROTATION
    for start in range(0, n_rotations, ROTATION_CHUNK):
        chunk = slice(start, start + ROTATION_CHUNK)
        while True:  # a chunk with more in-peak slots than ``cap`` is redone with a larger one
            new, count = _project_chunk(acc.copy(), rows[chunk], quaternions[chunk], proj, geometry, shape, h_max,
                                        n_box, cap)
            if int(count) <= cap:
                break
            cap = 2 * cap
        acc = new
    return acc


@functools.partial(jax.jit, static_argnames=("n_shells",))
def intensity_update(intensity, phi, likelihood, dk: DirectKept, geometry: Geometry, every, n_shells: int):
    """The reference update (``mstep.reference_update``) over every in-peak entry of the kept rotations: the
    touched entries solved, every other entry's exposure from ``every`` (:func:`exposure_projection` of
    :func:`exposure_rows`)."""
    shared = _shared(dk, geometry)
    per_rot, per_rot_shell = mstep.rotation_sums(phi, dk.kept, dk.quaternions.shape[0], n_shells, None)
    touched = mstep.exposure_of_rotations(per_rot, per_rot_shell, shared)
    ent = shared.entries
    touched = jax.ops.segment_sum((touched[:, None] * ent.weights).ravel(), ent.voxels.ravel(), num_segments=every.shape[0])
    extra = model_lib.stabilizer_sum((every - touched)[:-1].reshape(intensity.shape), geometry.tables).reshape(-1)
    return mstep.reference_update(intensity, phi, likelihood, dk.kept, shared, n_shells, extra_denominator=extra)


@functools.partial(jax.jit, static_argnames=("n_shells",))
def phi_update(intensity, phi, likelihood, dk: DirectKept, geometry: Geometry, n_shells: int):
    """The phi update and normalisation of the table path (``step.phi_mstep``) from the kept pairs' S_dr and the
    model at the touched entries: ``(intensity, phi)``."""
    shared = _shared(dk, geometry)
    w = model_lib.tomogram(intensity, shared.entries)[dk.kept.entry]
    phi, used = mstep.phi_update(intensity, phi, likelihood, dk.kept, shared, n_shells, pair_signal=dk.pair_signal,
                                 term_model=w, until_fixed=True)
    return mstep.normalise_phi(intensity, phi, used)
