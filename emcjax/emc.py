"""The EMC iteration over all devices and hosts: the pure step (emcjax.core.step) lifted over the mesh.

* :func:`initial_state` / :func:`init_state`: a random symmetric model (``jax.random``), phi from counts.
* :func:`iterate`: one iteration. When every block is resident and shares the problem's rotation set, the
  whole iteration is one jitted ``shard_map`` of :func:`emcjax.core.step.make_update` over the stacked blocks
  (E-step, kept pairs and M-steps on the device). Otherwise (``stream``: blocks re-read from disk, the next
  one prepared while the devices work on the current one; or candidate lists, each block with its own
  rotation set) the same kernels run block by block from the host: with streaming the kept pairs stay on
  the device, with per-block rotation sets they are re-indexed on the host into the union of the kept
  rotations before the M-steps.

The kept pairs of a block have a static budget (``Problem.kept_budget``); an iteration whose E-step needed
more reruns with a larger bucket (the step is pure, so the rerun starts from the same state).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from emcjax import heap
from emcjax import model as model_lib
from emcjax import parallel
from emcjax.config import EMCConfig
from emcjax.core.arrays import EMCState, Hyper, Kept
from emcjax.core.estep import rotation_tables
from emcjax.core.step import Batch, Diagnostics, FrameStats, KeptRotations, StepSpec, estep_block, intensity_mstep
from emcjax.core.step import background_mstep, make_update, phi_mstep
from emcjax.data import bucket_length
from emcjax.errors import ConfigError
from emcjax.problem import Problem, build_block, correlation_by_hkl, rotation_set, setup_problem

__all__ = ["EMCConfig", "EMCState", "EStep", "Problem", "correlation_by_hkl", "estep", "init_state", "initial_state",
           "iterate", "make_step", "setup_problem", "step_function", "update_intensity", "update_phi"]


def init_state(problem: Problem, config: EMCConfig, key: jax.Array, shared=None) -> EMCState:
    """Random symmetric model (U(0,1) x exp(-r^2/gw^2) per voxel, the reference's start) and phi from counts;
    pure in ``key`` (``jax.vmap`` over keys gives independent starts).

    The model is scaled so that a frame at phi = 1 expects the mean number of non-background photons (over
    the prior of the rotations), and phi_d is proportional to the frame's photons above its expected
    background (mean 1). ``shared``: the rotation set that scales the model (default ``problem.shared``).
    """
    grid = problem.grid
    spacing = np.linalg.norm(grid.crystal.reciprocal_basis, axis=0).min() / config.vn
    r2 = np.einsum("ij,ij->i", grid.voxel_q(), grid.voxel_q()) / spacing**2
    profile = jnp.asarray(np.exp(-r2 / config.gw**2), jnp.float32)
    shared = problem.shared if shared is None else shared
    used = problem.frame_weights > 0
    signal = problem.photons - problem.expected_background
    target = max(float(signal[used].mean()), 1e-3)
    intensity = _random_model(key, profile, shared, target, shape=grid.model_shape, n_shells=problem.n_shells)
    phi = np.maximum(signal, 0.1 * target) / target
    phi /= phi[used].mean()
    return EMCState(
        iteration=jnp.int32(0),
        intensity=intensity,
        phi=jnp.asarray(phi, jnp.float32),
        likelihood=config.likelihood_model(problem.n_frames),
        hyper=Hyper.of(*config.thresholds, config.inverse_temperature),
        background_shell=jnp.ones(problem.n_shells, jnp.float32) if config.refine_background_shells else None,
    )


@functools.partial(jax.jit, static_argnames=("shape", "n_shells"))
def _random_model(key, profile, shared, target, shape: tuple[int, int], n_shells: int) -> jax.Array:
    """The random start of :func:`init_state`: (n_asu, n_voxels) U(0,1) x ``profile`` per voxel, symmetrized
    and scaled so that a frame at phi = 1 expects ``target`` photons over the prior of ``shared``'s rotations.
    Jitted on its arrays (not closed over a problem), so that every problem and seed of one shape shares one
    compilation."""
    intensity = jax.random.uniform(key, shape, jnp.float32) * profile[None, :]
    intensity = model_lib.symmetrize(intensity, shared.tables)
    total = rotation_tables(intensity, shared, n_shells).total
    expected = jnp.exp(shared.log_prior) @ jnp.where(jnp.isfinite(shared.log_prior), total, 0.0)
    return intensity * (target / jnp.maximum(expected, 1e-30))


def initial_state(problem: Problem, config: EMCConfig, seed: int) -> EMCState:
    """:func:`init_state` with ``jax.random.key(seed)``, replicated over the problem's mesh."""
    state = init_state(problem, config, jax.random.key(seed))  # the model: one cached jitted function
    return jax.tree.map(lambda x: parallel.replicate(problem.mesh, np.asarray(jnp.asarray(x))), state)


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _expand(tree):
    return jax.tree.map(lambda x: x[None], tree)


@functools.lru_cache(maxsize=None)
def step_function(mesh: Mesh, spec: StepSpec):
    """``update(state, batch) -> (state, diagnostics)`` of one whole iteration, jitted and lifted over
    ``mesh`` (``spec.axis`` is set to the mesh axis). Pure: ``jax.vmap`` over states (seeds, hyperparameters,
    likelihood parameters) works."""
    update = make_update(dataclasses.replace(spec, axis=parallel.AXIS))

    def local(state, batch):
        return update(state, batch._replace(blocks=_squeeze(batch.blocks)))

    diag_specs = Diagnostics(first=P(), last=P(), n_live=P(), kept=P(parallel.AXIS))
    in_specs = (P(), Batch(shared=P(), blocks=P(parallel.AXIS)))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), diag_specs), check_vma=False))


