"""Closed-form M-steps of the Poisson likelihoods: intensity updates (per-pixel ML + compress, MLEM) and phi.

They use only the join pairs of *kept* (frame, rotation) pairs (:class:`emcjax.core.arrays.Kept`) of one
device. With a mesh axis name (``axis``) the in-peak entries are split over the devices (entry e on device
e % n_devices): every kept join pair is sent to the device that owns its entry (one ``all_to_all`` with a
static per-destination budget), each device solves the entries it owns with no communication inside the
Newton loop and back-projects them onto the voxels; one ``psum`` of the voxel sums ends the update.
``axis=None`` runs on one device.
Each frame's kept pairs live on one device, so the phi update needs no communication until its single
final ``psum``. All divisions are guarded with ``where`` on both sides (no epsilon), so reverse-mode
gradients through the updates are finite.

Intensity updates (``EMCConfig.intensity_update``):

* ``"reference"`` (default): the reference program's per-pixel maximum likelihood followed by compression
  (METHOD.md §7.1): every in-peak entry (r, t) gets the 1-D Poisson ML value w_rt >= 0 given its kept
  frames, then each voxel is the exposure- and trilinear-weighted average of those values.
* ``"mlem"``: the multiplicative EM update of the voxels with the latent split of each photon into Bragg
  and background, ``I_v <- I_v [sum P K phi w_v / (B + phi W)] / [sum P phi pol w_v]``, repeated
  ``inner_iterations`` times (docs/METHOD-NOTES.md: it over-fits weakly observed voxels).

Both sum numerators and denominators over each reflection's stabilizer (``model.stabilizer_sum``). The
background is the likelihood's (``background_mean``; a per-frame background scale enters here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emcjax import model as model_lib
from emcjax.core.arrays import Kept, Shared
from emcjax.core.estep import frame_signal, rotation_tables
from emcjax.errors import ConfigError


def require_poisson(likelihood, rule: str) -> None:
    """The closed forms are the Poisson ML; other likelihoods take the gradient M-step."""
    if not getattr(likelihood, "poisson_counts", False):
        raise ConfigError(
            f"intensity_update={rule!r} is the closed-form Poisson update; likelihood "
            f"{type(likelihood).__name__} needs intensity_update='gradient'"
        )


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def _n_devices(axis) -> int:
    return 1 if axis is None else jax.lax.axis_size(axis)


def _owned(values: jax.Array, axis) -> jax.Array:
    """This device's rows of a per-entry array: entry e belongs to device e % n_devices (strided, so that every
    device owns a spread of rotations and the work stays balanced); its local index is e // n_devices."""
    if axis is None:
        return values
    n = jax.lax.axis_size(axis)
    rows = values.reshape(-1, n, *values.shape[1:])
    return jax.lax.dynamic_index_in_dim(rows, jax.lax.axis_index(axis), axis=1, keepdims=False)


def _sum_to_owned(values: jax.Array, axis) -> jax.Array:
    """Sum over devices of per-entry values, this device's entries only."""
    if axis is None:
        return values
    n = jax.lax.axis_size(axis)
    return jax.lax.psum_scatter(values.reshape(-1, n).T, axis, scatter_dimension=0, tiled=False)


def safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0 (no NaN or inf, nor in gradients)."""
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def kept_background(likelihood, kept: Kept) -> jax.Array:
    """(n,) background of every kept join pair in the likelihood's terms, per unit pol (photons)."""
    pol = jnp.where(kept.polarization > 0, kept.polarization, 1.0)
    return likelihood.background_mean(pol * kept.background, kept.frame) / pol


def rotation_sums(phi, kept: Kept, n_rot: int, n_shells: int, axis):
    """Sums of P_dr phi_d over the kept pairs of every rotation: (n_rot,) over all of them and
    (n_rot, n_shells + 1) over those whose frame masks each shell (last column: padding)."""
    pw = kept.pair_prob * phi[kept.pair_frame]
    per_rot = jax.ops.segment_sum(pw, kept.pair_rotation, num_segments=n_rot)
    seg = kept.pair_rotation[:, None] * (n_shells + 1) + kept.pair_masked
    per_rot_shell = jax.ops.segment_sum(
        jnp.broadcast_to(pw[:, None], seg.shape).ravel(), seg.ravel(), num_segments=n_rot * (n_shells + 1)
    )
    sums = _psum(jnp.concatenate([per_rot[:, None], per_rot_shell.reshape(n_rot, n_shells + 1)], axis=1), axis)
    return sums[:, 0], sums[:, 1:]


