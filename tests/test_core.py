"""The pure core (emcjax.core): pluggable likelihoods, one jittable / vmappable / differentiable step.

One small simulated problem (64x64 detector to 8 Å, rotation_n = 2, 40 frames) is shared by the module.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc
from emcjax.core import estep as estep_lib
from emcjax.core.step import Batch, make_update, marginal_log_likelihood
from emcjax.detector import DetectorGeometry
from emcjax.likelihood import (
    LIKELIHOODS, Likelihood, NegativeBinomial, Poisson, PoissonBackgroundScale, likelihood_dataclass,
    register_likelihood,
)
from emcjax.simulate import SimulationConfig, simulate, write_frames

GEOMETRY = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)
SIM = SimulationConfig(n_frames=40, geometry=GEOMETRY, rotation_n=2, bragg_photons=200.0, background_photons=20.0, seed=4)
CONFIG = emc.EMCConfig(rotation_n=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    frames, truth = simulate(SIM)
    path = tmp_path_factory.mktemp("core") / "small.h5"
    write_frames(path, frames, truth, SIM)
    with data_io.SparseDataset(path) as ds:
        problem = emc.setup_problem(ds, CONFIG)
        yield ds, frames, problem


def _local(problem) -> Batch:
    """The problem's batch without the device axis (one device: the pure step with axis=None)."""
    return problem.batch._replace(blocks=jax.tree.map(lambda x: x[0], problem.batch.blocks))


# --- a likelihood written in the test file only (< 40 lines) -----------------------------------------------


@likelihood_dataclass
class GainPoisson(Likelihood):
    """Poisson counts of a detector whose gain is off by a factor g: K ~ Poisson(g mu)."""

    gain: jax.Array

    def log_prob(self, count, mean, frame=None):
        rate = self.gain * mean
        return count * jnp.log(rate) - rate - jax.scipy.special.gammaln(count + 1.0)

    def sample(self, key, mean, frame=None):
        return jax.random.poisson(key, self.gain * mean).astype(jnp.int32)


def test_toy_likelihood_runs_emc(small):
    ds, frames, _ = small
    register_likelihood("gain-test", lambda: GainPoisson(jnp.asarray(1.2, jnp.float32)), replace=True)
    try:
        config = emc.EMCConfig(rotation_n=2, likelihood="gain-test", gradient_steps=5)
        assert config.intensity_rule == "gradient"  # no closed form for a new likelihood
        problem = emc.setup_problem(ds, config, frames=frames)
        state = emc.initial_state(problem, config, seed=0)
        values = []
        for _ in range(3):
            state, metrics, _ = emc.iterate(problem, state, config)
            values.append(metrics["log_likelihood"])
            assert np.all(np.isfinite(np.asarray(state.intensity))) and np.all(np.asarray(state.intensity) >= 0)
        assert values[-1] > values[0]  # the gradient M-step raises the toy model's likelihood
        assert metrics["cc_true"] > 0.3
    finally:
        LIKELIHOODS.pop("gain-test")


# --- negative binomial ---------------------------------------------------------------------------------------


def test_negbin_estep_tends_to_poisson(small):
    _, _, problem = small
    state = emc.initial_state(problem, CONFIG, seed=0)
    local, shared = jax.tree.map(jnp.asarray, problem.local_block()), problem.shared
    tables = estep_lib.rotation_tables(state.intensity, shared, problem.n_shells)
    poisson = np.asarray(estep_lib.block_log_likelihood(tables, state.phi, Poisson(), shared, local), np.float64)
    negbin = np.asarray(
        estep_lib.block_log_likelihood(tables, state.phi, NegativeBinomial(jnp.float32(1e7)), shared, local), np.float64
    )
    mask = np.asarray(local.candidate_mask)
    scale = np.abs(poisson[mask]).max()
    np.testing.assert_allclose(negbin[mask], poisson[mask], rtol=1e-4, atol=1e-4 * scale)
    # and the exact zero terms of the non-linear path equal -phi S for Poisson
    exact = estep_lib.exact_zero_terms(Poisson(), tables.tomogram, state.phi, shared, local)
    fast = -np.asarray(state.phi)[:, None] * np.asarray(estep_lib.frame_signal(
        tables, jnp.arange(shared.entries.n_rot)[None, :], local.masked_shells[:, None, :]
    ))
    np.testing.assert_allclose(np.asarray(exact), fast, rtol=1e-4, atol=1e-4 * np.abs(fast).max())


