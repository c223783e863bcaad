"""Candidate mode by direct photon-peak tests (emcjax.direct) against the table path (per-rotation entries).

The direct path tests every (photon, candidate) pair on the device and sums the expected signal from the
reflections near the Ewald sphere; it must give the table path's log-likelihoods (float32 tolerance) and
the same model after 3 iterations.
"""

from __future__ import annotations

import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import candidate_path, direct, emc
from emcjax.core.estep import block_log_likelihood, rotation_tables
from emcjax.core import direct as kernels
from emcjax.detector import DetectorGeometry
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig

from candidate_lists import write_listed_simulation

GEOMETRY = DetectorGeometry(
    num_rows=96, num_cols=96, pixel_size_m=1.8e-3, beam_center_px=(47.5, 47.5), resolution_max_A=6.0, n_shells=20
)
SIM = SimulationConfig(n_frames=40, geometry=GEOMETRY, rotation_n=3, bragg_photons=200.0, seed=7)


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    path = tmp_path_factory.mktemp("direct") / "lists.h5"
    return path, write_listed_simulation(path, SIM, 30, seed=0)


@pytest.fixture(scope="module")
def problems(listed):
    """The table path and the direct path (through setup_problem's candidate_path) on the same data."""
    path, _ = listed
    with data_io.SparseDataset(path) as dataset:
        table = emc.setup_problem(dataset, emc.EMCConfig(block_frames=20))
        fast = emc.setup_problem(dataset, emc.EMCConfig(block_frames=20, candidate_path="direct"))
    assert isinstance(fast, direct.DirectProblem) and not isinstance(table, direct.DirectProblem)
    return table, fast


def test_log_likelihoods_equal_the_table_path(problems):
    table, fast = problems
    config = emc.EMCConfig(block_frames=20)
    state = emc.initial_state(table, config, seed=1)
    phi = np.pad(np.asarray(state.phi), (0, table.n_padded - table.n_frames))
    for b, (block, blk) in enumerate(zip(table.blocks, fast.direct_blocks)):
        data = table.block_data(block)
        shared = data.rotation_set.shared(table.geometry)
        local = table.local_block(b)
        expected = np.asarray(block_log_likelihood(
            rotation_tables(state.intensity, shared, table.n_shells), phi, state.likelihood, shared, local))
        signal = kernels.candidate_signal(
            direct.block_signal(fast.direct_plan, state.intensity, blk.arrays.quaternions, fast.n_shells), blk.arrays.local)
        photon = direct._photon_terms(blk, state.intensity, phi, state.likelihood, fast.direct_plan.geometry)  # packed rows
        got = kernels.estep_direct(state.intensity, phi, state.likelihood, state.hyper, fast.direct_plan.geometry,
                                   blk.arrays, signal, 8, photon)
        # same candidate slots: both number a frame's candidates by their position in the sorted block union
        mask = np.asarray(local.candidate_mask)
        np.testing.assert_array_equal(np.asarray(blk.arrays.local.candidate_mask), mask)
        np.testing.assert_allclose(np.asarray(got.logl)[mask], expected[mask], rtol=2e-5, atol=2e-3)
        assert np.ptp(expected[mask]) > 10  # the candidates are told apart


def test_same_model_after_three_iterations(listed, problems):
    _, truth = listed
    config = emc.EMCConfig(block_frames=20)
    results = []
    for problem in problems:
        state = emc.initial_state(problem, config, seed=0)
        logl = []
        for _ in range(3):
            state, metrics, per_frame = emc.iterate(problem, state, config)
            logl.append(metrics["log_likelihood"])
        results.append((np.asarray(state.intensity), np.asarray(state.phi), per_frame["best_rotation"], logl))
    (i_t, p_t, b_t, l_t), (i_d, p_d, b_d, l_d) = results
    np.testing.assert_allclose(l_d, l_t, rtol=1e-5)
    np.testing.assert_allclose(i_d, i_t, rtol=1e-3, atol=1e-4 * i_t.max())
    np.testing.assert_allclose(p_d, p_t, rtol=1e-3, atol=1e-4)
    assert np.mean(b_d == b_t) > 0.95
    assert np.mean(b_d == truth["rotation_index"]) > 0.5


