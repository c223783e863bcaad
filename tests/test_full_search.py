"""Full search by photon-peak tests (emcjax.core.full_search): every frame against one shared rotation chunk
must give the candidate path's log-likelihoods (emcjax.core.direct, itself tested against the table path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import direct, emc
from emcjax import model as model_lib
from emcjax.core import direct as kernels
from emcjax.core import full_search
from emcjax.detector import DetectorGeometry
from emcjax.rotations import crystal_from_lab
from emcjax.simulate import SimulationConfig

from candidate_lists import write_listed_simulation

GEOMETRY = DetectorGeometry(
    num_rows=80, num_cols=80, pixel_size_m=2.0e-3, beam_center_px=(39.5, 39.5), resolution_max_A=6.0, n_shells=12
)
SIM = SimulationConfig(n_frames=12, geometry=GEOMETRY, rotation_n=3, bragg_photons=200.0, seed=5)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    path = tmp_path_factory.mktemp("full_search") / "lists.h5"
    write_listed_simulation(path, SIM, 12, seed=1)
    with data_io.SparseDataset(path) as dataset:
        return direct.setup_direct(dataset, emc.EMCConfig(block_frames=12), signal="exact")


def test_peak_value_equals_locate(problem):
    grid = problem.grid
    rng = np.random.default_rng(2)
    centres = grid.hkl[rng.integers(0, grid.n_refl, 4000)] @ grid.crystal.reciprocal_basis.T
    points = centres + rng.normal(size=centres.shape) * grid.radius * 0.7  # about half inside the peak sphere
    points = jnp.asarray(points, jnp.float32)
    intensity = jnp.asarray(rng.uniform(0.5, 2.0, grid.model_shape), jnp.float32)
    refl, voxels, weights = jax.vmap(model_lib.locate, in_axes=(0, None))(points, grid.tables)
    expected = np.asarray(jnp.sum(weights * model_lib.pad_model(intensity)[voxels], axis=1))
    inside, value = full_search.peak_value(tuple(points[:, i] for i in range(3)), grid.tables,
                                           model_lib.pad_model(intensity))
    assert 0.2 < np.mean(np.asarray(refl) >= 0) < 0.9
    np.testing.assert_array_equal(np.asarray(inside), np.asarray(refl) >= 0)
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5, atol=1e-6)


def test_shared_chunk_equals_the_candidate_path(problem):
    state = emc.initial_state(problem, emc.EMCConfig(block_frames=12), seed=1)
    plan, blk = problem.direct_plan, problem.direct_blocks[0]
    arrays = blk.with_device_records()
    local = arrays.local
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    rotation_signal = direct.block_signal(plan, state.intensity, arrays.quaternions, problem.n_shells)
    expected = kernels.estep_direct(state.intensity, phi, state.likelihood, state.hyper, plan.geometry, arrays,
                                    kernels.candidate_signal(rotation_signal, local), 4).logl
    frames = jnp.arange(blk.n_local, dtype=jnp.int32)
    got, complete = full_search.shared_log_likelihood(
        state.intensity, phi[: blk.n_local], state.likelihood, plan.geometry, arrays.records, frames,
        local.masked_shells, crystal_from_lab(blk.arrays.quaternions), rotation_signal)
    assert bool(complete)
    assert got.shape == (blk.n_local, blk.arrays.quaternions.shape[0])
    mask = np.asarray(local.candidate_mask)
    candidates = np.asarray(local.candidates)
    got_at = np.take_along_axis(np.asarray(got), candidates, axis=1)
    np.testing.assert_allclose(got_at[mask], np.asarray(expected)[mask], rtol=2e-5, atol=2e-3)
    assert np.ptp(got_at[mask]) > 10  # the rotations are told apart
    rows, row_frame = full_search.record_rows(blk.records, 16)  # frames of ~200 records over many rows
    assert rows.pixel.shape[0] > 2 * blk.n_local
    args = (state.intensity, phi[: blk.n_local], state.likelihood, plan.geometry, rows, frames, local.masked_shells,
            crystal_from_lab(blk.arrays.quaternions), rotation_signal, row_frame)
    packed, _ = full_search.shared_log_likelihood(*args)
    np.testing.assert_allclose(np.asarray(packed), np.asarray(got), rtol=2e-5, atol=2e-3)
    # two passes: the arithmetic test, then table reads only for the records that pass it
    compact, complete = full_search.shared_log_likelihood(*args, max_hits=4096)
    assert bool(complete)
    np.testing.assert_allclose(np.asarray(compact), np.asarray(got), rtol=2e-5, atol=2e-3)
    _, complete = full_search.shared_log_likelihood(*args, max_hits=8)  # too few: reported, not silent
    assert not bool(complete)
