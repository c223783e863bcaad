"""Continuous orientation refinement (emcjax.core.refine, emcjax.refinement): the objective against a numpy
reference and finite differences, the expected-signal approximation against the exact in-peak sum, refined
rotations of simulated frames moving to the truth, and the lowres switch end to end."""

from __future__ import annotations

import contextlib
import io
import math

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import emc, lowres, refinement, runio, scoring
from emcjax import model as model_lib
from emcjax.core import refine as refine_core
from emcjax.data import SparseDataset
from emcjax.detector import DetectorGeometry
from emcjax.rotations import quaternion_multiply, quaternion_to_matrix
from emcjax.simulate import SimulationConfig, write

GEOMETRY = DetectorGeometry(
    num_rows=96, num_cols=96, pixel_size_m=1.8e-3, beam_center_px=(47.5, 47.5), resolution_max_A=6.0, n_shells=20
)
N_FRAMES = 48


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A tiny simulation with continuous orientations and candidate lists, its problem and the true model."""
    root = tmp_path_factory.mktemp("refine")
    data = write(SimulationConfig(
        out=root / "data.h5", n_frames=N_FRAMES, geometry=GEOMETRY, orientations="uniform", candidates=4,
        candidate_n=6, bragg_photons=300.0, seed=3,
    ))
    config = emc.EMCConfig()
    with SparseDataset(data) as dataset:
        problem = emc.setup_problem(dataset, config)
    truth = problem.truth
    intensity = np.nan_to_num(scoring.values_by_hkl(problem.grid.asu.hkl, truth["hkl"], truth["intensity"]))
    state = emc.initial_state(problem, config, 0)
    state = state._replace(intensity=jnp.asarray(intensity, jnp.float32), phi=jnp.asarray(truth["phi"], jnp.float32))
    return root, data, problem, state


def _perturbed(quaternions: np.ndarray, degrees: float, seed: int) -> np.ndarray:
    axis = np.random.default_rng(seed).normal(size=(quaternions.shape[0], 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = math.radians(degrees) / 2
    turn = np.concatenate([np.full((axis.shape[0], 1), math.cos(half)), math.sin(half) * axis], axis=1)
    return quaternion_multiply(quaternions, turn)


def _frame_inputs(problem, state, frame: int, max_angle: float):
    photons = jax.tree.map(lambda x: jnp.asarray(x[frame]), refinement.frame_photons(problem.plan, 0, N_FRAMES))
    geometry = refinement.signal_geometry(problem.detector, problem.grid, max_angle)
    background = jnp.asarray(problem.plan.background[frame], jnp.float32)
    return photons, geometry, background


def test_objective_matches_numpy_and_its_gradient_finite_differences(simulated):
    _, _, problem, state = simulated
    frame = 5
    q0 = jnp.asarray(_perturbed(problem.truth["quaternion"][frame : frame + 1], 0.5, 0)[0])
    photons, geometry, background = _frame_inputs(problem, state, frame, math.radians(2.0))
    flat = model_lib.pad_model(state.intensity)
    tables = problem.grid.tables
    phi = float(state.phi[frame])
    near, _ = refine_core.near_reflections(flat, tables, q0, background, geometry, 512)
    likelihood = state.likelihood

    def objective(v):
        return refine_core.frame_objective(v, q0, flat, tables, phi, photons, near, geometry, likelihood, frame)

    # photon term against numpy: K log1p(pol phi W(R^T q) / (pol B)) over the photons
    v = np.array([1e-3, -2e-3, 1.5e-3])
    rotation = np.asarray(quaternion_to_matrix(refine_core.rotated(q0, jnp.asarray(v, jnp.float32))), np.float64)
    q_crystal = np.asarray(photons.q_lab, np.float64) @ rotation
    w = np.asarray(model_lib.slice_points(state.intensity, jnp.asarray(q_crystal, jnp.float32), tables), np.float64)
    count, pol, bg = (np.asarray(x, np.float64) for x in (photons.count, photons.polarization, photons.background))
    expected = np.sum(np.where(count > 0, count * np.log1p(pol * phi * w / bg), 0.0))
    got = refine_core.photon_term(flat, tables, jnp.asarray(rotation, jnp.float32), phi, photons, likelihood, frame)
    assert expected > 10 and float(got) == pytest.approx(expected, rel=1e-4)

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        v64 = jnp.asarray(v, jnp.float64)
        grad = np.asarray(jax.jit(jax.grad(objective))(v64))
        h = 1e-6
        f = jax.jit(objective)  # one compilation for the six finite-difference points
        numeric = np.array([(f(v64 + h * e) - f(v64 - h * e)) / (2 * h) for e in np.eye(3)])
    finally:
        jax.config.update("jax_enable_x64", before)
    assert np.abs(grad).max() > 100  # nats per rad: the objective does depend on the rotation
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=1e-3 * np.abs(numeric).max())


def test_expected_signal_approximation_follows_the_exact_in_peak_sum(simulated):
    _, _, problem, state = simulated
    quaternions = problem.truth["quaternion"][:16]
    geometry = refinement.signal_geometry(problem.detector, problem.grid, math.radians(2.0))
    flat = model_lib.pad_model(state.intensity)
    background = jnp.asarray(problem.plan.background[:16], jnp.float32)
    entries = model_lib.build_entries_by_reflection(problem.grid, problem.detector, quaternions)
    pol = jnp.asarray(problem.detector.polarization, jnp.float32)
    exact = np.asarray(model_lib.expected_signal(state.intensity, entries, pol, jnp.asarray(problem.detector.shell),
                                                 problem.n_shells)).sum(axis=1)

    def approximate(q, bg):
        near, _ = refine_core.near_reflections(flat, problem.grid.tables, q, bg, geometry, 512)
        return refine_core.expected_signal(quaternion_to_matrix(q), near, geometry)

    approx = np.asarray(jax.vmap(approximate)(jnp.asarray(quaternions, jnp.float32), background))
    # this small detector's large pixels sample each peak coarsely: a rougher match than on the default one
    assert np.corrcoef(exact, approx)[0, 1] > 0.6
    assert 0.8 < approx.sum() / exact.sum() < 1.25


def test_refined_rotations_move_to_the_truth(simulated):
    _, _, problem, state = simulated
    truth = problem.truth["quaternion"]
    start = _perturbed(truth, 1.2, 1)[:, None, :]
    geometry = refinement.signal_geometry(problem.detector, problem.grid, math.radians(2.0))
    settings = refine_core.RefineSettings(steps=30, learning_rate=math.radians(0.2), max_angle=math.radians(2.0),
                                          max_reflections=refinement.reflection_budget(geometry))
    photons = [refinement.frame_photons(problem.plan, 0, N_FRAMES)]
    refined, gain = refinement.refine(problem, state, start, settings, geometry, photons)
    ops = problem.grid.crystal.rotation_ops_cartesian
    before = np.degrees(scoring.orientation_errors(start[:, 0], truth, ops))
    after = np.degrees(scoring.orientation_errors(refined[:, 0], truth, ops))
    assert np.allclose(before, 1.2, atol=1e-3)
    assert np.median(after) < 0.3 and np.mean(after < before) > 0.9
    assert np.all(gain[:, 0] > -1e-3)  # the ascent never ends below its start (in nats)


def test_start_rotations_are_each_frames_most_probable():
    starts = refinement.start_rotations(
        kept_frame=np.array([0, 0, 0, 2]), kept_rotation=np.array([7, 9, 4, 5]),
        kept_prob=np.array([0.2, 0.7, 0.1, 1.0]), best_rotation=np.array([9, 3, 5]), n_frames=3, k=2,
    )
    np.testing.assert_array_equal(starts, [[9, 7], [3, 3], [5, 5]])


@pytest.fixture(scope="module")
def refined_run(simulated):
    """A two-iteration lowres run refining from iteration 2 (its directory and printed output)."""
    root, data, _, _ = simulated
    out = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lowres.main(["--data", str(data), "--out", str(out), "--iters", "2", "--emc.refine-orientations",
                     "--emc.refine-start", "1", "--emc.refine-top-k", "1"])
    return out, printed.getvalue()


def test_lowres_switch_runs_refined_iterations(simulated, refined_run):
    _, _, problem, _ = simulated
    out, printed = refined_run
    assert "orientation refinement: from iteration 2" in printed and "iter 2/2" in printed
    first, second = runio.read_metrics(out)
    assert "refine_gain_median" not in first and second["refine_gain_median"] > 0
    assert np.isfinite(second["orientation_error_median_deg"]) and second["cc_true"] > 0
    with h5py.File(runio.iteration_path(out, 2)) as f:
        best, quaternion = f["best_rotation"][()], f["best_quaternion"][()]
        kept = f["kept_rotation"][()]
    assert quaternion.shape == (N_FRAMES, 4) and np.allclose(np.linalg.norm(quaternion, axis=1), 1, atol=1e-5)
    # recorded rotations stay indices of the data set's candidate sampling (the nearest one to the refined)
    assert best.max() < problem.sampling.n_rot and kept.max() < problem.sampling.n_rot
    nearest = problem.sampling.quaternions[best]
    angle = np.degrees(scoring.orientation_errors(nearest, quaternion, np.eye(3)[None]))
    assert np.all(angle < np.degrees(0.944 / 6) + 1e-6)


def test_reject_takes_the_refined_orientations_as_the_first_crystal(refined_run):
    """emcjax.reject on a refined run: the first crystal's evidence is that of the saved best_quaternion, not
    of the grid rotation best_rotation, and the output and rejection.h5 say so."""
    from emcjax import reject
    from emcjax.frontend.grid_orbits import grid_orbits
    from emcjax.merge import evidence as evidence_lib
    from emcjax.merge.rundata import load_run
    from emcjax.sampling_600cell import sample_600cell

    out, _ = refined_run
    printed = []
    reject.reject(reject.RejectConfig(run=out, photon_test=False), log=printed.append)
    assert "first crystal's orientation: the run's refined continuous orientations (best_quaternion)" in printed
    with h5py.File(out / reject.REJECTION_FILE) as f:
        got, attr = f["crystal_evidence"][()], f.attrs["first_orientation"]
    assert attr == "best_quaternion"

    run = load_run(out)
    sampling = sample_600cell(run.sampling_n)
    n_orientations = grid_orbits(sampling, run.crystal.rotation_ops_cartesian).representative.shape[0]
    phi = np.asarray(run.iteration["phi"], np.float64)
    psi = reject.RejectConfig(run=out).criteria.evidence_scale * float(np.median(phi))
    scan = evidence_lib.ScanTables(run.grid, run.detector, run.result.intensity, sampling.quaternions[:1])
    with SparseDataset(run.data_path) as dataset:
        frames = dataset.read_block(0, run.n_frames)

    def crystal(quaternions):
        return evidence_lib.crystal_evidence(run.grid, run.detector, frames, run.result.intensity, quaternions, phi,
                                             scan, run.crystal.rotation_ops_cartesian, 0.0, psi, n_orientations)[0]

    refined = crystal(run.iteration["best_quaternion"])
    on_grid = crystal(sampling.quaternions[run.iteration["best_rotation"]])
    np.testing.assert_allclose(got, refined, rtol=1e-5, atol=1e-3)
    assert np.max(np.abs(refined - on_grid)) > 1.0  # nats: the refined orientation is not the grid rotation's


def test_experiment_quick_size(tmp_path):
    """experiments/orientation_refinement.py --quick: its table and figure, and refinement beating the grid."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "orientation_refinement.py"
    spec = importlib.util.spec_from_file_location("orientation_refinement", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    results = experiment.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "orientation_refinement.png").stat().st_size > 0
    rows = (tmp_path / "table.md").read_text().splitlines()[2:]
    assert len(rows) == 2 * len(experiment.QUICK["grids"]) * experiment.QUICK["iters"]
    for n, runs in results.items():
        grid, refined = runs["grid"][-1], runs["refined"][-1]
        assert refined["orientation_error_median_deg"] < grid["orientation_error_median_deg"], n