def test_packed_photon_terms_equal_the_per_frame_ones(problems):
    """Photon terms over packed record rows in two passes (emcjax.core.packed_photons) equal the per-frame
    ones by model.locate (core.direct.photon_terms), and the kept pairs' in-peak records (pair_inside) equal
    the per-frame E-step's; the hit capacity set at set-up held."""
    import jax

    from emcjax.core import packed_photons
    from emcjax.core.estep import local_phi

    _, fast = problems
    config = emc.EMCConfig(block_frames=20)
    state = emc.initial_state(fast, config, seed=1)
    phi = np.pad(np.asarray(state.phi), (0, fast.n_padded - fast.n_frames))
    geometry = fast.direct_plan.geometry
    for blk in fast.direct_blocks:
        assert blk.arrays.records is None  # a run holds only the packed rows on the device
        arrays = blk.with_device_records()  # the reference reads the records padded per frame
        args = (state.intensity, local_phi(phi, arrays.local), state.likelihood, geometry)
        expected = np.asarray(jax.jit(kernels.photon_terms)(*args, arrays))
        got, hits = packed_photons.photon_terms(*args, arrays.quaternions, arrays.local.candidates,
                                                arrays.local.frame_start, arrays.rows, arrays.row_frame, blk.max_hits)
        assert 0 < int(hits) <= blk.max_hits
        mask = np.asarray(arrays.local.candidate_mask)
        assert np.count_nonzero(expected[mask]) > 0.5 * mask.sum()
        np.testing.assert_allclose(np.asarray(got)[mask], expected[mask], rtol=1e-5, atol=1e-3)
        signal = np.zeros(mask.shape, np.float32)
        reference = kernels.estep_direct(state.intensity, phi, state.likelihood, state.hyper, geometry, arrays, signal, 8)
        frame, j = np.nonzero(np.asarray(reference.prob) > 0)
        quats = np.asarray(arrays.quaternions)[np.asarray(arrays.local.candidates)[frame, np.asarray(reference.slot)[frame, j]]]
        inside = np.asarray(packed_photons.pair_inside(geometry, quats, blk.records["pixel"][frame]))
        np.testing.assert_array_equal(inside, np.asarray(reference.inside)[frame, j])
        assert inside[blk.records["valid"][frame]].mean() > 0.1


def test_azimuth_within_its_error_bound():
    """cut_signal.azimuth (a polynomial atan2) is within ATAN2_ERROR of the exact angle, in every quadrant and
    on the axes."""
    import jax.numpy as jnp

    from emcjax.core import cut_signal

    rng = np.random.default_rng(4)
    y, x = rng.normal(size=(2, 200_000)).astype(np.float32) * rng.choice([1e-3, 1.0, 1e3], size=(2, 200_000))
    y = np.concatenate([y, [0.0, 1.0, 0.0, -1.0, 2.0, -2.0]]).astype(np.float32)
    x = np.concatenate([x, [1.0, 0.0, -1.0, 0.0, 2.0, -2.0]]).astype(np.float32)
    got = np.asarray(cut_signal.azimuth(jnp.asarray(y), jnp.asarray(x)), np.float64)
    error = np.angle(np.exp(1j * (got - np.arctan2(y.astype(np.float64), x.astype(np.float64)))))
    assert np.abs(error).max() < cut_signal.ATAN2_ERROR


def test_table_msteps_for_other_updates(problems):
    """Intensity updates other than the reference one take the table path's M-steps on the kept rotations'
    in-peak entries (emcjax.direct_kept.kept_from_direct): one MLEM iteration equals the table path's."""
    config = emc.EMCConfig(block_frames=20, intensity_update="mlem")
    models = []
    for problem in problems:
        state, _, _ = emc.iterate(problem, emc.initial_state(problem, config, seed=0), config)
        models.append(np.asarray(state.intensity))
    np.testing.assert_allclose(models[1], models[0], rtol=1e-3, atol=1e-4 * models[0].max())
    assert "kept rotations' entries" in problems[1].seconds


def test_cost_estimate():
    """Shared rotations (a full search) take the table path; one frame per candidate with many-pixel peaks
    and the tabulated signal, or entries that do not fit, the direct path."""
    assert candidate_path.choose_path(2000 * 3240, 3240, 180, 800, 1000, "exact") == "table"
    assert candidate_path.choose_path(80000 * 200, 80000 * 200, 180, 25000, 1200, "tabulated") == "direct"
    assert candidate_path.choose_path(80000 * 200, 80000 * 200, 180, 25000, 1200, "exact") == "direct"  # 2.6e13 bytes
    assert candidate_path.choose_path(40 * 200, 40 * 200, 180, 800, 250, "exact") == "table"
    # the kept rotations' exposure (once per iteration, ~1.5 per frame) tips a close case to the table path
    assert candidate_path.choose_path(1000 * 200, 3000, 180, 25000, 460, "tabulated", 0) == "direct"
    assert candidate_path.choose_path(1000 * 200, 3000, 180, 25000, 460, "tabulated", 1000) == "table"


def test_sampled_rotations_by_index_equal_the_sampling():
    from emcjax.errors import ConfigError
    from emcjax.sampling_index import SampledRotations

    for n in (1, 2, 4):
        whole = sample_600cell(n)
        lazy = SampledRotations(n)
        index = np.random.default_rng(n).permutation(whole.n_rot)[: min(whole.n_rot, 500)]
        np.testing.assert_allclose(lazy.quaternions[index], whole.quaternions[index], atol=1e-15)
        np.testing.assert_allclose(lazy.log_weights[index], whole.log_weights[index], atol=1e-12)
    with pytest.raises(ConfigError, match="out of range"):
        lazy.quaternions[[whole.n_rot]]


