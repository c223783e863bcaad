"""Frames with candidate rotation lists: every block evaluates the union of its frames' candidates.

The result must not depend on how frames are cut into blocks (each block has its own rotation set and
tables; the M-steps use the union of the kept rotations), and lists holding every rotation must give the
run without lists.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc
from emcjax.detector import DetectorGeometry
from emcjax.crystal import Crystal
from emcjax.rotation_symmetry import grid_symmetry_orbits
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig, simulate

from candidate_lists import with_random_lists, write_simulated

GEOMETRY = DetectorGeometry(
    num_rows=96, num_cols=96, pixel_size_m=1.8e-3, beam_center_px=(47.5, 47.5), resolution_max_A=6.0, n_shells=20
)
SIM = SimulationConfig(n_frames=90, geometry=GEOMETRY, rotation_n=2, bragg_photons=200.0, seed=5)


def _write(path, frames, truth):
    return write_simulated(path, frames, truth, SIM)


@pytest.fixture(scope="module")
def simulated():
    return simulate(SIM)


def _run(path, iters=2, **kwargs):
    config = emc.EMCConfig(rotation_n=2, reduce_by_symmetry=False, **kwargs)
    with data_io.SparseDataset(path) as dataset:
        problem = emc.setup_problem(dataset, config)
        state = emc.initial_state(problem, config, seed=0)
        for _ in range(iters):
            state, metrics, per_frame = emc.iterate(problem, state, config)
    return problem, np.asarray(state.intensity), np.asarray(state.phi), per_frame["best_rotation"], metrics


def _orbits(best: np.ndarray) -> np.ndarray:
    """Best rotations up to the point-group operations that map the grid onto itself: with the symmetric
    model, symmetry mates have the same likelihood and the argmax among them is decided by rounding."""
    crystal = Crystal(cell=tuple(SIM.cell), space_group=SIM.space_group)
    _, orbit = grid_symmetry_orbits(sample_600cell(2), crystal.rotation_ops_cartesian)
    return orbit[best]


def test_full_lists_equal_no_lists(simulated, tmp_path):
    frames, truth = simulated
    n_rot = sample_600cell(2).n_rot
    full = dataclasses.replace(
        frames,
        candidate_offsets=np.arange(frames.n_frames + 1, dtype=np.int64) * n_rot,
        candidate_rotations=np.tile(np.arange(n_rot, dtype=np.int64), frames.n_frames),
    )
    _, i_plain, p_plain, b_plain, m_plain = _run(_write(tmp_path / "plain.h5", frames, truth))
    problem, i_list, p_list, b_list, m_list = _run(_write(tmp_path / "lists.h5", full, truth), block_frames=40)
    assert len(problem.blocks) == 3
    np.testing.assert_allclose(i_list, i_plain, rtol=1e-5, atol=1e-6 * i_plain.max())
    np.testing.assert_allclose(p_list, p_plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_orbits(b_list), _orbits(b_plain))
    np.testing.assert_allclose(m_list["log_likelihood"], m_plain["log_likelihood"], rtol=1e-7)


def test_blocks_do_not_change_the_result(simulated, tmp_path):
    frames, truth = simulated
    n_rot = sample_600cell(2).n_rot
    with_lists = with_random_lists(frames, truth["rotation_index"], n_rot, 25, seed=0)
    path = _write(tmp_path / "lists.h5", with_lists, truth)
    one, i_one, p_one, b_one, m_one = _run(path)
    assert one.rotations.shape[0] < n_rot  # the block's union, not the whole sampling
    for kwargs in ({"block_frames": 17}, {"block_frames": 25, "stream": True}):
        problem, i, p, b, m = _run(path, **kwargs)
        assert len(problem.blocks) >= 4
        np.testing.assert_allclose(i, i_one, rtol=1e-5, atol=1e-6 * i_one.max())
        np.testing.assert_allclose(p, p_one, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(_orbits(b), _orbits(b_one))
    # the true rotation is a candidate of every frame, so the orientation is found for most frames
    assert np.mean(b_one == truth["rotation_index"]) > 0.5


def test_common_list_takes_the_all_rotations_path(simulated, tmp_path):
    """One list shared by every frame (here the whole sampling, in a shuffled order per frame) is the
    all-rotations path: one fused step, the exact symmetry reduction, the same reconstruction."""
    frames, truth = simulated
    n_rot = sample_600cell(2).n_rot
    rng = np.random.default_rng(1)
    full = dataclasses.replace(
        frames,
        candidate_offsets=np.arange(frames.n_frames + 1, dtype=np.int64) * n_rot,
        candidate_rotations=np.concatenate([rng.permutation(n_rot) for _ in range(frames.n_frames)]).astype(np.int64),
    )
    config = emc.EMCConfig(rotation_n=2)
    with data_io.SparseDataset(_write(tmp_path / "lists.h5", full, truth)) as dataset:
        listed = emc.setup_problem(dataset, config)
    with data_io.SparseDataset(_write(tmp_path / "plain.h5", frames, truth)) as dataset:
        plain = emc.setup_problem(dataset, config)
    assert listed.batch is not None and listed.rotation_set is not None
    np.testing.assert_array_equal(listed.rotations, plain.rotations)
    assert listed.rotations.shape[0] < n_rot  # reduced by the point group