def rotation_exposure(phi, kept: Kept, shared: Shared, n_shells: int, axis) -> jax.Array:
    """(size,) sum over kept pairs (d, r) of P_dr phi_d over the frames whose shell at the pixel is valid, for
    this device's entries (r, t), dead pixels not subtracted."""
    per_rot, per_rot_shell = rotation_sums(phi, kept, shared.entries.n_rot, n_shells, axis)
    return exposure_of_rotations(per_rot, per_rot_shell, shared, axis)


def exposure_of_rotations(per_rot, per_rot_shell, shared: Shared, axis=None) -> jax.Array:
    """(size,) exposure of this device's entries (r, t) from the per-rotation sums of P_dr phi_d: (n_rot,) over
    all kept pairs and (n_rot, n_shells + 1) over those whose frame masks each shell (last column: padding)."""
    rotation = _owned(shared.entries.rotation, axis)
    pixel = _owned(shared.entries.pixel, axis)
    return per_rot[rotation] - per_rot_shell[rotation, shared.shell[pixel]]


def entry_exposure(phi, kept: Kept, shared: Shared, n_shells: int, axis) -> jax.Array:
    """(size,) c_rt of this device's entries: sum over kept pairs (d, r) of P_dr phi_d over frames whose shell
    at t is valid, minus kept dead pixels: the scaled exposure each in-peak entry received."""
    dead = jax.ops.segment_sum(kept.prob * phi[kept.frame] * kept.dead, kept.entry,
                               num_segments=shared.entries.rotation.shape[0])
    return rotation_exposure(phi, kept, shared, n_shells, axis) - _sum_to_owned(dead, axis)


def back_project(values, shared: Shared, shape, axis) -> jax.Array:
    """Sum over devices of this device's entry values (k, size) through the trilinear weights,
    stabilizer-summed: (k, n_asu * n_voxels)."""
    voxels = _owned(shared.entries.voxels, axis)
    weights = _owned(shared.entries.weights, axis)
    n_flat = shape[0] * shape[1] + 1

    def one(v):
        return jax.ops.segment_sum((v[:, None] * weights).ravel(), voxels.ravel(), num_segments=n_flat)

    flat = _psum(jax.vmap(one)(values), axis)
    per_asu = flat[:, :-1].reshape(-1, *shape)
    return jax.vmap(lambda f: model_lib.stabilizer_sum(f, shared.tables).reshape(-1))(per_asu)


ROUTE_SLACK = 1.1
"""Per-destination buffer of the routed terms, in units of a device's fair share of its (padded) kept join
pairs. The kept budget already pads the live pairs by >= 1.25x, and the strided ownership spreads them evenly
over the devices, so 1.1 rarely overflows (an overflow takes the gathered branch: same result, slower)."""