def make_step(problem: Problem, config: EMCConfig):
    """``(init, update)`` of the problem's pure step, in the shape of an optax transformation:

    ``state = init(key)`` (pure in the key) and ``state, diagnostics = update(state, problem.batch)`` (one
    whole iteration, jitted over the problem's mesh; ``jax.vmap`` and ``jax.grad`` go through it). Kept
    pairs are sized by ``problem.kept_budget`` at this call: ``diagnostics.n_live`` larger than it means
    pairs were dropped (raise ``problem.kept_budget`` and call again; :func:`iterate` does this itself).

    Raises:
      ConfigError: the problem streams its blocks or has per-block candidate rotations (host-driven).
    """
    if problem.batch is None:
        raise ConfigError(
            "make_step needs every block in memory and one rotation set: set stream=False and use data "
            "without candidate lists (emcjax.iterate runs the other cases block by block)"
        )
    shared = problem.shared
    return (lambda key: init_state(problem, config, key, shared)), step_function(problem.mesh, problem.spec(config))


@functools.lru_cache(maxsize=None)
def _block_kernel(mesh: Mesh, spec: StepSpec):
    def local(tables, phi, state, shared, block):
        kept, n_live, stats = estep_block(tables, phi, state, shared, _squeeze(block), spec)
        return _expand(kept), n_live[None], _expand(stats)

    specs = (P(), P(), P(), P(), P(parallel.AXIS))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(parallel.AXIS), check_vma=False))


@functools.lru_cache(maxsize=None)
def mstep_kernel(mesh: Mesh, spec: StepSpec, which: str):
    """The jitted, sharded M-step of ``which`` ("intensity" or "phi") from the kept pairs: a function of
    (intensity, phi, likelihood, kept, shared) giving the new model or phi (cached per mesh and spec)."""
    spec = dataclasses.replace(spec, axis=parallel.AXIS)

    def local(intensity, phi, likelihood, kept, shared):
        rule = intensity_mstep if which == "intensity" else phi_mstep
        return rule(intensity, phi, likelihood, _squeeze(kept), shared, spec)

    specs = (P(), P(), P(), P(parallel.AXIS), P())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))


@functools.lru_cache(maxsize=None)
def _background_kernel(mesh: Mesh, spec: StepSpec):
    spec = dataclasses.replace(spec, axis=parallel.AXIS)

    def local(intensity, phi, likelihood, kept, shared, totals):
        return background_mstep(intensity, phi, likelihood, _squeeze(kept), shared, totals, spec)

    specs = (P(), P(), P(), P(parallel.AXIS), P(), P())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))


def _blocks_with_data(problem: Problem):
    """Yields (block, data); while streaming, the next block is built while the caller uses this one."""
    if not problem.stream:
        for block in problem.blocks:
            yield block, problem.block_data(block)
        return
    yield from heap.prefetched(lambda block: build_block(problem.plan, block, lengths=problem.lengths)[0],
                               problem.blocks)


class _Overflow(Exception):
    """A block kept more join pairs than the budget: rerun with ``needed``."""

    def __init__(self, needed: int):
        self.needed = needed


