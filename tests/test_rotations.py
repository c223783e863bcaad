"""Tests of emcjax.rotations (conventions), sampling_600cell (sampling and weights), rotation_symmetry
(point-group reduction) and rotation_neighbours (neighbours)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import ConvexHull, cKDTree
from scipy.spatial.transform import Rotation

from emcjax.errors import ConfigError
from emcjax.rotation_neighbours import neighbours
from emcjax.rotation_symmetry import reduce_by_point_group
from emcjax.rotations import (
    crystal_from_lab,
    matrix_to_quaternion,
    misorientation_angle,
    quaternion_conjugate,
    quaternion_multiply,
    quaternion_to_matrix,
)
from emcjax.sampling_600cell import RotationSampling, n_rotations_600cell, sample_600cell

TAU = (1 + 5**0.5) / 2


def random_quaternions(m, seed=0):
    q = np.random.default_rng(seed).normal(size=(m, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ conventions


def test_quaternion_to_matrix_is_rotation_and_matches_scipy():
    q = random_quaternions(500)
    R = quaternion_to_matrix(q)
    assert R.shape == (500, 3, 3) and R.dtype == np.float64
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-13)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-13)
    # scipy is scalar-LAST
    R_scipy = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    np.testing.assert_allclose(R, R_scipy, atol=1e-13)
    np.testing.assert_allclose(quaternion_to_matrix(-q), R, atol=1e-15)
    # active: 90 degrees about z maps x to y
    qz = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(quaternion_to_matrix(qz) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    # composition
    a, b = random_quaternions(50, 1), random_quaternions(50, 2)
    np.testing.assert_allclose(
        quaternion_to_matrix(quaternion_multiply(a, b)), quaternion_to_matrix(a) @ quaternion_to_matrix(b), atol=1e-13
    )


def test_quaternion_to_matrix_jax_and_jit():
    q = random_quaternions(20).astype(np.float32)
    ref = quaternion_to_matrix(q.astype(np.float64))
    out = quaternion_to_matrix(jnp.asarray(q))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32 and out.shape == (20, 3, 3)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
    out_jit = jax.jit(crystal_from_lab)(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(out_jit), np.swapaxes(ref, 1, 2), atol=1e-6)


def test_crystal_from_lab_is_reference_formula():
    q = random_quaternions(100, 3)
    C = crystal_from_lab(q)
    np.testing.assert_array_equal(C, np.swapaxes(quaternion_to_matrix(q), 1, 2))
    q0, q1, q2, q3 = q.T
    ref = np.empty((100, 3, 3))  # METHOD.md section 1, element by element
    ref[:, 0, 0] = 1 - 2 * (q2**2 + q3**2)
    ref[:, 0, 1] = 2 * (q1 * q2 + q0 * q3)
    ref[:, 0, 2] = 2 * (q1 * q3 - q0 * q2)
    ref[:, 1, 0] = 2 * (q1 * q2 - q0 * q3)
    ref[:, 1, 1] = 1 - 2 * (q1**2 + q3**2)
    ref[:, 1, 2] = 2 * (q0 * q1 + q2 * q3)
    ref[:, 2, 0] = 2 * (q0 * q2 + q1 * q3)
    ref[:, 2, 1] = 2 * (q2 * q3 - q0 * q1)
    ref[:, 2, 2] = 1 - 2 * (q1**2 + q2**2)
    np.testing.assert_allclose(C, ref, atol=1e-15)


def test_matrix_to_quaternion_round_trip():
    q = random_quaternions(1000, 4)
    # include identity, 180-degree rotations and near-180-degree rotations (q0 ~ 0)
    special = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0], [1e-9, 0.6, 0, 0.8]])
    q = np.concatenate([q, special / np.linalg.norm(special, axis=1, keepdims=True)])
    p = matrix_to_quaternion(quaternion_to_matrix(q))
    assert p.shape == q.shape
    assert np.all(p[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1, atol=1e-14)
    np.testing.assert_allclose(np.abs(np.sum(p * q, axis=1)), 1, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(p), quaternion_to_matrix(q), atol=1e-13)
    assert matrix_to_quaternion(np.eye(3)).shape == (4,)


def test_misorientation_angle():
    a, b = random_quaternions(300, 5), random_quaternions(300, 6)
    ang = misorientation_angle(a, b)
    np.testing.assert_allclose(ang, 2 * np.arccos(np.minimum(1, np.abs(np.sum(a * b, axis=1)))), atol=1e-12)
    np.testing.assert_allclose(misorientation_angle(a, -b), ang, atol=1e-15)
    rel = Rotation.from_quat(a[:, [1, 2, 3, 0]]).inv() * Rotation.from_quat(b[:, [1, 2, 3, 0]])
    np.testing.assert_allclose(ang, rel.magnitude(), atol=1e-12)
    assert np.all((ang >= 0) & (ang <= np.pi + 1e-15))
    # accuracy at tiny angles
    small = np.array([np.cos(1e-9 / 2), np.sin(1e-9 / 2), 0, 0])
    np.testing.assert_allclose(misorientation_angle(np.array([1.0, 0, 0, 0]), small), 1e-9, rtol=1e-6)
    np.testing.assert_allclose(quaternion_multiply(a, quaternion_conjugate(a)), np.tile([1, 0, 0, 0], (300, 1)), atol=1e-14)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rotation_count(n):
    s = sample_600cell(n)
    assert s.n_rot == 10 * (5 * n**3 + n) == n_rotations_600cell(n)
    assert s.n == n
    assert s.quaternions.shape == (s.n_rot, 4) and s.quaternions.dtype == np.float64
    assert s.log_weights.shape == (s.n_rot,) and s.log_weights.dtype == np.float64


def test_bad_n():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            sample_600cell(bad)


def _reference_sampling_slow(n):
    """Straightforward loop restatement of make-quaternion.c (independent vertex numbering and cell choice).

    Returns {exact integer coordinates (a0, b0, ..., a3, b3) of the kept point: (unit quaternion, weight)}.
    Point value v_k = (a_k + b_k tau) / (2 n).
    """
    # vertices in exact (a, b) form, value (a + b tau)/2
    verts = []
    for k in range(4):
        for s in (1, -1):
            v = [(0, 0)] * 4
            v[k] = (2 * s, 0)
            verts.append(v)
    for signs in itertools.product((1, -1), repeat=4):
        verts.append([(s, 0) for s in signs])
    for perm in itertools.permutations(range(4)):
        inversions = sum(1 for i in range(4) for j in range(i + 1, 4) if perm[i] > perm[j])
        if inversions % 2:
            continue
        for s1, s2, s3 in itertools.product((1, -1), repeat=3):
            base = [(0, s1), (s2, 0), (-s3, s3), (0, 0)]  # tau/2, 1/2, 1/(2 tau), 0
            verts.append([base[perm[k]] for k in range(4)])
    assert len(verts) == 120
    fl = [np.array([(a + b * TAU) / 2 for a, b in v]) for v in verts]
    nv = len(verts)
    adj = [[i != j and abs(np.sum((fl[i] - fl[j]) ** 2) - (1 / TAU) ** 2) < 1e-6 for j in range(nv)] for i in range(nv)]
    edges = [(i, j) for i in range(nv) for j in range(i + 1, nv) if adj[i][j]]
    faces = [(i, j, k) for (i, j) in edges for k in range(j + 1, nv) if adj[i][k] and adj[j][k]]
    cells = [(i, j, k, m) for (i, j, k) in faces for m in range(k + 1, nv) if adj[i][m] and adj[j][m] and adj[k][m]]
    assert (len(edges), len(faces), len(cells)) == (720, 1200, 600)

    def containing_cell(simplex):  # use the LAST containing cell (the C code uses the first)
        return [c for c in cells if set(simplex) <= set(c)][-1]

    out = {}

    def add(simplex, bary, factor):
        coords = []
        for k in range(4):
            a = sum(c * verts[v][k][0] for c, v in zip(bary, simplex))
            b = sum(c * verts[v][k][1] for c, v in zip(bary, simplex))
            coords += [a, b]
        first = next(x for x in coords if x != 0)
        if first < 0:
            return
        v_q = np.array([(coords[2 * k] + TAU * coords[2 * k + 1]) / (2 * n) for k in range(4)])
        v_c = sum(fl[v] for v in containing_cell(simplex))
        w = factor * np.dot(v_q, v_c) / (np.linalg.norm(v_q) ** 4 * np.linalg.norm(v_c))
        key = tuple(coords)
        assert key not in out
        out[key] = (v_q / np.linalg.norm(v_q), w)

    for v in range(nv):
        add((v,), (n,), 5 / 6)
    for e in edges:
        for j in range(1, n):
            add(e, (n - j, j), 35 / 36)
    for f in faces:
        for j in range(1, n):
            for k in range(1, n - j):
                add(f, (n - j - k, j, k), 1.0)
    for c in cells:
        for j in range(1, n):
            for k in range(1, n - j):
                for m in range(1, n - j - k):
                    add(c, (n - j - k - m, j, k, m), 1.0)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_weights_and_points_match_slow_reference(n):
    s = sample_600cell(n)
    w = np.exp(s.log_weights)
    assert np.all(w > 0)
    np.testing.assert_allclose(w.sum(), 1, rtol=1e-13)
    if n == 1:
        np.testing.assert_allclose(w, 1 / 60, rtol=1e-13)
    ref = _reference_sampling_slow(n)
    assert len(ref) == s.n_rot
    ref_q = np.array([v[0] for v in ref.values()])
    ref_w = np.array([v[1] for v in ref.values()])
    ref_w /= ref_w.sum()
    # same points with the same sign (the half-sphere rule of the integer coordinates), same weights
    d, idx = cKDTree(ref_q).query(s.quaternions)
    assert d.max() < 1e-12
    assert len(np.unique(idx)) == s.n_rot
    np.testing.assert_allclose(w, ref_w[idx], rtol=1e-12)


def test_weights_unequal_and_symmetric_for_larger_n():
    s = sample_600cell(5)
    w = np.exp(s.log_weights)
    assert np.all(w > 0) and 1.3 < w.max() / w.min() < 2.0
    # the vertex points all carry the same weight (vertex-transitive polytope)
    np.testing.assert_allclose(w[:60], w[0], rtol=1e-12)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_sampled_quaternions_unit_unique_half_sphere(n):
    q = sample_600cell(n).quaternions
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-15)
    both = np.concatenate([q, -q])
    d, _ = cKDTree(both).query(both, k=2)
    assert d[:, 1].min() > 0.1 / n  # no duplicates up to sign
    # deterministic
    np.testing.assert_array_equal(sample_600cell(n).quaternions, q)


def test_half_sphere_rule_is_reference_rule_not_q0_sign():
    # vertex (1/(2 tau), ...) has a = -n, b = +n in its first component: positive value, but not kept
    q = sample_600cell(1).quaternions
    assert np.any(q[:, 0] < 0)
    inv = 1 / (2 * TAU)
    assert not np.any(np.isclose(q[:, 0], inv) & np.isclose(np.abs(q[:, 1]), 0.5) & np.isclose(q[:, 2], 0))


def test_spacing_mean_nearest_neighbour_and_covering_radius():
    """0.944/n (METHOD.md section 9.1) is the covering radius: the largest misorientation between any rotation
    and its nearest sample. The mean nearest-neighbour misorientation between samples is ~1.28/n."""
    for n in range(4, 9):
        q = sample_600cell(n).quaternions
        both = np.concatenate([q, -q])
        d, _ = cKDTree(both).query(q, k=2)
        mean_nn = np.mean(4 * np.arcsin(d[:, 1] / 2))
        assert 1.25 / n < mean_nn < 1.32 / n, (n, mean_nn * n)
        if n <= 6:
            hull = ConvexHull(both)  # facets = spherical Delaunay simplices; circumradius from facet offset
            covering = 2 * np.arccos(np.clip(-hull.equations[:, -1], -1, 1)).max()
            assert abs(covering - 0.944 / n) < 0.03 * 0.944 / n, (n, covering * n)


def test_large_n_count_and_weights():
    s = sample_600cell(10)
    assert s.n_rot == 50100
    np.testing.assert_allclose(np.exp(s.log_weights).sum(), 1, rtol=1e-12)


def test_subset_renormalises():
    s = sample_600cell(3)
    sub = s.subset(np.arange(0, s.n_rot, 7))
    np.testing.assert_allclose(np.exp(sub.log_weights).sum(), 1, rtol=1e-13)
    np.testing.assert_allclose(sub.log_weights - sub.log_weights[0], s.log_weights[::7] - s.log_weights[0], atol=1e-13)
    assert sub.n == 3 and sub.n_rot == len(range(0, s.n_rot, 7))
    mask = np.zeros(s.n_rot, bool)
    mask[:10] = True
    assert s.subset(mask).n_rot == 10
    with pytest.raises(ConfigError):
        RotationSampling(np.zeros((3, 4)), np.zeros(2))


# ------------------------------------------------------------------------------------------------ point group


def ops_422():
    """The 8 proper rotations of 422 (4-fold along z), identity first, as Cartesian matrices."""
    rz = lambda k: quaternion_to_matrix(np.array([np.cos(k * np.pi / 4), 0, 0, np.sin(k * np.pi / 4)]))
    two = lambda phi: quaternion_to_matrix(np.array([0, np.cos(phi), np.sin(phi), 0]))
    ops = [rz(k) for k in range(4)] + [two(k * np.pi / 4) for k in range(4)]
    ops = np.round(np.array(ops), 14)
    # closure
    prods = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 9)
    assert cKDTree(ops.reshape(-1, 9)).query(prods)[0].max() < 1e-12
    return ops


def images(q, ops):
    """(m, n_ops, 4) quaternions of the orientations with crystal_from_lab = g @ crystal_from_lab(q)."""
    h = matrix_to_quaternion(ops)
    return quaternion_multiply(q[:, None, :], quaternion_conjugate(h)[None])


def test_image_definition_matches_crystal_from_lab():
    ops = ops_422()
    q = random_quaternions(10, 7)
    img = images(q, ops)
    np.testing.assert_allclose(crystal_from_lab(img), np.einsum("gij,mjk->mgik", ops, crystal_from_lab(q)), atol=1e-13)


def test_reduce_422_on_600cell():
    ops = ops_422()
    n = 6
    s = sample_600cell(n)
    keep = reduce_by_point_group(s, ops)
    assert np.all(np.diff(keep) > 0)
    assert abs(len(keep) - s.n_rot / 8) < 0.1 * s.n_rot / 8
    kept_q = s.quaternions[keep]
    # every kept rotation has the largest |q0| of its images
    assert np.all(np.abs(kept_q[:, 0]) >= np.abs(images(kept_q, ops)[..., 0]).max(axis=1) - 1e-9)
    # no two kept rotations are equivalent
    tree_kept = cKDTree(np.concatenate([kept_q, -kept_q]))
    d, _ = tree_kept.query(images(kept_q, ops)[:, 1:].reshape(-1, 4))
    assert d.min() > 1e-9
    # coverage: every rotation has an image within about one grid spacing of a kept rotation
    d_all, _ = tree_kept.query(images(s.quaternions, ops).reshape(-1, 4))
    best = 4 * np.arcsin(np.minimum(1, d_all.reshape(s.n_rot, 8).min(axis=1) / 2))
    assert best.max() < 1.3 / n, best.max() * n
    sub = s.subset(keep)
    np.testing.assert_allclose(np.exp(sub.log_weights).sum(), 1, rtol=1e-12)


def test_reduce_invariant_set_keeps_one_per_orbit_with_ties():
    ops = ops_422()
    base = random_quaternions(40, 8)
    # boundary cases with ties in |q0|: 45 degrees about z, 90 about x (2-fold axis image), 180 about z
    c, s8 = np.cos(np.pi / 8), np.sin(np.pi / 8)
    base = np.concatenate([base, [[c, 0, 0, s8], [np.cos(np.pi / 4), np.sin(np.pi / 4), 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]])
    orbit = images(base, ops)  # (m, 8, 4): one full orbit per base rotation
    # the group acts freely (orbits have 8 distinct rotations); store each with a random sign
    signs = np.random.default_rng(12).choice([-1.0, 1.0], size=orbit.shape[:2])
    members = (signs[..., None] * orbit).reshape(-1, 4)
    orbit_id = np.repeat(np.arange(len(base)), 8)
    # the special rotations give ties in the primary key |q0| (e.g. +-45 degrees about z)
    absq0 = np.abs(orbit[..., 0])
    assert np.sum(np.isclose(absq0, absq0.max(axis=1, keepdims=True), atol=1e-12, rtol=0), axis=1)[-4:-2].min() >= 2
    keep = reduce_by_point_group(members, ops)
    assert len(keep) == len(base)
    assert sorted(orbit_id[keep].tolist()) == list(range(len(base)))


def test_reduce_rejects_improper_ops():
    with pytest.raises(ConfigError):
        reduce_by_point_group(random_quaternions(5), np.array([np.eye(3), -np.eye(3)]))
    with pytest.raises(ConfigError):
        reduce_by_point_group(random_quaternions(5), np.eye(3))


# ------------------------------------------------------------------------------------------------ neighbours


def test_neighbours_match_brute_force_across_the_sphere():
    s = sample_600cell(4)
    q = s.quaternions
    rng = np.random.default_rng(9)
    q0_zero = random_quaternions(40, 10)
    q0_zero[:, 0] = 0
    q0_zero /= np.linalg.norm(q0_zero, axis=1, keepdims=True)
    q0_tiny = q0_zero.copy()
    q0_tiny[:, 0] = rng.choice([-1e-7, 1e-7], size=40)
    queries = np.concatenate(
        [random_quaternions(60, 11), q0_zero, q0_tiny, q[:30], -q[30:60], q[np.abs(q[:, 0]) < 0.05][:30]]
    )
    max_angle = 0.37
    offsets, idx = neighbours(s, queries, max_angle)
    assert offsets.shape == (len(queries) + 1,) and offsets[0] == 0 and offsets[-1] == len(idx)
    ang = 2 * np.arccos(np.minimum(1, np.abs(queries / np.linalg.norm(queries, axis=1, keepdims=True) @ q.T)))
    assert np.abs(ang - max_angle).min() > 1e-9  # no boundary ties in this test
    crosses = 0
    for i in range(len(queries)):
        got = idx[offsets[i] : offsets[i + 1]]
        assert np.all(np.diff(got) > 0)
        expected = np.flatnonzero(ang[i] <= max_angle)
        np.testing.assert_array_equal(got, expected)
        crosses += np.sum(queries[i] @ q[got].T < 0)
    assert crosses > 0  # the test exercises neighbours stored with the opposite sign
    # the same from a plain array and a single query
    o2, i2 = neighbours(q, queries[0], max_angle)
    np.testing.assert_array_equal(i2, idx[offsets[0] : offsets[1]])
    # angle 0: only exact matches; angle >= pi: everything
    o3, i3 = neighbours(s, q[:5], 0.0)
    np.testing.assert_array_equal(i3, np.arange(5))
    o4, i4 = neighbours(s, q[:2], np.pi)
    assert np.all(np.diff(o4) == s.n_rot)
    with pytest.raises(ConfigError):
        neighbours(s, q[:2], -1.0)
