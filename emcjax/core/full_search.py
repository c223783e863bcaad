"""Full search by direct photon-peak tests: every frame of a block against one shared chunk of rotations.

A dense search over a fine grid (the point-group-reduced n = 70 sampling: 2.1 M rotations) tests every frame's
photon records against every rotation. As in candidate mode (emcjax.core.direct) nothing per rotation is
stored: q_crystal = C_r q_t, nearest lattice point, distance test, trilinear model value, photon term. Here the
rotations are shared by all frames, so the expected signal S(r, shell) is computed once per rotation (exact or
tabulated: emcjax.core.direct.exact_signal, emcjax.core.cut_signal.tabulated_signal) and a frame's S_dr over its
valid shells is a gather (estep.frame_signal).

The photon kernel is written elementwise over (frame, rotation, record): no 3 x 3 matrix products (which XLA
keeps as separate dot kernels, materialising every point's coordinates), so one fused reduction over the
records yields the (n_local, n_rot) photon terms. Gathers of points outside every peak are pointed at index 0
(one cache line), so only the ~2% of (record, rotation) pairs inside a peak read the model; or, in two passes
(:func:`shared_photon_terms_compact`), the arithmetic test of every pair, then the table reads and model
values of the pairs that pass it only (compacted: a cumulative sum and a scatter). The float32
operations are model.locate's in another association order: a record within an ulp of a peak boundary may
fall on the other side, so the log-likelihoods equal the candidate path's to float32 tolerance (tested).

Shapes: ``n_local`` frames, ``n_records`` padded photon and dead-pixel records per frame, ``n_rot`` rotations
of the chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax.core.direct import Geometry, Records
from emcjax.core.estep import RotationTables, frame_signal

_CORNERS = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]  # model.locate's corner order


def peak_test(q_crystal, tables: model_lib.GridTables):
    """The arithmetic part of the in-peak test, elementwise: ``q_crystal`` a tuple of three broadcastable
    float32 arrays (1/Å). Returns ``(frac, hkl, near)``: fractional and nearest integer indices (lists of three
    arrays) and whether the point lies within the peak radius of that lattice point (no table read)."""
    f, b = tables.frac_from_q, tables.q_from_frac
    frac = [f[i, 0] * q_crystal[0] + f[i, 1] * q_crystal[1] + f[i, 2] * q_crystal[2] for i in range(3)]
    hkl = [jnp.round(x) for x in frac]
    delta = [q_crystal[i] - (b[i, 0] * hkl[0] + b[i, 1] * hkl[1] + b[i, 2] * hkl[2]) for i in range(3)]
    return frac, hkl, delta[0] * delta[0] + delta[1] * delta[1] + delta[2] * delta[2] <= tables.radius_sq


def peak_reflection(q_crystal, tables: model_lib.GridTables):
    """:func:`peak_test` and the reflection table's read, elementwise: ``(frac, hkl, inside, row)``, ``inside``
    whether each point lies in a peak (model.locate's refl >= 0) and ``row`` that reflection (0 outside)."""
    frac, hkl, near = peak_test(q_crystal, tables)
    index = [hkl[i].astype(jnp.int32) - tables.hkl_min[i] for i in range(3)]
    for i, n in enumerate(tables.refl_lookup.shape):
        near = near & (index[i] >= 0) & (index[i] < n)
    refl = tables.refl_lookup[tuple(jnp.where(near, x, 0) for x in index)]
    inside = near & (refl >= 0)
    return frac, hkl, inside, jnp.where(inside, refl, 0)


def peak_value(q_crystal, tables: model_lib.GridTables, flat: jax.Array):
    """Model value at crystal-frame points, elementwise: ``q_crystal`` a tuple of three broadcastable float32
    arrays (1/Å), ``flat`` the padded model (model.pad_model). Returns ``(inside, value)``: whether each point
    lies in a peak (model.locate's refl >= 0) and its trilinear model value (0 outside)."""
    frac, hkl, inside, row = peak_reflection(q_crystal, tables)
    local = [tables.divisions[i] * (frac[i] - hkl[i]) for i in range(3)]
    base = [jnp.floor(x) for x in local]
    t = [x - y for x, y in zip(local, base)]
    n_vox = tables.full_to_asu.shape[1] - 1
    value = 0.0
    for corner in _CORNERS:
        at = [jnp.where(inside, jnp.clip(base[i].astype(jnp.int32) + corner[i] - tables.box_min[i], 0, n - 1), 0)
              for i, n in enumerate(tables.box_lookup.shape)]
        vox = tables.box_lookup[at[0], at[1], at[2]]
        weight = [t[i] if corner[i] else 1 - t[i] for i in range(3)]
        weight = jnp.where(vox < n_vox, weight[0] * weight[1] * weight[2], 0.0)
        value = value + weight * flat[tables.full_to_asu[row, vox]]
    return inside, jnp.where(inside, value, 0.0)


def chunk_points(q_lab: jax.Array, rotations: jax.Array):
    """Crystal-frame q (three (n_local, n_rot, n_records) arrays, as a broadcast) of records at lab q ``q_lab``
    (n_local, n_records, 3) under crystal_from_lab ``rotations`` (n_rot, 3, 3): the sums of core.direct."""
    q = q_lab[:, None, :, :]
    m = rotations[None, :, None, :, :]
    return tuple(m[..., i, 0] * q[..., 0] + m[..., i, 1] * q[..., 1] + m[..., i, 2] * q[..., 2] for i in range(3))


def record_photon_terms(likelihood, inside, value, pol, phi, background, count, dead, frame):
    """Per (record, rotation): photon_excess for photons, -zero_term for dead pixels, 0 outside every peak."""
    bragg = pol * phi * value
    background = pol * background
    photon = jnp.where(inside & (count > 0), likelihood.photon_excess(count, bragg, background, frame), 0.0)
    return photon - jnp.where(inside, dead * likelihood.zero_term(bragg, background, frame), 0.0)


@jax.jit
def shared_photon_terms(intensity, phi_local, likelihood, geometry: Geometry, records: Records, frames,
                        rotations) -> jax.Array:
    """(n_local, n_rot) sum over each frame's records inside a peak at each rotation of the photon term
    (``photon_excess`` for photons, ``-zero_term`` for dead pixels), nats: the join part of L_dr.

    Args:
      phi_local: (n_local,) float32 the frames' phi; frames: (n_local,) int32 their global index.
      rotations: (n_rot, 3, 3) float32 crystal_from_lab of the chunk (shared by all frames).
    """
    q_crystal = chunk_points(geometry.q_lab[records.pixel], rotations)
    inside, value = peak_value(q_crystal, geometry.tables, model_lib.pad_model(intensity))
    terms = record_photon_terms(likelihood, inside, value, geometry.polarization[records.pixel][:, None, :],
                          phi_local[:, None, None], records.background[:, None, :], records.count[:, None, :],
                          records.dead[:, None, :], frames[:, None, None])
    return jnp.sum(terms, axis=2)


def compact_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the first ``size`` True entries of a 1-d ``mask`` in increasing order, the rest of the
    ``size`` slots filled with the last position (so the list stays sorted), and how many there are. A
    cumulative sum and a scatter of distinct slots (jnp.nonzero's bincount adds every entry into its slot)."""
    slot = jnp.cumsum(mask, dtype=jnp.int32) - 1
    n = mask.shape[0]
    found = jnp.full(size, n - 1, jnp.int32).at[jnp.where(mask, slot, size)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    return found, slot[-1] + 1


@functools.partial(jax.jit, static_argnames=("max_hits",))
def shared_photon_terms_compact(intensity, phi_local, likelihood, geometry: Geometry, records: Records, frames,
                                rotations, max_hits: int) -> tuple[jax.Array, jax.Array]:
    """:func:`shared_photon_terms` in two passes: the arithmetic in-peak test (:func:`peak_test`, no table
    read) of every (row, rotation, record), then the table reads, model value and photon term only for the
    first ``max_hits`` (row, rotation, record) that pass it (~2% of them at the paper's geometry), summed
    into (row, rotation). Returns ``(terms (n_local, n_rot), hits ())``: complete where hits <= max_hits."""
    pixel = records.pixel
    used = (records.count > 0) | (records.dead > 0)
    near = peak_test(chunk_points(geometry.q_lab[pixel], rotations), geometry.tables)[2] & used[:, None, :]
    n_rows, n_rot, n_records = near.shape
    hit, hits = compact_positions(near.ravel(), max_hits)
    row, rest = jnp.divmod(hit, n_rot * n_records)
    rotation, record = jnp.divmod(rest, n_records)
    q = geometry.q_lab[pixel[row, record]]
    m = rotations[rotation]
    q_crystal = tuple(m[:, i, 0] * q[:, 0] + m[:, i, 1] * q[:, 1] + m[:, i, 2] * q[:, 2] for i in range(3))
    inside, value = peak_value(q_crystal, geometry.tables, model_lib.pad_model(intensity))
    inside = inside & (jnp.arange(max_hits) < hits)
    terms = record_photon_terms(likelihood, inside, value, geometry.polarization[pixel[row, record]], phi_local[row],
                          records.background[row, record], records.count[row, record], records.dead[row, record],
                          frames[row])
    out = jax.ops.segment_sum(terms, row * n_rot + rotation, num_segments=n_rows * n_rot, indices_are_sorted=True)
    return out.reshape(n_rows, n_rot), hits


def shared_signal(signal: jax.Array, masked_shells: jax.Array) -> jax.Array:
    """(n_local, n_rot) S_dr over each frame's valid shells from the chunk's (n_rot, n_shells) signal at
    phi = 1; ``masked_shells`` (n_local, n_masked) int32 (n_shells = padding)."""
    n_rot = signal.shape[0]
    padded = jnp.concatenate([signal, jnp.zeros((n_rot, 1), signal.dtype)], axis=1)
    tables = RotationTables(tomogram=None, signal=padded, total=signal.sum(axis=1))
    rotation = jnp.broadcast_to(jnp.arange(n_rot), (masked_shells.shape[0], n_rot))
    return frame_signal(tables, rotation, masked_shells[:, None, :])


@functools.partial(jax.jit, static_argnames=("max_hits",))
def shared_log_likelihood(intensity, phi_local, likelihood, geometry: Geometry, records: Records, frames,
                          masked_shells, rotations, signal, row_frame=None, max_hits: int = 0):
    """L_dr (no prior, no frame constant) of every frame at every rotation of a chunk: photon terms - phi_d
    S_dr, ``signal`` (n_rot, n_shells) the chunk's expected signal at phi = 1. ``records`` per frame (n_local
    rows), or per row of :func:`record_rows` with ``row_frame`` the local frame of each row. ``max_hits`` 0:
    one pass (:func:`shared_photon_terms`), else two (:func:`shared_photon_terms_compact`). Needs a likelihood
    whose zero-count term is linear (Poisson). Returns ``(logl (n_local, n_rot), complete ())``: ``complete``
    False when more than ``max_hits`` records passed the test (then redo with a larger ``max_hits``)."""
    if not likelihood.linear_zero_term:
        raise NotImplementedError("the full search by photon-peak tests needs a linear zero-count term (Poisson)")
    n_local = phi_local.shape[0]
    rows = jnp.arange(n_local) if row_frame is None else row_frame
    args = (intensity, phi_local[rows], likelihood, geometry, records, frames[rows], rotations)
    if max_hits:
        photon, hits = shared_photon_terms_compact(*args, max_hits)
        complete = hits <= max_hits
    else:
        photon, complete = shared_photon_terms(*args), jnp.bool_(True)
    if row_frame is not None:
        photon = jax.ops.segment_sum(photon, row_frame, num_segments=n_local, indices_are_sorted=True)
    return photon - phi_local[:, None] * shared_signal(signal, masked_shells), complete


def record_rows(records: dict, row_length: int) -> tuple[Records, jax.Array]:
    """A block's records (emcjax.direct's host dict: (n_local, n_records) ``pixel``, ``count``, ``dead``,
    ``background``, ``valid``, a frame's records first) re-packed into rows of ``row_length``, each frame's in
    consecutive rows (at least one): ``(Records (n_rows, row_length), row_frame (n_rows,) int32, sorted)``.
    Every frame padded to its own length instead of the longest frame's: fewer idle (record, rotation) tests."""
    used = records["valid"].sum(axis=1)
    per_frame = np.maximum(-(-used // row_length), 1)
    first = np.concatenate([[0], np.cumsum(per_frame)[:-1]])
    frame, position = np.nonzero(records["valid"])
    row, column = first[frame] + position // row_length, position % row_length
    n_rows = int(per_frame.sum())
    out = {}
    for field, fill, dtype in (("pixel", 0, np.int32), ("count", 0, np.float32), ("dead", 0, np.float32),
                               ("background", 1, np.float32)):
        packed = np.full((n_rows, row_length), fill, dtype)
        packed[row, column] = records[field][frame, position]
        out[field] = jnp.asarray(packed)
    return Records(**out), jnp.asarray(np.repeat(np.arange(per_frame.shape[0]), per_frame), jnp.int32)