def _route(entry: jax.Array, columns: jax.Array, live: jax.Array, axis, budget: int):
    """Every live term to the device that owns its entry (one ``all_to_all``), in buckets of ``budget`` terms
    per (source, destination) pair: ``(entry, columns)`` of the terms this device owns, from every device,
    (n_devices * budget,) int32 (-1 in an empty slot) and (n_devices * budget, k). Terms past a full
    bucket are dropped (the caller checks).

    ``columns``: (n, k) float values of each term.
    """
    n = jax.lax.axis_size(axis)
    length = entry.shape[0]
    dest = jnp.where(live, entry % n, n)
    order = jnp.argsort(dest, stable=True)
    sorted_dest = dest[order]
    counts = jnp.zeros(n + 1, jnp.int32).at[dest].add(1)
    rank = jnp.arange(length, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[sorted_dest]
    slot = jnp.where((sorted_dest < n) & (rank < budget), sorted_dest * budget + rank, n * budget)
    # the entry travels bit for bit in a column of the values' float type (one all_to_all for everything)
    as_int = jnp.int32 if columns.dtype.itemsize == 4 else jnp.int64
    entry_bits = jax.lax.bitcast_convert_type(jnp.where(live, entry, -1).astype(as_int), columns.dtype)
    packed = jnp.concatenate([entry_bits[:, None], columns], axis=1)
    empty = jnp.zeros((n * budget + 1, packed.shape[1]), columns.dtype)
    empty = empty.at[:, 0].set(jax.lax.bitcast_convert_type(jnp.asarray(-1, as_int), columns.dtype))
    received = jax.lax.all_to_all(empty.at[slot].set(packed[order])[:-1], axis, 0, 0, tiled=True)
    return jax.lax.bitcast_convert_type(received[:, 0], as_int).astype(jnp.int32), received[:, 1:]


def _newton_entries(local, pk, b, live, a, size: int, newton_steps: int, dtype):
    """(size,) w >= 0 of each entry given its terms (module docstring of :func:`reference_update`): Newton from
    w = 0 on the entries the terms touch, compactly numbered."""
    n_terms = local.shape[0]
    touched, compact = jnp.unique(jnp.where(live, local, size), size=n_terms, fill_value=size, return_inverse=True)
    a_touched = jnp.append(a, 0.0)[touched]
    w_touched = newton_segments(compact.reshape(-1), pk, b, live, a_touched, n_terms, newton_steps, dtype)
    w_touched = jnp.where(touched < size, w_touched, 0.0)
    return jnp.zeros(size + 1, dtype).at[touched].set(w_touched)[:size]


def newton_iterate(body, x0, newton_steps: int, until_fixed: bool = False):
    """``body`` applied ``newton_steps`` times to ``x0`` (``jax.lax.fori_loop``: reverse-differentiable), or with
    ``until_fixed`` the same result sooner: a ``while_loop`` that stops at the first step that changes nothing
    (a deterministic body then changes nothing ever after, so the result is bit for bit the fixed count's).
    For the host-driven iterations (streamed, direct candidate path), which are not differentiated."""
    if not until_fixed:
        return jax.lax.fori_loop(0, newton_steps, body, x0)

    def step(carry):
        i, x, _ = carry
        new = body(i, x)
        return i + 1, new, jnp.any(new != x)

    return jax.lax.while_loop(lambda c: (c[0] < newton_steps) & c[2], step, (0, x0, jnp.asarray(True)))[1]


def newton_segments(segment, pk, b, live, a, n_segments: int, newton_steps: int, dtype, until_fixed: bool = False):
    """(n_segments,) w >= 0 solving sum_terms P K / (B + w) = a per segment (module docstring of
    :func:`reference_update`), by Newton's method from w = 0; 0 where the left side at 0 is <= a.
    ``until_fixed``: see :func:`newton_iterate`."""
    safe_pk = jnp.where(live, pk, 1.0)

    def g_and_slope(w):
        x = jnp.where(live, pk / (b + w[segment]), 0.0)
        # both sums in one scatter (each column in the terms' order: the sums of two separate segment sums)
        sums = jax.ops.segment_sum(jnp.stack([x, jnp.where(live, x * x / safe_pk, 0.0)], axis=1), segment,
                                   num_segments=n_segments)
        return sums[:, 0] - a, -sums[:, 1]

    def body(_, w):
        g, slope = g_and_slope(w)
        descending = slope < 0
        step = jnp.where(descending, -g / jnp.where(descending, slope, -1.0), 0.0)
        return jnp.where(g > 0, w + step, w)

    w0 = jnp.zeros(n_segments, dtype)
    g0, _ = g_and_slope(w0)
    return jnp.where(g0 > 0, newton_iterate(body, w0, newton_steps, until_fixed), 0.0)


def reference_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 30,
                     axis=None, extra_denominator=None):
    """The reference's per-pixel ML + compress (METHOD.md §7.1), with w_rt >= 0.

    For each in-peak entry e = (r, t): w_e solves sum_{kept d} P_dr phi_d pol_t = sum P_dr K_dt / (B_dt/phi_d + w),
    found by Newton's method from w = 0 (monotone for this convex decreasing function); w = 0 when the
    right side at 0 is already smaller. Then I_v = sum_e c_e w_ev w_e / sum_e c_e w_ev with c_e = sum P_dr phi_d;
    voxels no kept pair observes are set to 0 (as the reference does).

    On a mesh every kept join pair (photon or dead pixel) is sent to the device that owns its entry
    (``all_to_all`` with a static per-destination budget of ``ROUTE_SLACK`` x a fair share), so each device
    solves and back-projects only its own entries; when a bucket would overflow (kept pairs concentrated on
    few entries) the terms are gathered whole instead (``lax.cond``, same result).

    ``extra_denominator``: (n_asu * n_voxels,) stabilizer-summed sum_e c_e w_ev of in-peak entries that are
    not in ``shared`` (they get w_e = 0: no kept photon; emcjax.core.direct_mstep), added to the denominator.
    """
    n_entries = shared.entries.rotation.shape[0]
    n = _n_devices(axis)
    size = n_entries // n
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count
    photon = (pk > 0) & (phi_k > 0)
    b = jnp.where(photon, kept_background(likelihood, kept) / jnp.where(photon, phi_k, 1.0), 1.0)
    columns = jnp.stack([jnp.where(photon, pk, 0.0), b, kept.prob * phi_k * kept.dead], axis=1)
    live = photon | (columns[:, 2] > 0)
    exposure_no_dead = rotation_exposure(phi, kept, shared, n_shells, axis)
    pol_owned = shared.polarization[_owned(shared.entries.pixel, axis)]

    def solve(entry, cols):  # entry: global entry of each term this device owns, -1 for none
        local = jnp.where((entry >= 0) & (entry < n_entries), entry // n, size)
        pk_t, b_t, dead_t = cols[:, 0], cols[:, 1], cols[:, 2]
        dead = jax.ops.segment_sum(dead_t, local, num_segments=size + 1)[:size]
        exposure = exposure_no_dead - dead
        w = _newton_entries(local, pk_t, b_t, (local < size) & (pk_t > 0), exposure * pol_owned, size,
                            newton_steps, intensity.dtype)
        return jnp.stack([exposure * w, exposure])

    if axis is None:
        sums = solve(jnp.where(live, kept.entry, -1), columns)
    else:
        length = kept.entry.shape[0]
        budget = min(length, -(-int(ROUTE_SLACK * length / n + 1) // 8) * 8)
        counts = jnp.zeros(n + 1, jnp.int32).at[jnp.where(live, kept.entry % n, n)].add(1)
        fits = jax.lax.pmax(jnp.max(counts[:n]), axis) <= budget

        def routed():
            return solve(*_route(kept.entry, columns, live, axis, budget))

        def gathered():
            entry = jax.lax.all_gather(jnp.where(live, kept.entry, -1), axis, tiled=True)
            mine = (entry >= 0) & (entry % n == jax.lax.axis_index(axis))
            return solve(jnp.where(mine, entry, -1), jax.lax.all_gather(columns, axis, tiled=True))

        sums = jax.lax.cond(fits, routed, gathered)
    numerator, denominator = back_project(sums, shared, intensity.shape, axis)
    if extra_denominator is not None:
        denominator = denominator + extra_denominator
    return safe_divide(numerator, denominator).reshape(intensity.shape)


def mlem_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, inner_iterations: int = 1,
                axis=None):
    """Multiplicative EM update of the voxels (module docstring), ``inner_iterations`` times.

    Voxels with no exposure keep their value (0 would be absorbing under multiplicative updates).
    """
    ent = shared.entries
    exposure = entry_exposure(phi, kept, shared, n_shells, axis)
    pol = shared.polarization[_owned(ent.pixel, axis)]
    denominator = back_project((exposure * pol)[None], shared, intensity.shape, axis)[0]
    phi_k = phi[kept.frame]
    pk = kept.prob * kept.count * phi_k
    background = kept_background(likelihood, kept)
    voxels, weights = ent.voxels[kept.entry], ent.weights[kept.entry]
    n_flat = intensity.size + 1

    def body(_, flat):
        w = jnp.sum(weights * jnp.append(flat, 0.0)[voxels], axis=1)  # the model at the kept entries
        ratio = pk / (background + phi_k * w)
        numerator = _psum(jax.ops.segment_sum((ratio[:, None] * weights).ravel(), voxels.ravel(), num_segments=n_flat), axis)
        numerator = model_lib.stabilizer_sum(numerator[:-1].reshape(intensity.shape), shared.tables).reshape(-1)
        return jnp.where(denominator > 0, flat * safe_divide(numerator, denominator), flat)

    return jax.lax.fori_loop(0, inner_iterations, body, intensity.reshape(-1)).reshape(intensity.shape)


def phi_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, newton_steps: int = 40,
               axis=None, tables=None, pair_signal=None, term_model=None, until_fixed: bool = False):
    """Per-frame 1-D Poisson ML of phi >= 0 given the responsibilities (METHOD.md §7.3).

    Maximises sum_{kept r} P_dr [sum_t K_dt log(B_dt + phi W_rt) - phi S_dr] by Newton's method from phi = 0
    (the gradient is convex and decreasing in phi); phi = 0 when the gradient at 0 is <= 0 (a blank frame).
    Frames without any kept weight (weight 0: rejected, other half set, padding) keep their phi.
    ``tables``: the rotation tables of ``intensity`` when the caller has them (the E-step's). Or, without
    tables, ``pair_signal`` (m,) S_dr of every kept pair and ``term_model`` (n,) W at every kept join pair
    (emcjax.core.direct_mstep). ``until_fixed``: stop the Newton steps once none changes phi (same result, not
    reverse-differentiable; :func:`newton_iterate`).

    Returns:
      ``(phi, used)``: the new, unnormalised phi of all frames and which frames were updated.
    """
    n_frames = phi.shape[0]
    if pair_signal is None:
        tables = rotation_tables(intensity, shared, n_shells) if tables is None else tables
        pair_signal, term_model = frame_signal(tables, kept.pair_rotation, kept.pair_masked), tables.tomogram[kept.entry]
    signal, w = pair_signal, term_model
    expected = jax.ops.segment_sum(kept.pair_prob * signal, kept.pair_frame, num_segments=n_frames)
    expected -= jax.ops.segment_sum(kept.prob * kept.dead * kept.polarization * w, kept.frame, num_segments=n_frames)
    pk = kept.prob * kept.count
    live = pk > 0
    safe_pk = jnp.where(live, pk, 1.0)
    background = kept_background(likelihood, kept)

    def grad(p):  # local sums: every frame's kept pairs are on one device
        x = jnp.where(live, pk * w / (background + p[kept.frame] * w), 0.0)
        # both sums in one scatter (each column in the pairs' order: the sums of two separate segment sums)
        sums = jax.ops.segment_sum(jnp.stack([x, jnp.where(live, x * x / safe_pk, 0.0)], axis=1), kept.frame,
                                   num_segments=n_frames)
        return sums[:, 0] - expected, -sums[:, 1]

    def body(_, p):
        g, slope = grad(p)
        descending = (g > 0) & (slope < 0)
        return jnp.where(descending, p - g / jnp.where(descending, slope, -1.0), p)

    p0 = jnp.zeros(n_frames, phi.dtype)
    g0, _ = grad(p0)
    p = jnp.where(g0 > 0, newton_iterate(body, p0, newton_steps, until_fixed), 0.0)
    mass = jax.ops.segment_sum(kept.pair_prob, kept.pair_frame, num_segments=n_frames)
    p, mass = _psum(jnp.stack([jnp.where(mass > 0, p, 0.0), mass]), axis)
    used = mass > 0
    return jnp.where(used, p, phi), used


def normalise_phi(intensity, phi, used):
    """Mean-1 phi over the used frames, the inverse factor on the model (the likelihood is unchanged)."""
    n_used = jnp.sum(used)
    mean = safe_divide(jnp.sum(jnp.where(used, phi, 0.0)), n_used.astype(phi.dtype))
    ok = mean > 0
    factor = jnp.where(ok, mean, 1.0)
    return intensity * factor, phi / factor