def test_negbin_runs_emc(small):
    ds, frames, _ = small
    config = emc.EMCConfig(rotation_n=2, likelihood="negbin", dispersion=20.0, gradient_steps=5)
    problem = emc.setup_problem(ds, config, frames=frames)
    state = emc.initial_state(problem, config, seed=0)
    for _ in range(2):
        state, metrics, _ = emc.iterate(problem, state, config)
    assert np.isfinite(metrics["log_likelihood"]) and metrics["cc_true"] > 0.3


# --- gradients -----------------------------------------------------------------------------------------------


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _central(f, x, direction, h):
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("wrt", ["intensity", "phi", "background_scale", "dispersion"])
def test_marginal_likelihood_gradients_match_finite_differences(small, x64, wrt):
    _, _, problem = small
    batch = _local(problem)
    spec = problem.spec(CONFIG)
    state = emc.initial_state(problem, CONFIG, seed=0)
    intensity = jnp.asarray(state.intensity, jnp.float64)
    phi = jnp.asarray(state.phi, jnp.float64)
    rng = np.random.default_rng(0)
    n = problem.n_frames
    models = {
        "intensity": (intensity, lambda x: marginal_log_likelihood(x, phi, Poisson(), batch, spec)),
        "phi": (phi, lambda x: marginal_log_likelihood(intensity, x, Poisson(), batch, spec)),
        "background_scale": (
            jnp.asarray(rng.uniform(0.8, 1.2, n)),
            lambda x: marginal_log_likelihood(intensity, phi, PoissonBackgroundScale(x), batch, spec),
        ),
        "dispersion": (
            jnp.asarray(30.0), lambda x: marginal_log_likelihood(intensity, phi, NegativeBinomial(x), batch, spec)
        ),
    }
    x, f = models[wrt]
    f = jax.jit(f)  # one compilation of the objective (both finite-difference points), one of its gradient
    grad = jax.jit(jax.grad(f))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    direction = jnp.asarray(rng.normal(size=np.shape(x))) * jnp.maximum(jnp.abs(x), 1e-3 * jnp.max(jnp.abs(x)))
    analytic = float(jnp.vdot(grad, direction))
    numeric = float(_central(f, x, direction, 1e-5))
    assert analytic == pytest.approx(numeric, rel=1e-5), (analytic, numeric)


def test_gradient_through_one_whole_step_is_finite(small):
    _, _, problem = small
    batch = _local(problem)
    config = emc.EMCConfig(rotation_n=2, intensity_update="mlem")  # the new model depends on the old smoothly
    update = make_update(problem.spec(config))
    state = emc.initial_state(problem, config, seed=0)

    def loss(intensity, phi):
        new, _ = update(state._replace(intensity=intensity, phi=phi), batch)
        return jnp.sum(new.intensity**2) + jnp.sum(new.phi**2)

    g_intensity, g_phi = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.intensity, state.phi)  # one compilation
    assert np.all(np.isfinite(np.asarray(g_intensity))) and np.all(np.isfinite(np.asarray(g_phi)))
    assert np.abs(np.asarray(g_intensity)).max() > 0 and np.abs(np.asarray(g_phi)).max() > 0


# --- jit and vmap --------------------------------------------------------------------------------------------


def test_jit_does_not_recompile_for_new_data(small):
    _, _, problem = small
    batch = _local(problem)
    update = jax.jit(make_update(problem.spec(CONFIG)))
    state = emc.initial_state(problem, CONFIG, seed=0)
    first, _ = update(state, batch)
    rng = np.random.default_rng(1)
    join = batch.blocks.join
    counts = jnp.where(join.count > 0, jnp.asarray(rng.integers(1, 3, join.count.shape), jnp.float32), 0.0)
    other = batch._replace(blocks=batch.blocks._replace(join=join._replace(count=counts)))
    second, _ = update(state._replace(phi=state.phi * 1.1), other)
    assert update._cache_size() == 1
    assert not np.array_equal(np.asarray(first.intensity), np.asarray(second.intensity))