def _host_estep(problem: Problem, intensity, phi, state: EMCState, spec: StepSpec):
    """E-step block by block from the host: (kept, rotation set of the kept pairs, FrameStats)."""
    kernel = _block_kernel(problem.mesh, spec)
    stats = np.zeros((4, problem.n_padded))
    kept_parts, per_block_sets, current, tables = [], [], None, None
    for block, data in _blocks_with_data(problem):
        shared = data.rotation_set.shared(problem.geometry)
        if data.rotation_set is not current:
            current, tables = data.rotation_set, rotation_tables(intensity, shared, problem.n_shells)
        kept, n_live, block_stats = kernel(tables, phi, state, shared, data.arrays)
        needed = int(np.max(np.asarray(n_live)))
        problem.kept_needed = max(problem.kept_needed, needed)
        if spec.kept_budget is not None and needed > spec.kept_budget:
            raise _Overflow(needed)
        for row, values in enumerate(block_stats):
            pieces = parallel.local_pieces(values)
            if row == 2:  # best rotation: sampling index
                pieces = [data.rotation_set.rotations[v] for v in pieces]
            for i, v in zip(parallel.local_positions(problem.mesh), pieces):
                first = block.start + i * block.n_local
                stats[row, first : first + v.shape[0]] = v
        kept_parts.append(kept)
        per_block_sets.append(data.rotation_set)
    stats = parallel.gather_frames(problem.mesh, [stats.T], [0], problem.n_padded).T
    if problem.rotation_set is not None:
        kept = _concatenate_kept(*kept_parts)
        return kept, problem.rotation_set, stats
    return (*_reindex_kept(problem, kept_parts, per_block_sets), stats)


@jax.jit
def _concatenate_kept(*kept_parts: Kept) -> Kept:
    """The kept pairs of every block joined on the block-entry axis (axis 1, after the device axis)."""
    return jax.tree.map(lambda *x: jnp.concatenate(x, axis=1), *kept_parts)


def _reindex_kept(problem: Problem, kept_parts: list[Kept], sets: list) -> tuple[Kept, object]:
    """Candidate lists: kept pairs of every block re-indexed into the union of the kept rotations (host)."""
    mesh = problem.mesh
    host = [[jax.tree.map(lambda x: np.asarray(parallel.local_pieces(x)[i]), k) for k in kept_parts]
            for i in range(len(parallel.local_positions(mesh)))]
    live = [[(k, s) for k, s in zip(parts, sets)] for parts in host]
    rotations = [s.rotations[k.pair_rotation[k.pair_prob > 0]] for parts in live for k, s in parts]
    union = parallel.global_union(np.unique(np.concatenate(rotations)))
    plan = problem.plan
    union_set = rotation_set(mesh, plan.grid, plan.detector, plan.sampling, plan.log_w, union, pad=True)
    n_pix = problem.detector.n_pix
    key = union_set.index.rotation * n_pix + union_set.index.pixel
    per_device = []
    for parts in live:
        fixed = []
        for k, s in parts:
            real = k.prob > 0
            rot = np.searchsorted(union, s.rotations[s.index.rotation[k.entry[real]]])
            entry = np.searchsorted(key, rot * n_pix + s.index.pixel[k.entry[real]])
            pairs = k.pair_prob > 0
            fixed.append(Kept(
                entry.astype(np.int32), *(getattr(k, f)[real] for f in Kept._fields[1:7]),
                k.pair_frame[pairs], np.searchsorted(union, s.rotations[k.pair_rotation[pairs]]).astype(np.int32),
                k.pair_prob[pairs], k.pair_masked[pairs], k.pair_background[pairs],
            ))
        per_device.append(Kept(*(np.concatenate(f) for f in zip(*fixed))))
    n_terms = parallel.global_max(bucket_length(max(max(k.entry.shape[0] for k in per_device), 1)))
    n_pairs = parallel.global_max(bucket_length(max(max(k.pair_frame.shape[0] for k in per_device), 1)))
    columns = []
    for field in Kept._fields:
        length = n_pairs if field.startswith("pair_") else n_terms
        fill = {"background": 1.0, "polarization": 1.0, "pair_masked": problem.n_shells}.get(field, 0)
        pieces = [getattr(k, field) for k in per_device]
        columns.append(parallel.stack(mesh, [
            np.pad(v, [(0, length - v.shape[0])] + [(0, 0)] * (v.ndim - 1), constant_values=fill) for v in pieces
        ]))
    return Kept(*columns), union_set


