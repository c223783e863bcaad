"""Expected complete-data log-likelihood of the kept pairs, and a gradient M-step (optax) for any likelihood.

    Q(I, phi, likelihood) = sum_{kept join pairs} P_dr [photon_excess - dead x zero_term]
                          + sum_{kept (d, r)} P_dr Z_dr

is the E-step's L_dr (emcjax.core.estep) averaged over the kept responsibilities: its gradient in the model is
the M-step's. The closed forms of emcjax.core.mstep maximise it for Poisson; :func:`gradient_update` takes
optax steps on it for any likelihood (the model in log space, so that it stays positive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from emcjax import model as model_lib
from emcjax.core.arrays import Kept, Shared
from emcjax.core.estep import frame_signal, join_terms, rotation_tables


def pair_zero_terms(likelihood, tomogram, phi, kept: Kept, shared: Shared, max_entries: int) -> jax.Array:
    """(m,) Z_dr of every kept (frame, rotation) pair, summed over the rotation's in-peak entries (at most
    ``max_entries`` per rotation; entries are sorted by rotation)."""
    ent = shared.entries
    start = jnp.searchsorted(ent.rotation, jnp.arange(ent.n_rot + 1))
    rotation = kept.pair_rotation
    index = start[rotation][:, None] + jnp.arange(max_entries)[None, :]
    real = index < start[rotation + 1][:, None]
    index = jnp.where(real, index, 0)
    pixel = ent.pixel[index]
    background = jnp.take_along_axis(kept.pair_background, shared.shell[pixel], axis=1)
    valid = real & (background > 0)
    frame = kept.pair_frame[:, None]
    pol = shared.polarization[pixel]
    z = likelihood.zero_term(pol * phi[frame] * tomogram[index], pol * jnp.where(valid, background, 1.0), frame)
    return jnp.sum(jnp.where(valid, z, 0.0), axis=1)


def expected_log_likelihood(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int,
                            max_entries: int) -> jax.Array:
    """Q of this device's kept pairs (nats; sum over devices for the whole data set)."""
    tables = rotation_tables(intensity, shared, n_shells)
    terms = join_terms(likelihood, tables.tomogram, phi[kept.frame], kept.frame, kept)  # Kept has the join fields
    photon = jnp.sum(kept.prob * terms)
    if likelihood.linear_zero_term:
        zero = -phi[kept.pair_frame] * frame_signal(tables, kept.pair_rotation, kept.pair_masked)
    else:
        zero = pair_zero_terms(likelihood, tables.tomogram, phi, kept, shared, max_entries)
    return photon + jnp.sum(kept.pair_prob * zero)


def gradient_update(intensity, phi, likelihood, kept: Kept, shared: Shared, n_shells: int, *, steps: int,
                    learning_rate: float, max_entries: int, wrt: str = "intensity", axis=None):
    """``steps`` Adam steps on -Q in log space of ``wrt`` ("intensity" or "phi"); returns the new array.

    Intensities are symmetrised after each step (stabilizer average); phi of frames without kept pairs and
    voxels that no kept pair sees do not move (their gradient is 0).
    """
    floor = 1e-6 * jnp.maximum(jnp.max(jnp.abs(intensity if wrt == "intensity" else phi)), 1e-30)
    start = jnp.log(jnp.maximum(intensity if wrt == "intensity" else phi, floor))

    def loss(log_x):
        x = jnp.exp(log_x)
        args = (x, phi) if wrt == "intensity" else (intensity, x)
        return -expected_log_likelihood(*args, likelihood, kept, shared, n_shells, max_entries)

    optimizer = optax.adam(learning_rate)

    def body(carry, _):
        log_x, opt_state = carry
        grad = jax.grad(loss)(log_x)
        grad = grad if axis is None else jax.lax.psum(grad, axis)
        updates, opt_state = optimizer.update(grad, opt_state)
        log_x = optax.apply_updates(log_x, updates)
        if wrt == "intensity":
            log_x = jnp.log(jnp.maximum(model_lib.symmetrize(jnp.exp(log_x), shared.tables), floor))
        return (log_x, opt_state), None

    (log_x, _), _ = jax.lax.scan(body, (start, optimizer.init(start)), None, length=steps)
    out = jnp.exp(log_x)
    original = intensity if wrt == "intensity" else phi
    return jnp.where(original > 0, out, jnp.where(out > floor, out, 0.0))