def test_vmap_over_seeds_and_pruning_thresholds(small):
    _, _, problem = small
    batch = _local(problem)
    update = jax.jit(make_update(problem.spec(CONFIG)))
    keys = jax.random.split(jax.random.key(0), 2)
    states = jax.vmap(lambda k: emc.init_state(problem, CONFIG, k))(keys)
    batched, diag = jax.vmap(update, in_axes=(0, None))(states, batch)
    for i in range(2):
        alone, alone_diag = update(jax.tree.map(lambda x: x[i], states), batch)
        np.testing.assert_allclose(np.asarray(batched.intensity[i]), np.asarray(alone.intensity), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            np.asarray(diag.first.log_likelihood[i]), np.asarray(alone_diag.first.log_likelihood), rtol=1e-5
        )
    assert not np.allclose(np.asarray(states.intensity[0]), np.asarray(states.intensity[1]))  # two starts
    assert float(diag.first.log_likelihood[0].sum()) != float(diag.first.log_likelihood[1].sum())

    state = emc.initial_state(problem, CONFIG, seed=0)
    masses = jnp.asarray([0.5, 0.999], jnp.float32)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    stacked = stacked._replace(hyper=stacked.hyper._replace(prune_mass=masses))
    batched, diag = jax.vmap(update, in_axes=(0, None))(stacked, batch)
    for i, mass in enumerate([0.5, 0.999]):
        alone, alone_diag = update(state._replace(hyper=state.hyper._replace(prune_mass=jnp.float32(mass))), batch)
        np.testing.assert_allclose(np.asarray(batched.intensity[i]), np.asarray(alone.intensity), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(diag.last.n_kept[i]), np.asarray(alone_diag.last.n_kept))


def test_frame_weights_remove_frames(small):
    """A frame of weight 0 changes nothing: the run equals the run without that frame."""
    ds, frames, _ = small
    weights = np.ones(frames.n_frames, np.float32)
    weights[::2] = 0
    config = emc.EMCConfig(rotation_n=2, update_phi=False)
    weighted = emc.setup_problem(ds, config, frames=frames, frame_weights=weights)
    kept = frames.frame_slice(0, frames.n_frames)
    subset = data_io.SparseFrames.concatenate([kept.frame_slice(i, i + 1) for i in range(1, frames.n_frames, 2)])
    alone = emc.setup_problem(ds, config, frames=subset)
    state = emc.initial_state(weighted, config, seed=0)
    a, ma, _ = emc.iterate(weighted, state, config)
    sub_state = state._replace(phi=state.phi[1::2])
    sub_state = sub_state._replace(likelihood=config.likelihood_model(alone.n_frames))
    b, mb, _ = emc.iterate(alone, sub_state, config)
    np.testing.assert_allclose(np.asarray(a.intensity), np.asarray(b.intensity), rtol=1e-4, atol=1e-6)
    assert ma["log_likelihood"] == pytest.approx(mb["log_likelihood"], rel=1e-5)


def test_research_doc_emc_code_runs():
    """The python blocks of docs/RESEARCH.md's EMC sections run as shown, in order, in one namespace."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "RESEARCH.md").read_text()
    section = text.split("## Running EMC with a likelihood", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/RESEARCH.md", "exec"), namespace)
    kept = np.asarray(namespace["diagnostics"].last.n_kept).mean(axis=1)
    assert kept[0] <= kept[1]
    assert np.isfinite(float(namespace["g_r"])) and np.all(np.isfinite(np.asarray(namespace["g_model"])))


def test_research_doc_cli_commands_run(tmp_path, monkeypatch):
    """The bash block of docs/RESEARCH.md's EMC section (simulate, then lowres with negbin) runs as written."""
    import pathlib
    import re
    import shlex

    from emcjax import lowres, simulate

    text = (pathlib.Path(__file__).parents[1] / "docs" / "RESEARCH.md").read_text()
    section = text.split("## Running EMC with a likelihood", 1)[1]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[:1]
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:3] for c in commands] == [["python", "-m", "emcjax.simulate"], ["python", "-m", "emcjax.lowres"]]
    monkeypatch.chdir(tmp_path)
    simulate.main(commands[0][3:])
    lowres.main(commands[1][3:])  # exits non-zero (SystemExit) on any error
    records = [line for line in (tmp_path / "runs" / "nb" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == 2