def _host_iteration(problem: Problem, state: EMCState, spec: StepSpec):
    """One iteration block by block (streaming or per-block rotation sets): (state, Diagnostics)."""
    n_pad = problem.n_padded - problem.n_frames
    phi = jnp.pad(state.phi, (0, n_pad))
    kept, kept_set, first = _host_estep(problem, state.intensity, phi, state, spec)
    shared = kept_set.shared(problem.geometry)
    intensity = mstep_kernel(problem.mesh, spec, "intensity")(state.intensity, phi, state.likelihood, kept, shared)
    last = first
    if spec.update_phi:
        kept, kept_set, last = _host_estep(problem, intensity, phi, state, spec)
        shared = kept_set.shared(problem.geometry)
        intensity, phi = mstep_kernel(problem.mesh, spec, "phi")(intensity, phi, state.likelihood, kept, shared)
    likelihood = state.likelihood
    if spec.refine_background:
        totals = tuple(parallel.replicate(problem.mesh, np.pad(x, (0, n_pad)).astype(np.float32))
                       for x in (problem.photons, problem.expected_background))
        likelihood = _background_kernel(problem.mesh, spec)(intensity, phi, likelihood, kept, shared, totals)
    new = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi[: problem.n_frames],
                         likelihood=likelihood)
    pairs = KeptRotations(*(parallel.host_array(x).ravel() for x in (kept.pair_frame, kept.pair_rotation, kept.pair_prob)))
    pairs = pairs._replace(rotation=kept_set.rotations[np.minimum(pairs.rotation, kept_set.rotations.shape[0] - 1)])
    stats = lambda s: FrameStats(*s)  # noqa: E731
    return new, Diagnostics(first=stats(first), last=stats(last), n_live=0, kept=pairs)


def _fused_iteration(problem: Problem, state: EMCState, spec: StepSpec):
    state, diag = step_function(problem.mesh, spec)(state, problem.batch)
    needed = int(diag.n_live)
    problem.kept_needed = max(problem.kept_needed, needed)
    if spec.kept_budget is not None and needed > spec.kept_budget:
        raise _Overflow(needed)
    rotations = problem.rotation_set.rotations
    kept = KeptRotations(*(parallel.host_array(x) for x in diag.kept))
    kept = kept._replace(rotation=rotations[kept.rotation])
    last = diag.last._replace(best_rotation=rotations[np.asarray(diag.last.best_rotation)])
    return state, diag._replace(last=last, kept=kept)


class EStep(NamedTuple):
    """An E-step over every block (for inspection, tests and per-phase benchmarks).

    Attributes:
      kept: the kept pairs (stacked over devices), indexing ``rotation_set``.
      rotation_set: the rotations of the kept pairs (the problem's, or the union of the kept ones).
      stats: (4, n_padded) float64 per-frame weighted log-likelihood, max probability, best rotation
        (sampling index), rotations kept.
    """

    kept: Kept
    rotation_set: object
    stats: np.ndarray


KEPT_BUDGET_KEPT = 1 << 16
"""A kept-pair budget is not shrunk while it is at most this many pairs over all blocks (a few MB): a smaller
one would only cost another compilation of the step (the result does not depend on the budget)."""


def _with_budget(problem: Problem, config: EMCConfig, run):
    """``run(spec)`` with a kept-pair budget that fits: an overflowing run is repeated with a larger bucket
    (the step is pure), and a budget over 4x what was needed shrinks for the next call (unless it is small:
    ``KEPT_BUDGET_KEPT``)."""
    problem.kept_needed = 0
    while True:
        try:
            result = run(problem.spec(config))
            break
        except _Overflow as overflow:
            problem.kept_budget = bucket_length(int(overflow.needed * 1.25) + 1)
    small = problem.kept_budget * max(len(problem.blocks), 1) <= KEPT_BUDGET_KEPT
    if 4 * problem.kept_needed < problem.kept_budget and not small:
        problem.kept_budget = bucket_length(max(int(problem.kept_needed * 1.25) + 1, 1024))
    return result


def estep(problem: Problem, state: EMCState, config: EMCConfig) -> EStep:
    """One E-step over every block from the host (the iteration itself fuses it with the M-steps)."""
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    return EStep(*_with_budget(problem, config, lambda spec: _host_estep(problem, state.intensity, phi, state, spec)))


def update_intensity(problem: Problem, state: EMCState, result: EStep, config: EMCConfig) -> jax.Array:
    """Intensity M-step with the configured rule on the kept pairs of an E-step."""
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    kernel = mstep_kernel(problem.mesh, problem.spec(config), "intensity")
    return kernel(state.intensity, phi, state.likelihood, result.kept, result.rotation_set.shared(problem.geometry))


def update_phi(problem: Problem, state: EMCState, result: EStep, config: EMCConfig) -> tuple[jax.Array, jax.Array]:
    """phi M-step and the mean-1 normalisation (inverse factor on the model): (intensity, phi)."""
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    kernel = mstep_kernel(problem.mesh, problem.spec(config), "phi")
    intensity, phi = kernel(state.intensity, phi, state.likelihood, result.kept, result.rotation_set.shared(problem.geometry))
    return intensity, phi[: problem.n_frames]


