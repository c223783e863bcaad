"""Research options of the model: deterministic annealing, background refinement, gradient vs closed-form M-steps.

One small simulated problem (64x64 detector to 8 Å, rotation_n = 2, 60 frames) whose true background is 1.6
times the one written to the file (``--likelihood poisson-bgscale --background-scale 1.6``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc
from emcjax.core import estep as estep_lib
from emcjax.core import gradient, mstep
from emcjax.core.step import frame_constants, frame_totals
from emcjax.core.step import background_mstep
from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError
from emcjax.likelihood import PoissonBackgroundScale
from emcjax.simulate import SimulationConfig, simulate, write_frames

GEOMETRY = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)
TRUE_SCALE = 1.6
SIM = SimulationConfig(n_frames=60, geometry=GEOMETRY, rotation_n=2, bragg_photons=120.0, background_photons=60.0,
                       likelihood="poisson-bgscale", background_scale=TRUE_SCALE, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    frames, truth = simulate(SIM)
    path = tmp_path_factory.mktemp("research") / "bgscale.h5"
    write_frames(path, frames, truth, SIM)
    with data_io.SparseDataset(path) as ds:
        yield ds


# --- deterministic annealing ------------------------------------------------------------------------------------


def test_annealing_schedule_is_a_geometric_ramp():
    config = emc.EMCConfig(anneal_from=0.01, anneal_iterations=4, inverse_temperature=1.0)
    betas = [config.inverse_temperature_at(i) for i in range(6)]
    np.testing.assert_allclose(betas, [0.01, 0.01 ** 0.75, 0.1, 0.01 ** 0.25, 1.0, 1.0], rtol=1e-12)
    assert emc.EMCConfig(inverse_temperature=0.5).inverse_temperature_at(3) == 0.5  # no ramp: constant beta
    for bad in (dict(anneal_from=0.0), dict(anneal_from=1.5), dict(anneal_iterations=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            emc.EMCConfig(**bad)


def test_annealed_iterations_use_the_schedule_without_recompiling(dataset):
    # soft responsibilities: no kept-pair budget, so the step's static description never changes
    config = emc.EMCConfig(rotation_n=2, anneal_from=0.02, anneal_iterations=3, responsibilities="soft")
    problem = emc.setup_problem(dataset, config)
    state = emc.initial_state(problem, config, seed=0)
    plain = emc.iterate(problem, state, dataclasses.replace(config, anneal_iterations=0))[1]
    kernel = emc.step_function(problem.mesh, problem.spec(config))
    specs = emc.step_function.cache_info().currsize
    seen = []
    for _ in range(4):
        state, metrics, _ = emc.iterate(problem, state, config)
        seen.append(metrics)
    assert [m["inverse_temperature"] for m in seen] == pytest.approx([0.02, 0.02 ** (2 / 3), 0.02 ** (1 / 3), 1.0])
    assert float(state.hyper.inverse_temperature) == 1.0
    # beta is a traced value of the state: one compiled step for every beta
    assert kernel._cache_size() == 1 and emc.step_function.cache_info().currsize == specs
    # a flatter posterior at beta = 0.02: less certain than plain EM from the same start
    assert seen[0]["certainty"] < plain["certainty"] - 0.05
    # the reported log-likelihood is the untempered one: identical to plain EM's from the same state
    assert seen[0]["log_likelihood"] == pytest.approx(plain["log_likelihood"], rel=1e-6)


def test_tempered_posterior_equals_numpy(dataset):
    config = emc.EMCConfig(rotation_n=2, responsibilities="soft")
    problem = emc.setup_problem(dataset, config)
    state = emc.initial_state(problem, config, seed=1)
    beta = 0.3
    state = state._replace(hyper=state.hyper._replace(inverse_temperature=jnp.float32(beta)))
    stats = emc.estep(problem, state, config).stats
    local, shared = jax.tree.map(jnp.asarray, problem.local_block()), problem.shared
    tables = estep_lib.rotation_tables(state.intensity, shared, problem.n_shells)
    logl = np.asarray(estep_lib.block_log_likelihood(tables, state.phi, state.likelihood, shared, local), np.float64)
    log_prior = np.asarray(shared.log_prior, np.float64)[np.asarray(local.candidates)]
    mask = np.asarray(local.candidate_mask)
    tempered = np.where(mask, beta * logl + log_prior, -np.inf)
    post = np.exp(tempered - tempered.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    n = problem.n_frames
    np.testing.assert_allclose(stats[1][:n], post.max(axis=1)[:n], rtol=2e-4)


# --- background refinement ----------------------------------------------------------------------------------


def test_background_refinement_recovers_the_true_scale(dataset):
    results = {}
    for refine in (False, True):
        config = emc.EMCConfig(rotation_n=2, likelihood="poisson-bgscale", refine_background=refine)
        problem = emc.setup_problem(dataset, config)
        state = emc.initial_state(problem, config, seed=0)
        for _ in range(3):
            state, metrics, _ = emc.iterate(problem, state, config)
        results[refine] = (np.asarray(state.likelihood.scale, np.float64), metrics)
    fixed, refined = results[False][0], results[True][0]
    np.testing.assert_array_equal(fixed, 1.0)
    # ~90 background photons per frame: each frame's scale to ~10 %, the median to a few %
    assert np.median(refined) == pytest.approx(TRUE_SCALE, rel=0.05)
    assert np.std(refined) < 0.25 * TRUE_SCALE
    assert results[True][1]["background_scale_mean"] == pytest.approx(refined.mean(), rel=1e-6)
    assert results[True][1]["log_likelihood"] > results[False][1]["log_likelihood"]
    with pytest.raises(ConfigError, match="refine_background"):
        emc.EMCConfig(likelihood="poisson", refine_background=True)


def test_background_refinement_block_by_block_equals_the_fused_step(dataset):
    """Streaming (host-driven iteration, totals from the problem's per-frame counts) gives the fused step's scales."""
    scales = []
    for stream in (False, True):
        config = emc.EMCConfig(rotation_n=2, likelihood="poisson-bgscale", refine_background=True, stream=stream,
                               block_frames=30 if stream else 0)
        problem = emc.setup_problem(dataset, config)
        state = emc.iterate(problem, emc.initial_state(problem, config, seed=0), config)[0]
        scales.append(np.asarray(state.likelihood.scale, np.float64))
    np.testing.assert_allclose(scales[1], scales[0], rtol=1e-3)
    assert np.median(scales[0]) > 1.3  # moved towards the true 1.6 from 1.0


def test_background_update_maximises_the_expected_log_likelihood(dataset):
    """At the updated scales, d/dc of sum_r P_dr log p(K_d | r, c) (E-step terms + frame constants) is ~0."""
    config = emc.EMCConfig(rotation_n=2, likelihood="poisson-bgscale", responsibilities="soft")
    problem = emc.setup_problem(dataset, config)
    state = emc.initial_state(problem, config, seed=0)
    state = emc.iterate(problem, state, config)[0]
    result = emc.estep(problem, state, config)
    kept = jax.tree.map(lambda x: x[0], result.kept)
    local, shared = jax.tree.map(jnp.asarray, problem.local_block()), problem.shared
    batch = problem.batch._replace(blocks=jax.tree.map(lambda x: x[0], problem.batch.blocks))
    spec = problem.spec(config)
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    new = background_mstep(state.intensity, phi, state.likelihood, kept, shared, frame_totals(batch, spec), spec)
    tables = estep_lib.rotation_tables(state.intensity, shared, problem.n_shells)
    logl = estep_lib.block_log_likelihood(tables, state.phi, state.likelihood, shared, local)
    resp = estep_lib.responsibilities(logl, shared, local, state.hyper, problem.n_slots)
    prob = jnp.zeros(logl.shape).at[jnp.arange(logl.shape[0])[:, None], resp.slot].set(resp.prob)

    def expected(scale):
        lik = PoissonBackgroundScale(scale)
        per_slot = estep_lib.block_log_likelihood(tables, state.phi, lik, shared, local)
        return jnp.sum(prob * per_slot) + jnp.sum(frame_constants(lik, shared, local))

    n = problem.n_frames
    gradient = jax.jit(jax.grad(expected))  # one compilation for both points
    at_update = np.asarray(gradient(new.scale))[:n]
    at_one = np.asarray(gradient(jnp.ones(n, jnp.float32)))[:n]
    assert np.median(np.asarray(new.scale)) == pytest.approx(TRUE_SCALE, rel=0.1)
    assert np.max(np.abs(at_update)) < 1e-3 * np.max(np.abs(at_one))


# --- gradient vs closed-form M-steps --------------------------------------------------------------------------


def test_gradient_and_closed_form_msteps_agree_at_the_fixed_point(dataset):
    """Same kept pairs: the phi M-steps (Newton vs Adam) agree; from the closed-form intensity fixed point (MLEM
    iterated to convergence) the gradient M-step stays put, in the expected counts and the objective."""
    config = emc.EMCConfig(rotation_n=2, intensity_update="mlem")
    problem = emc.setup_problem(dataset, config)
    state = emc.initial_state(problem, config, seed=0)
    for _ in range(2):
        state = emc.iterate(problem, state, config)[0]
    result = emc.estep(problem, state, config)
    kept = jax.tree.map(lambda x: x[0], result.kept)
    shared = result.rotation_set.shared(problem.geometry)
    spec = problem.spec(config)
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    lik, n_shells, max_entries = state.likelihood, problem.n_shells, spec.max_entries

    closed_phi, _ = mstep.phi_update(state.intensity, phi, lik, kept, shared, n_shells)
    grad_phi = gradient.gradient_update(state.intensity, phi, lik, kept, shared, n_shells, steps=400,
                                        learning_rate=0.02, max_entries=max_entries, wrt="phi")
    n = problem.n_frames
    a, b = np.asarray(closed_phi, np.float64)[:n], np.asarray(grad_phi, np.float64)[:n]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3

    fixed = jax.jit(lambda i: mstep.mlem_update(i, phi, lik, kept, shared, n_shells, 3000))(state.intensity)
    moved = gradient.gradient_update(fixed, phi, lik, kept, shared, n_shells, steps=300, learning_rate=3e-4,
                                     max_entries=max_entries)
    live = np.asarray(kept.prob) > 0
    entry = np.asarray(kept.entry)[live]

    def counts(intensity):  # expected Bragg counts (per unit pol and phi) at the kept photons
        return np.asarray(jnp.take(estep_lib.rotation_tables(intensity, shared, n_shells).tomogram, entry), np.float64)

    assert np.linalg.norm(counts(moved) - counts(fixed)) / np.linalg.norm(counts(fixed)) < 1e-3
    q = [float(gradient.expected_log_likelihood(i, phi, lik, kept, shared, n_shells, max_entries)) for i in (fixed, moved)]
    assert abs(q[1] - q[0]) < 1e-3 * abs(q[0])
    # a start away from the fixed point does move: the test can tell a wrong objective apart
    away = gradient.gradient_update(fixed * 1.3, phi, lik, kept, shared, n_shells, steps=300, learning_rate=3e-4,
                                    max_entries=max_entries)
    assert np.linalg.norm(counts(away) - counts(fixed * 1.3)) / np.linalg.norm(counts(fixed * 1.3)) > 1e-2
