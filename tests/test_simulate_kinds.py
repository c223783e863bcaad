"""Blank and two-crystal frames of the simulator (--blank-fraction, --multi-fraction) and the misorientation
modulo the Laue group that keeps a second crystal unrelated to the first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError
from emcjax.rotations import crystal_from_lab, symmetric_misorientation
from emcjax.simulate import SimulationConfig, simulate
from emcjax.simulated_truth import MIN_SECOND_MISORIENTATION_RAD

GEO = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)
BASE = SimulationConfig(n_frames=200, geometry=GEO, seed=7)


def _frame_photons(frames, d):
    a, b = frames.photon_offsets[d], frames.photon_offsets[d + 1]
    return frames.photon_pixels[a:b], frames.photon_counts[a:b]


def _reference_angle(a, b, ops):
    """min over ops of the angle between R_g C(a) and C(b), from the matrices (C = crystal_from_lab)."""
    ca, cb = np.asarray(crystal_from_lab(a)), np.asarray(crystal_from_lab(b))
    cos = [(np.trace(g @ ca @ cb.T) - 1) / 2 for g in ops]
    return np.arccos(np.clip(max(cos), -1, 1))


def test_symmetric_misorientation_matches_matrices_and_vanishes_for_mates():
    crystal = Crystal((50.0, 60.0, 70.0, 90.0, 90.0, 90.0), "P 21 21 21")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ops = crystal.rotation_ops_cartesian
    got = symmetric_misorientation(q[:10], q[10:], ops)
    want = [_reference_angle(a, b, ops) for a, b in zip(q[:10], q[10:])]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the mate of q under the 2-fold about b looks identical: C(mate) = R_g C(q)
    from emcjax.rotations import matrix_to_quaternion

    mate = matrix_to_quaternion(np.asarray(crystal_from_lab(q[0])).T @ ops[2].T)
    assert symmetric_misorientation(q[0], mate, ops) < 1e-6
    assert np.asarray(crystal_from_lab(mate)) == pytest.approx(ops[2] @ np.asarray(crystal_from_lab(q[0])))


def test_blank_and_two_crystal_frames():
    config = dataclasses.replace(BASE, blank_fraction=0.1, multi_fraction=0.15)
    frames, truth = simulate(config)
    kind = truth["frame_kind"]
    assert np.sum(kind == 1) == 20 and np.sum(kind == 2) == 30
    blank, multi, single = (np.flatnonzero(kind == k) for k in (1, 2, 0))
    # blank: no Bragg photon at all, only the background
    assert np.all(truth["phi"][blank] == 0) and np.all(truth["expected_bragg_photons"][blank] == 0)
    photons = frames.photons_per_frame()
    bg = truth["expected_background_photons"]
    assert abs(photons[blank].sum() - bg[blank].sum()) < 4 * np.sqrt(bg[blank].sum())
    # two crystals: the second crystal's photons are on top, and its orientation is unrelated to the first
    assert np.all(truth["second_phi"][multi] > 0) and np.all(truth["second_phi"][single] == 0)
    angle = symmetric_misorientation(
        truth["quaternion"][multi], truth["second_quaternion"][multi], Crystal(config.cell, config.space_group).rotation_ops_cartesian
    )
    assert np.all(angle >= MIN_SECOND_MISORIENTATION_RAD)
    expected = truth["expected_bragg_photons"] + bg
    for group in (multi, single):
        assert abs(photons[group].sum() - expected[group].sum()) < 4 * np.sqrt(expected[group].sum())
    assert truth["expected_bragg_photons"][multi].mean() > 1.5 * truth["expected_bragg_photons"][single].mean()


def test_second_crystals_leave_the_other_frames_unchanged():
    frames0, truth0 = simulate(BASE)
    frames1, truth1 = simulate(dataclasses.replace(BASE, multi_fraction=0.1))
    multi = np.flatnonzero(truth1["frame_kind"] == 2)
    assert multi.size == 20 and np.all(truth0["frame_kind"] == 0)
    np.testing.assert_array_equal(truth0["quaternion"], truth1["quaternion"])
    for d in range(BASE.n_frames):
        p0, c0 = _frame_photons(frames0, d)
        p1, c1 = _frame_photons(frames1, d)
        if d in multi:  # the first crystal's and the background photons are still there, plus the second's
            counts1 = dict(zip(p1.tolist(), c1.tolist()))
            assert all(counts1.get(p, 0) >= c for p, c in zip(p0.tolist(), c0.tolist()))
            assert c1.sum() > c0.sum()
        else:
            np.testing.assert_array_equal(p0, p1)
            np.testing.assert_array_equal(c0, c1)


def test_equal_crystals_share_the_first_crystals_scale():
    _, truth = simulate(dataclasses.replace(BASE, multi_fraction=0.2, multi_equal=True))
    multi = truth["frame_kind"] == 2
    np.testing.assert_array_equal(truth["second_phi"][multi], truth["phi"][multi])
    assert np.all(truth["second_phi"][~multi] == 0) and np.std(truth["phi"][multi]) > 0.1


def test_fractions_are_checked():
    with pytest.raises(ConfigError, match="blank_fraction"):
        dataclasses.replace(BASE, blank_fraction=1.5)
    with pytest.raises(ConfigError, match="blank_fraction \\+ multi_fraction"):
        dataclasses.replace(BASE, blank_fraction=0.6, multi_fraction=0.6)
