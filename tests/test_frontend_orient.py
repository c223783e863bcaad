"""Candidate orientations from spots (JAX scoring vs a numpy reference, recovery of the truth on simulated
images), and the whole front end: images -> reduce -> orient -> lowres."""

from __future__ import annotations

import dataclasses
import pathlib

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc, lowres
from emcjax.crystal import Crystal, reflections
from emcjax.detector import DetectorGeometry
from emcjax.frontend import orient as orient_lib
from emcjax.frontend.grid_orbits import grid_orbits
from emcjax.frontend import reduce as reduce_lib
from emcjax.frontend import simulate_images as si
from emcjax.rotation_symmetry import grid_symmetry_orbits
from emcjax.rotations import (crystal_from_lab, matrix_to_quaternion, misorientation_angle, quaternion_conjugate,
                              quaternion_multiply)
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig

GEOMETRY = DetectorGeometry(num_rows=128, num_cols=128, pixel_size_m=1.8e-3, beam_center_px=(63.3, 64.6),
                            resolution_max_A=4.5, n_shells=25)
CELL = (40.0, 40.0, 30.0, 90.0, 90.0, 90.0)


def numpy_counts(quaternions, spots, basis, tolerance):
    """Reference: for each rotation, the distinct hkl within tolerance of a spot (loops, float64)."""
    out = np.zeros((spots.shape[0], quaternions.shape[0]), np.int64)
    for f, frame in enumerate(spots):
        for c, q in enumerate(quaternions):
            matched = set()
            for x in frame:
                y = crystal_from_lab(q) @ x
                hkl = np.round(np.linalg.solve(basis, y))
                if np.linalg.norm(y - basis @ hkl) <= tolerance:
                    matched.add(tuple(hkl))
            out[f, c] = len(matched)
    return out


def test_match_counts_equal_a_numpy_reference_on_a_monoclinic_cell():
    crystal = Crystal(cell=(30.0, 45.0, 38.0, 90.0, 103.0, 90.0), space_group="P 1 21 1")
    basis = crystal.reciprocal_basis
    rng = np.random.default_rng(1)
    sampling = sample_600cell(2)
    quats = sampling.quaternions
    hkl = reflections(crystal, d_min=4.0)[:200]
    spots = np.zeros((3, 6, 3))
    for f, r in enumerate((5, 77, 300)):  # each frame: 4 reflections seen in rotation r, 2 random vectors
        picked = hkl[rng.choice(hkl.shape[0], 4, replace=False)]
        lab = (crystal_from_lab(quats[r]).T @ (basis @ picked.T)).T
        spots[f, :4] = lab + rng.normal(scale=1e-4, size=lab.shape)
        spots[f, 4:] = rng.normal(scale=0.1, size=(2, 3))
    tolerance = orient_lib.default_tolerance(crystal, 10, 2.0)
    got = np.asarray(orient_lib.match_counts(
        jnp.asarray(quats, jnp.float32), jnp.asarray(spots, jnp.float32), jnp.ones((3, 6), bool),
        jnp.asarray(basis, jnp.float32), jnp.asarray(np.linalg.inv(basis), jnp.float32),
        jnp.float32(tolerance**2)))
    expected = numpy_counts(quats, spots, basis, tolerance)
    assert np.all(expected[[0, 1, 2], [5, 77, 300]] >= 4)
    # float32 vs float64 may flip a match lying exactly at the tolerance: allow a handful
    assert np.sum(got != expected) <= 3, np.argwhere(got != expected)
    full = orient_lib.Orienter(crystal, 2, tolerance, chunk_rotations=100, orbits=False)  # chunks + padding
    lists = full.candidates([s for s in spots])
    for f, r in enumerate((5, 77, 300)):
        assert r in lists[f]
        np.testing.assert_array_equal(lists[f], np.flatnonzero(got[f] >= 3))
    # scoring one rotation per orbit of the grid-preserving 2-fold gives the same lists
    reduced = orient_lib.Orienter(crystal, 2, tolerance, chunk_rotations=100)
    assert reduced.n_scored == sampling.n_rot // 2
    for a, b in zip(lists, reduced.candidates([s for s in spots])):
        np.testing.assert_array_equal(a, b)


def test_grid_orbits_equal_the_kd_tree_orbits_and_preserve_match_counts():
    crystal = Crystal(cell=(40.0, 40.0, 30.0, 90.0, 90.0, 90.0), space_group="P 43 21 2")
    sampling = sample_600cell(6)
    orbits = grid_orbits(sampling, crystal.rotation_ops_cartesian)
    representative, orbit = grid_symmetry_orbits(sampling, crystal.rotation_ops_cartesian)
    np.testing.assert_array_equal(orbits.representative, representative)
    assert orbits.images.shape == (4, sampling.n_rot)  # the identity and the three 2-folds of 222
    np.testing.assert_array_equal(orbit[orbits.images], np.broadcast_to(orbit, orbits.images.shape))
    # mates match the same spots: counts of every rotation equal those of its images (float32 flips aside)
    rng = np.random.default_rng(2)
    basis = crystal.reciprocal_basis
    hkl = reflections(crystal, d_min=4.0)
    lab = (crystal_from_lab(sampling.quaternions[123]).T @ (basis @ hkl[rng.choice(hkl.shape[0], 8)].T)).T
    counts = np.asarray(orient_lib.match_counts(
        jnp.asarray(sampling.quaternions, jnp.float32), jnp.asarray(lab[None], jnp.float32), jnp.ones((1, 8), bool),
        jnp.asarray(basis, jnp.float32), jnp.asarray(np.linalg.inv(basis), jnp.float32),
        jnp.float32(orient_lib.default_tolerance(crystal, 10, 2.0) ** 2)))[0]
    assert counts[orbits.images[:, 123]].tolist() == [8] * 4
    assert np.mean(counts[orbits.images] == counts[None]) > 0.999