def _small_tabulated():
    """A detector whose peaks span many pixels, the true model and the cut table: (grid, detector, intensity,
    projection (proj, shape, n_box), cut geometry, table, the generator after the model)."""
    import jax.numpy as jnp

    from emcjax import model as model_lib
    from emcjax.core import cut_signal
    from emcjax.crystal import Crystal
    from emcjax.detector import make_detector
    from emcjax.simulated_truth import true_model

    geometry = DetectorGeometry(num_rows=160, num_cols=160, pixel_size_m=172e-6, distance_m=0.06,
                                beam_center_px=(79.5, 79.5), beamstop_radius_px=4.0, resolution_max_A=5.0, n_shells=10)
    detector = make_detector(geometry)
    crystal = Crystal(cell=(30.0, 30.0, 30.0, 90.0, 90.0, 90.0), space_group="P 1")
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(crystal, d_min=5.0, d_max=1 / q_min, vn=5, gw=2.0)
    rng = np.random.default_rng(0)
    intensity = jnp.asarray(true_model(grid, SimulationConfig(geometry=geometry, vn=5), rng), jnp.float32)
    cut = cut_signal.cut_geometry(grid, detector)
    table = cut_signal.cut_table(intensity, cut, grid.tables)
    return grid, detector, intensity, model_lib.projection_setup(grid, detector), cut, table, rng


def test_tabulated_signal_close_to_the_pixel_sum():
    """Where peaks span many pixels, the cut-integral S is within a few per cent of the exact pixel sum, and
    follows its variation between rotations."""
    import jax.numpy as jnp

    from emcjax import model as model_lib
    from emcjax.core import cut_signal
    from emcjax.simulated_truth import random_quaternions

    grid, detector, intensity, (proj, shape, n_box), cut, table, rng = _small_tabulated()
    quats = jnp.asarray(random_quaternions(rng, 16), jnp.float32)
    geo = kernels.Geometry(jnp.asarray(detector.polarization, jnp.float32), jnp.asarray(detector.shell, jnp.int32),
                           grid.tables, jnp.asarray(detector.q, jnp.float32))
    h_max = model_lib.bucket_count(int(np.max(np.asarray(model_lib.near_sphere_counts(quats, proj)))))
    exact = np.asarray(kernels.exact_signal(intensity, quats, proj, geo, shape, h_max, n_box, 10)[0]).sum(axis=1)
    approx = np.asarray(cut_signal.tabulated_signal(table, quats, proj, cut, shape, h_max, 10)[0]).sum(axis=1)
    relative = approx / exact - 1
    assert np.abs(relative).max() < 0.03, relative  # measured: 0.015
    assert np.corrcoef(approx, exact)[0, 1] > 0.995  # measured: 0.9995 (spread of S between rotations 14 %)


def test_near_reflection_signal_equals_the_dense_list():
    """S per (frame, candidate) from only the reflections near the sphere at that candidate (compacted to k_max)
    equals S from the frame's whole preselected list evaluated densely: the dropped reflections contribute
    exactly nothing. Also with a masked shell, and the near lists are a small part of the frame's list."""
    import jax.numpy as jnp

    from emcjax.core import cut_signal
    from emcjax.rotations import crystal_from_lab, quaternion_multiply
    from emcjax.simulated_truth import random_quaternions

    grid, detector, _, (proj, shape, _), cut, table, _ = _small_tabulated()
    rng = np.random.default_rng(2)
    n_frames, n_slots, reach = 4, 24, 0.05
    centre = random_quaternions(rng, n_frames)
    axis = rng.normal(size=(n_frames, n_slots, 3))
    angle = reach * rng.uniform(size=(n_frames, n_slots, 1)) ** (1 / 3)
    small = np.concatenate([np.cos(angle / 2), np.sin(angle / 2) * axis / np.linalg.norm(axis, axis=-1, keepdims=True)], -1)
    quats = quaternion_multiply(np.repeat(centre[:, None], n_slots, 1), small)
    rot = crystal_from_lab(jnp.asarray(quats, jnp.float32))
    lists, counts = cut_signal.frame_reflection_lists(jnp.asarray(centre, jnp.float32), jnp.full(n_frames, reach),
                                                      proj, cut, 2048)
    assert int(np.max(np.asarray(counts))) <= 2048
    masked = jnp.asarray([[10], [3], [10], [5]], jnp.int32)  # shell 10 (= n_shells) masks nothing
    near = np.asarray(cut_signal.near_counts(rot, lists, proj))
    k_max = -(-int(near.max()) // 32) * 32
    assert near.max() < 0.8 * np.asarray(counts).min()  # the frame lists hold reflections far from the sphere
    dense = np.asarray(cut_signal.frame_signal(table, rot, lists, masked, proj, cut, shape))
    fast = np.asarray(cut_signal.near_frame_signal(table, rot, lists, masked, proj, cut, shape, k_max))
    assert np.all(dense > 0)
    np.testing.assert_allclose(fast, dense, rtol=1e-5)
    unmasked = np.asarray(cut_signal.near_frame_signal(table, rot, lists, jnp.full_like(masked, 10), proj, cut, shape,
                                                        k_max))
    assert np.all(unmasked[[1, 3]] > fast[[1, 3]])  # the masked shells were left out
