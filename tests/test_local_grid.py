"""Tests of emcjax.local_grid (fine rotations around coarse ones) and the orientation helpers it relies on:
the neighbour table against brute-force angles over the whole sphere (also around q0 = 0), its symmetry under
the operations shared by both grids, per-frame candidates, nearest rotations and symmetric misorientation."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from emcjax import local_grid
from emcjax.crystal import Crystal
from emcjax.errors import ConfigError
from emcjax.rotation_neighbours import nearest_rotations
from emcjax.rotation_symmetry import grid_symmetry_orbits
from emcjax.rotations import (
    matrix_to_quaternion,
    misorientation_angle,
    quaternion_conjugate,
    quaternion_multiply,
    symmetric_misorientation,
)
from emcjax.sampling_600cell import COVERING_RADIUS_COEFF, RotationSampling, sample_600cell

COARSE, FINE = sample_600cell(3), sample_600cell(4)


def brute_force_table(coarse_q, fine_q, radius):
    angles = misorientation_angle(coarse_q[:, None, :], fine_q[None, :, :])
    return [np.flatnonzero(row <= radius) for row in angles]


def test_fine_n_and_radius_follow_the_reference():
    assert local_grid.fine_sampling_n(70, 4.0, 3.0) == 94  # METHOD.md §2.11
    assert local_grid.fine_sampling_n(3, 4.0, 3.0) == 4
    assert local_grid.fine_sampling_n(6, 4.0, 3.0) == 8  # exact ratio: no rounding up through float error
    assert local_grid.fine_sampling_n(5, 4.0, 4.0) == 5
    # the reference's test 2 - 2|c.f| < delta^2, delta = 1.01 x 0.944 / (2 n_c), as a misorientation angle
    for n_c, n_f in ((70, 94), (5, 5)):
        delta = 1.01 * 0.944 / (2 * n_c if n_f > n_c else n_c)
        angle = local_grid.neighbour_radius(n_c, n_f)
        assert 2 - 2 * np.cos(angle / 2) == pytest.approx(delta**2, rel=1e-12)
    assert local_grid.neighbour_radius(70, 94) == pytest.approx(1.01 * 0.944 / 70, rel=1e-4)
    with pytest.raises(ConfigError, match="must not be lower"):
        local_grid.fine_sampling_n(4, 3.0, 4.0)


def test_table_matches_brute_force_over_the_whole_sphere():
    radius = local_grid.neighbour_radius(3, 4)
    offsets, table = local_grid.neighbour_table(COARSE, FINE, radius)
    expected = brute_force_table(COARSE.quaternions, FINE.quaternions, radius)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(table[offsets[i] : offsets[i + 1]], want)
    # every coarse rotation has fine neighbours (the fine grid's covering radius is below the radius), ~5.5
    assert np.all(np.diff(offsets) >= 1)
    assert 4 < np.mean(np.diff(offsets)) < 7
    # the reference's search over sign-normalised (q0 >= 0) quaternions misses the pairs with a negative dot
    # product: this grid pair has such neighbours, which the table keeps
    sign = lambda q: q * np.where(q[:, :1] < 0, -1.0, 1.0)  # noqa: E731
    rows = np.repeat(np.arange(COARSE.n_rot), np.diff(offsets))
    dots = np.sum(sign(COARSE.quaternions)[rows] * sign(FINE.quaternions)[table], axis=1)
    assert np.sum(dots < 0) > 0


def test_table_near_q0_zero_matches_brute_force():
    # rotations by ~180° (q0 ~ 0) whose neighbours lie on both sides of q0 = 0
    rng = np.random.default_rng(1)
    axis = rng.normal(size=(300, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    q0 = rng.uniform(-0.02, 0.02, size=300)
    q = np.concatenate([q0[:, None], np.sqrt(1 - q0**2)[:, None] * axis], axis=1)
    radius = local_grid.neighbour_radius(3, 4)
    offsets, table = local_grid.neighbour_table(q, FINE, radius)
    expected = brute_force_table(q, FINE.quaternions, radius)
    crossing = 0
    for i, want in enumerate(expected):
        got = table[offsets[i] : offsets[i + 1]]
        np.testing.assert_array_equal(got, want)
        f = FINE.quaternions[got] * np.where(FINE.quaternions[got][:, :1] < 0, -1.0, 1.0)
        crossing += np.any(f @ (q[i] * np.sign(q[i, 0])) < 0)
    assert crossing > 150  # most of these neighbourhoods straddle q0 = 0


def _image_permutation(sampling: RotationSampling, g: np.ndarray) -> np.ndarray | None:
    """Index of the image q ⊗ conj(h_g) of every grid rotation, or None if the grid is not invariant."""
    img = quaternion_multiply(sampling.quaternions, quaternion_conjugate(matrix_to_quaternion(g))[None])
    tree = cKDTree(sampling.quaternions)
    d_p, i_p = tree.query(img)
    d_m, i_m = tree.query(-img)
    if np.minimum(d_p, d_m).max() > 1e-6:
        return None
    return np.where(d_p <= d_m, i_p, i_m)


def test_table_commutes_with_the_shared_point_group_operations():
    ops = Crystal(cell=(40.0, 40.0, 30.0, 90, 90, 90), space_group="P 4 2 2").rotation_ops_cartesian
    radius = local_grid.neighbour_radius(3, 4)
    offsets, table = local_grid.neighbour_table(COARSE, FINE, radius)
    shared = 0
    for g in ops[1:]:
        perm_c, perm_f = _image_permutation(COARSE, g), _image_permutation(FINE, g)
        assert (perm_c is None) == (perm_f is None)  # the same operations map both grids onto themselves
        if perm_c is None:
            continue
        shared += 1
        for i in range(COARSE.n_rot):
            image_nbrs = np.sort(perm_f[table[offsets[i] : offsets[i + 1]]])
            j = perm_c[i]
            np.testing.assert_array_equal(table[offsets[j] : offsets[j + 1]], image_nbrs)
    assert shared == 3  # the three 2-folds of 222 (grid_symmetry_orbits: 4x reduction for 422)
    rep, _ = grid_symmetry_orbits(COARSE, ops)
    assert rep.shape[0] * 4 == pytest.approx(COARSE.n_rot, rel=0.02)


def test_frame_candidates_are_unions_of_neighbourhoods_above_threshold():
    rng = np.random.default_rng(2)
    n_frames = 7
    frame = np.array([0, 0, 0, 1, 3, 3, 5, 6])
    rotation = rng.choice(COARSE.n_rot, size=frame.shape[0], replace=False)
    prob = np.array([0.6, 0.395, 0.005, 1.0, 0.5, 0.5, 0.009, 0.01])
    radius = local_grid.neighbour_radius(3, 4)
    offsets, cand, n_coarse = local_grid.frame_candidates(frame, rotation, prob, n_frames, COARSE, FINE, radius)
    expected_table = brute_force_table(COARSE.quaternions, FINE.quaternions, radius)
    for d in range(n_frames):
        use = (frame == d) & (prob >= 0.01)
        want = np.unique(np.concatenate([expected_table[r] for r in rotation[use]] + [np.zeros(0, np.int64)]))
        np.testing.assert_array_equal(cand[offsets[d] : offsets[d + 1]], want)
        assert n_coarse[d] == use.sum()
    assert offsets[3] == offsets[2] and offsets[6] == offsets[5]  # frames 2, 4 and 5 (P < 0.01) have none
    with pytest.raises(ConfigError, match="rotation indices"):
        local_grid.frame_candidates([0], [COARSE.n_rot], [1.0], 1, COARSE, FINE, radius)


def test_nearest_rotations_match_brute_force():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(200, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[:50, 0] = rng.uniform(-1e-3, 1e-3, 50)  # around q0 = 0
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    got = nearest_rotations(FINE, q, 5)
    angles = misorientation_angle(q[:, None, :], FINE.quaternions[None])
    want = np.sort(angles, axis=1)[:, :5]
    np.testing.assert_allclose(np.take_along_axis(angles, got, axis=1), want, atol=1e-12)
    assert all(np.unique(row).shape[0] == 5 for row in got)
    # the nearest grid rotation is within the covering radius 0.944 / n
    assert want[:, 0].max() <= COVERING_RADIUS_COEFF / FINE.n


def test_symmetric_misorientation_is_the_angle_to_the_nearest_equivalent():
    crystal = Crystal(cell=(40.0, 40.0, 30.0, 90, 90, 90), space_group="P 43 21 2")
    ops = crystal.rotation_ops_cartesian
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(50, 4))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    small = np.concatenate([np.cos(0.01)[None].repeat(50)[:, None], np.sin(0.01) * np.eye(3)[[0] * 50]], axis=1)
    estimate = quaternion_multiply(truth, small)  # 0.02 rad off the truth
    g_conj = quaternion_conjugate(matrix_to_quaternion(ops[rng.integers(1, ops.shape[0], 50)]))
    equivalent = quaternion_multiply(estimate, g_conj)  # the same frame, seen as a symmetry mate
    np.testing.assert_allclose(symmetric_misorientation(equivalent, truth, ops), 0.02, atol=1e-9)
    assert np.all(misorientation_angle(equivalent, truth) > 0.5)
    # never larger than the plain angle, and equal to the brute-force minimum
    a = rng.normal(size=(50, 4))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    brute = np.min([misorientation_angle(a, quaternion_multiply(truth, gc[None])) for gc in
                    quaternion_conjugate(matrix_to_quaternion(ops))], axis=0)
    np.testing.assert_allclose(symmetric_misorientation(a, truth, ops), brute, atol=1e-12)


def test_scoring_values_by_hkl_and_cc_by_shell():
    from emcjax import scoring

    B = np.diag([0.1, 0.1, 0.2])
    hkl = np.array([[1, 0, 0], [2, 0, 0], [3, 0, 0], [0, 0, 1], [4, 1, 0], [5, 0, 0], [0, 0, 3], [2, 2, 2]])
    truth = np.arange(1.0, 9.0)
    order = np.array([3, 1, 7, 0, 5, 2, 6, 4])
    np.testing.assert_array_equal(scoring.values_by_hkl(hkl[order], hkl, truth), truth[order])
    aligned = scoring.values_by_hkl(np.array([[9, 9, 9], [2, 0, 0]]), hkl, truth)
    assert np.isnan(aligned[0]) and aligned[1] == 2.0
    # |q| = 0.1 h for (h00): d = 10/h; shells (inf, 4] holds h = 1, 2 (+ (001) d = 5, (003) d = 1.67 no)
    rng = np.random.default_rng(0)
    values = truth + rng.normal(scale=0.1, size=8)
    shells = scoring.cc_by_shell(hkl[order], values[order], hkl, truth, B, (100.0, 4.0, 1.0))
    d = 1 / np.linalg.norm(hkl @ B.T, axis=1)
    for s, (hi, lo) in zip(shells, ((100.0, 4.0), (4.0, 1.0))):
        sel = (d <= hi) & (d > lo)
        assert s["n"] == sel.sum()
        assert s["cc"] == pytest.approx(np.corrcoef(values[sel], truth[sel])[0, 1])