@pytest.mark.parametrize("space_group, cell, n_h", [
    ("P 1 21 1", (30.0, 45.0, 38.0, 90.0, 103.0, 90.0), 2),
    ("P 43 21 2", CELL, 4),
    ("P 2 3", (50.0, 50.0, 50.0, 90.0, 90.0, 90.0), 12),
    ("P 61", (50.0, 50.0, 70.0, 90.0, 90.0, 120.0), None),
])
def test_problem_grid_reduction_by_hashing_equals_the_kd_tree_orbits(space_group, cell, n_h):
    """emcjax.problem's exact grid reduction (hashing) gives the orbits, representatives and orbit weights of
    emcjax.rotation_symmetry.grid_symmetry_orbits (k-d tree) on several point groups."""
    from emcjax.problem import _sampling

    crystal = Crystal(cell=cell, space_group=space_group)
    sampling, representative, log_prior = _sampling(crystal, 4, True)
    expected_rep, expected_orbit = grid_symmetry_orbits(sampling, crystal.rotation_ops_cartesian)
    np.testing.assert_array_equal(representative, expected_rep)
    orbits = grid_orbits(sampling, crystal.rotation_ops_cartesian)
    np.testing.assert_array_equal(orbits.orbit(), expected_orbit)
    if n_h is not None:
        assert orbits.images.shape[0] == n_h
    weight = np.bincount(expected_orbit, weights=np.exp(sampling.log_weights - sampling.log_weights.max()))
    np.testing.assert_allclose(log_prior, np.log(weight), rtol=0, atol=1e-12)


def _mate_angle(candidates: np.ndarray, truth_q: np.ndarray, sampling, crystal: Crystal) -> float:
    """Smallest misorientation (rad) between the truth or one of its symmetry mates and a candidate."""
    best = np.inf
    for g in crystal.rotation_ops_cartesian:
        mate = quaternion_multiply(truth_q, quaternion_conjugate(matrix_to_quaternion(g)))
        best = min(best, float(misorientation_angle(sampling.quaternions[candidates], mate[None]).min()))
    return best


def test_true_orientation_is_among_the_candidates(tmp_path):
    sim = SimulationConfig(n_frames=60, geometry=GEOMETRY, cell=CELL, rotation_n=6, background_photons=0.0,
                           bragg_photons=600.0, seed=4)
    si.write(si.ImageSimulationConfig(out=tmp_path, format="h5", simulation=sim, background_per_pixel=0.02,
                                      ring_q=0.0, module_size=40))
    reduce_lib.run(reduce_lib.ReduceConfig(
        images=(str(tmp_path / "images.h5"),), out=tmp_path / "reduced.h5", geometry=GEOMETRY, cell=CELL,
        truth=tmp_path / "truth.h5", mask=reduce_lib.MaskConfig(file=tmp_path / "shadow_mask.npy")), log=lambda s: None)
    (tmp_path / "orient.toml").write_text("sampling_n = 6\nvn = 10\nkeep_empty = true\n")
    orient_lib.main(["--config", str(tmp_path / "orient.toml"), "--data", str(tmp_path / "reduced.h5"),
                     "--out", str(tmp_path / "oriented.h5")])
    with data_io.SparseDataset(tmp_path / "oriented.h5") as ds:
        frames, truth = ds.read_all(), ds.read_truth()
        assert ds.candidate_sampling_n == 6
    assert (tmp_path / "oriented.candidates.png").stat().st_size > 1000
    with h5py.File(tmp_path / "oriented.h5") as f:
        n_spots = np.diff(f["spots/offsets"][()])
    crystal = Crystal(cell=CELL, space_group=sim.space_group)
    sampling = sample_600cell(6)
    usable = n_spots >= 3
    assert usable.sum() >= 50
    found = []
    for i in np.flatnonzero(usable):
        c = frames.candidate_rotations[frames.candidate_offsets[i]:frames.candidate_offsets[i + 1]]
        found.append(c.size > 0 and _mate_angle(c, truth["quaternion"][frames.frame_id[i]], sampling, crystal) < 1e-6)
    assert np.mean(found) >= 0.95
    counts = np.diff(frames.candidate_offsets)[usable]
    assert np.median(counts) < 0.05 * sampling.n_rot  # the lists are selective