def iterate(problem: Problem, state: EMCState, config: EMCConfig) -> tuple[EMCState, dict, dict]:
    """One EMC iteration: E-step + intensity update, then (if ``update_phi``) E-step + phi update.

    Returns:
      ``(state, metrics, per_frame)``: the new state; python floats ``log_likelihood`` (of the first E-step,
      nats, weighted by the frame weights), ``model_change`` (relative L2), ``phi_mean``, ``phi_std``,
      ``phi_zero_fraction``, ``certainty`` (mean most-likely probability), ``kept_mean`` (rotations kept per
      frame), ``inverse_temperature`` (beta of this iteration's E-steps, ``config.inverse_temperature_at``),
      ``background_scale_mean`` (likelihoods with a per-frame background scale), ``background_shell_min`` /
      ``_max`` (refine_background_shells), ``cc_true`` (when the data have truth), ``seconds``; and per-frame
      numpy arrays
      ``best_rotation`` (index into the sampling) and ``best_probability``, plus the kept (frame, rotation)
      pairs of the last E-step: ``kept_frame``, ``kept_rotation`` (sampling index), ``kept_prob``.
    """
    start = time.perf_counter()
    beta = config.inverse_temperature_at(int(state.iteration))
    if beta != float(state.hyper.inverse_temperature):  # the annealing schedule: a traced value, no recompilation
        state = state._replace(hyper=state.hyper._replace(
            inverse_temperature=parallel.replicate(problem.mesh, np.float32(beta))))
    run = _fused_iteration if problem.batch is not None else _host_iteration
    if config.refine_background_shells and (run is _host_iteration or getattr(problem, "iteration", None) is not None):
        raise ConfigError("refine_background_shells needs every block in memory and one rotation set (data "
                          "without candidate lists, stream=False)")
    from emcjax import streaming  # a full search streamed at O(block) memory

    if getattr(problem, "stream", False) and streaming.applies(problem, problem.spec(config), state.likelihood):
        run = lambda p, s, spec: streaming.iteration(p, s, spec, _Overflow)  # noqa: E731
    if getattr(problem, "iteration", None) is not None:  # a problem that runs its own iteration (emcjax.direct)
        run = lambda p, s, spec: p.iteration(s, spec)  # noqa: E731
    new, diag = _with_budget(problem, config, lambda spec: run(problem, state, spec))
    n = problem.n_frames
    used = problem.frame_weights > 0
    first_logl = np.asarray(diag.first.log_likelihood, np.float64)[:n]
    max_prob = np.asarray(diag.last.max_prob, np.float64)[:n]
    old = np.asarray(state.intensity, np.float64)
    new_i = np.asarray(new.intensity, np.float64)
    phi_np = np.asarray(new.phi, np.float64)[used]
    metrics = {
        "log_likelihood": float(first_logl.sum()),
        "model_change": float(np.linalg.norm(new_i - old) / max(np.linalg.norm(old), 1e-30)),
        "phi_mean": float(phi_np.mean()),
        "phi_std": float(phi_np.std()),
        "phi_zero_fraction": float(np.mean(phi_np <= 1e-10)),
        "certainty": float(np.mean(max_prob[used])),
        "kept_mean": float(np.mean(np.asarray(diag.last.n_kept)[:n][used])),
        "inverse_temperature": beta,
    }
    scale = getattr(new.likelihood, "scale", None)
    if scale is not None:  # poisson-bgscale: the per-frame background scales (refined or not)
        metrics["background_scale_mean"] = float(np.mean(np.broadcast_to(np.asarray(scale, np.float64), (n,))[used]))
    if new.background_shell is not None:  # refine_background_shells: the range of the per-shell factors
        shells = np.asarray(new.background_shell, np.float64)
        metrics["background_shell_min"], metrics["background_shell_max"] = float(shells.min()), float(shells.max())
    cc = problem.cc_true(new.intensity)
    if cc is not None:
        metrics["cc_true"] = cc
    metrics["seconds"] = time.perf_counter() - start
    live = np.asarray(diag.kept.prob) > 0
    per_frame = {
        "best_rotation": np.asarray(diag.last.best_rotation)[:n].astype(np.int64),
        "best_probability": max_prob.astype(np.float32),
        "kept_frame": np.asarray(diag.kept.frame)[live].astype(np.int64),
        "kept_rotation": np.asarray(diag.kept.rotation)[live].astype(np.int64),
        "kept_prob": np.asarray(diag.kept.prob)[live].astype(np.float32),
    }
    return new, metrics, per_frame