def test_images_to_lowres_matches_lowres_on_the_simulators_photons(tmp_path):
    """images -> reduce -> orient -> lowres reaches the cc_true of lowres on the simulator's own photon lists
    of the same frames (within 0.01)."""
    si.main(["--out", str(tmp_path / "img"), "--format", "cbf", "--simulation.n-frames", "60",
             *_geometry_args("--simulation.geometry", GEOMETRY), "--simulation.cell", *map(str, CELL),
             "--simulation.rotation-n", "2", "--simulation.bragg-photons", "300", "--simulation.background-photons",
             "30", "--simulation.seed", "0", "--background-per-pixel", "0", "--ring-q", "0", "--module-size", "40"])
    reduce_lib.main(["--images", str(tmp_path / "img" / "images" / "*.cbf"), "--out", str(tmp_path / "red.h5"),
                     *_geometry_args("--geometry", GEOMETRY), "--cell", *map(str, CELL),
                     "--mask.file", str(tmp_path / "img" / "shadow_mask.npy"), "--min-spot-pixels", "1",
                     "--max-spots-per-shell", "20", "--truth", str(tmp_path / "img" / "truth.h5")])
    orient_lib.main(["--data", str(tmp_path / "red.h5"), "--out", str(tmp_path / "ori.h5"), "--sampling-n", "2",
                     "--vn", "10"])
    with data_io.SparseDataset(tmp_path / "ori.h5") as ds:
        kept = ds.read_all().frame_id
    with data_io.SparseDataset(tmp_path / "img" / "truth.h5") as ds:
        frames, truth, geometry, crystal = ds.read_all(), ds.read_truth(), ds.geometry, ds.crystal
    assert kept.size >= 55  # frames with >= 3 spots and a candidate
    own = data_io.SparseFrames.concatenate([frames.frame_slice(i, i + 1) for i in kept])
    data_io.write_dataset(tmp_path / "own.h5", own, geometry=geometry, crystal=crystal, truth=truth)
    cc = {}
    for name in ("own", "ori"):
        config = lowres.LowresConfig(data=tmp_path / f"{name}.h5", out=tmp_path / f"run_{name}", iters=8,
                                     emc=emc.EMCConfig(rotation_n=2))
        cc[name] = lowres.run(config, log=lambda s: None)["cc_true"]
    assert cc["own"] > 0.8
    assert abs(cc["ori"] - cc["own"]) < 0.01, cc


def _geometry_args(prefix: str, geometry: DetectorGeometry) -> list[str]:
    args = []
    for name, value in dataclasses.asdict(geometry).items():
        args += [f"{prefix}.{name.replace('_', '-')}", *map(str, np.atleast_1d(value))]
    return args


def test_lowres_runs_on_orient_output_with_dropped_frames_and_their_truth(tmp_path):
    """orient drops frames without candidates (blank frames here); the per-frame truth is subset with them
    (by frame_id), so lowres's orientation metrics compare the right frames."""
    sim = SimulationConfig(n_frames=24, geometry=GEOMETRY, cell=CELL, rotation_n=2, background_photons=0.0,
                           bragg_photons=300.0, blank_fraction=0.25, seed=5)
    si.write(si.ImageSimulationConfig(out=tmp_path, format="h5", simulation=sim, background_per_pixel=0.02,
                                      ring_q=0.0, module_size=40))
    reduce_lib.run(reduce_lib.ReduceConfig(
        images=(str(tmp_path / "images.h5"),), out=tmp_path / "reduced.h5", geometry=GEOMETRY, cell=CELL,
        truth=tmp_path / "truth.h5", n_frames=22, mask=reduce_lib.MaskConfig(file=tmp_path / "shadow_mask.npy")),
        log=lambda s: None)
    orient_lib.run(orient_lib.OrientConfig(data=tmp_path / "reduced.h5", out=tmp_path / "oriented.h5", sampling_n=2,
                                           vn=10), log=lambda s: None)
    with data_io.SparseDataset(tmp_path / "truth.h5") as ds:
        full = ds.read_truth()
    for name, n_source in (("reduced", 22), ("oriented", None)):
        with data_io.SparseDataset(tmp_path / f"{name}.h5") as ds:
            kept, truth = ds.read_all().frame_id, ds.read_truth()
        if n_source:
            np.testing.assert_array_equal(kept, np.arange(n_source))  # --n-frames 22 of 24: truth of 22
        for key in ("quaternion", "phi", "frame_kind", "background_level"):
            np.testing.assert_array_equal(truth[key], full[key][kept])
        np.testing.assert_array_equal(truth["intensity"], full["intensity"])  # not per frame: whole
    assert 10 <= kept.size < 22 and np.all(full["frame_kind"][kept] == 0)  # the blank frames were dropped
    result = lowres.run(lowres.LowresConfig(data=tmp_path / "oriented.h5", out=tmp_path / "run", iters=2,
                                            emc=emc.EMCConfig(rotation_n=2)), log=lambda s: None)
    assert np.isfinite(result["orientation_error_median_deg"]), result
