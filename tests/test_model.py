"""Tests of emcjax.model: the lattice-aligned voxel grid, symmetry, trilinear slicing, in-peak entries.

Every kernel is compared with a direct, independently written numpy float64 reference (plain loops over
points and corners, Python dicts for the lookups); the JAX kernels are float32, so comparisons allow
float32 rounding.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import model
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.errors import ConfigError
from emcjax.rotations import quaternion_to_matrix

TETRA = ((79.1, 79.1, 37.9, 90.0, 90.0, 90.0), "P 43 21 2")
MONO = ((40.0, 50.0, 60.0, 90.0, 105.0, 90.0), "P 1 21 1")
HEXA = ((50.0, 50.0, 120.0, 90.0, 90.0, 120.0), "P 61 2 2")

# (cell, space group, d_min, d_max, vn, gw)
CASES = {
    "tetragonal": (*TETRA, 8.0, 40.0, 10, 2.0),
    "tetragonal_coarse": (*TETRA, 8.0, math.inf, 4, 1.5),
    "monoclinic": (*MONO, 10.0, 30.0, 10, 2.0),
    "hexagonal": (*HEXA, 10.0, math.inf, 10, 2.0),
}


def absent_rule(space_group: str, h: int, k: int, l: int) -> bool:
    """Systematic absences written out by hand (International Tables) for the three test groups."""
    if space_group == "P 43 21 2":
        return (h == 0 and k == 0 and l % 4 != 0) or (k == 0 and l == 0 and h % 2 != 0) or (
            h == 0 and l == 0 and k % 2 != 0
        )
    if space_group == "P 1 21 1":
        return h == 0 and l == 0 and k % 2 != 0
    if space_group == "P 61 2 2":
        return h == 0 and k == 0 and l % 6 != 0
    raise AssertionError(space_group)


_GRIDS: dict = {}


def get_grid(name: str) -> model.ReciprocalGrid:
    if name not in _GRIDS:
        cell, sg, d_min, d_max, vn, gw = CASES[name]
        _GRIDS[name] = model.make_grid(Crystal(cell=cell, space_group=sg), d_min=d_min, d_max=d_max, vn=vn, gw=gw)
    return _GRIDS[name]


def random_model(grid: model.ReciprocalGrid, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, size=grid.model_shape).astype(np.float32)


def stabilizers(grid: model.ReciprocalGrid) -> list[np.ndarray]:
    """For each ASU reflection a, the ops g with M_g a == a (always contains the identity)."""
    images = np.einsum("gij,aj->gai", grid.crystal.laue_ops, grid.asu.hkl)
    fixed = np.all(images == grid.asu.hkl[None], axis=2)  # (n_ops, n_asu)
    return [np.flatnonzero(fixed[:, a]) for a in range(grid.n_asu)]


def symmetric_model(grid: model.ReciprocalGrid, seed: int = 0) -> np.ndarray:
    """Random ASU model whose special reflections are invariant under their stabilizer (a physical model).

    A reflection on a symmetry element (e.g. hk0 under the mirror of 4/mmm) is its own mate, so its profile
    must be invariant under the ops fixing it: I[a, perm[s, :]] == I[a, :]. ASU storage cannot enforce
    that; a random model violates it.
    """
    raw = random_model(grid, seed).astype(np.float64)
    out = raw.copy()
    for a, ops in enumerate(stabilizers(grid)):
        out[a] = raw[a][grid.perm[ops]].mean(axis=0)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------- numpy reference
class Reference:
    """Independent float64 evaluation of W(q) (METHOD.md §5.2), one point at a time."""

    def __init__(self, grid: model.ReciprocalGrid, intensity: np.ndarray):
        self.B = np.asarray(grid.crystal.reciprocal_basis, np.float64)
        self.Binv = np.linalg.inv(self.B)
        self.N = np.asarray(grid.divisions, np.float64)
        self.radius = float(grid.radius)
        self.refl = {tuple(h): i for i, h in enumerate(grid.hkl.tolist())}
        self.vox = {tuple(o): j for j, o in enumerate(grid.offsets.tolist())}
        self.index = np.asarray(grid.asu.index)
        self.op = np.asarray(grid.asu.op)
        self.perm = np.asarray(grid.perm)
        self.intensity = np.asarray(intensity, np.float64)

    def reflection(self, q: np.ndarray) -> int:
        """Index in grid.hkl of the peak containing q, or -1."""
        frac = self.Binv @ q
        h = np.rint(frac)
        if np.linalg.norm(q - self.B @ h) > self.radius:
            return -1
        return self.refl.get(tuple(int(x) for x in h), -1)

    def boundary_distance(self, q: np.ndarray) -> float:
        """| |q - B h_nearest| - radius | / radius."""
        h = np.rint(self.Binv @ q)
        return abs(np.linalg.norm(q - self.B @ h) - self.radius) / self.radius

    def value(self, q: np.ndarray) -> float:
        r = self.reflection(q)
        if r < 0:
            return 0.0
        frac = self.Binv @ q
        u = self.N * (frac - np.rint(frac))
        base = np.floor(u)
        total = 0.0
        for corner in itertools.product((0, 1), repeat=3):
            c = base + np.asarray(corner)
            j = self.vox.get(tuple(int(x) for x in c))
            if j is None:
                continue
            w = np.prod(1.0 - np.abs(u - c))
            total += w * self.intensity[self.index[r], self.perm[self.op[r], j]]
        return total

    def values(self, q: np.ndarray) -> np.ndarray:
        return np.array([self.value(p) for p in np.asarray(q, np.float64).reshape(-1, 3)])


def points_near_peaks(grid: model.ReciprocalGrid, n: int, seed: int, spread: float = 1.15) -> np.ndarray:
    """(n, 3) float32-representable crystal-frame points uniform in balls of radius spread*radius."""
    rng = np.random.default_rng(seed)
    centres = grid.hkl[rng.integers(0, grid.n_refl, size=n)] @ grid.crystal.reciprocal_basis.T
    d = rng.normal(size=(n, 3))
    d *= (spread * grid.radius * rng.uniform(size=(n, 1)) ** (1 / 3)) / np.linalg.norm(d, axis=1, keepdims=True)
    return (centres + d).astype(np.float32).astype(np.float64)


def small_detector(resolution: float = 8.0):
    geo = DetectorGeometry(
        num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5),
        resolution_max_A=resolution, n_shells=10,
    )
    return make_detector(geo)


def random_quaternions(n: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- make_grid
@pytest.mark.parametrize("name", list(CASES))
def test_offsets_are_exactly_the_lattice_points_in_the_support_sphere(name):
    grid = get_grid(name)
    B = grid.crystal.reciprocal_basis
    N = grid.divisions
    cell, sg, d_min, d_max, vn, gw = CASES[name]
    assert grid.radius == pytest.approx(gw * np.linalg.norm(B, axis=0).min() / vn, rel=1e-12)
    expected = set()
    # Generous box: radius < half a lattice spacing, so |o_i| < N_i / 2.
    for o in itertools.product(*[range(-int(n), int(n) + 1) for n in N]):
        dq = B @ (np.asarray(o) / N)
        if np.linalg.norm(dq) <= grid.radius * (1 + 1e-9):
            expected.add(o)
    got = [tuple(o) for o in grid.offsets.tolist()]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert (0, 0, 0) in expected
    # The support is centro-symmetric.
    assert set(got) == {tuple(-x for x in o) for o in got}


@pytest.mark.parametrize("name", list(CASES))
def test_reflections_whole_sphere_in_shell_and_no_absences(name):
    grid = get_grid(name)
    cell, sg, d_min, d_max, vn, gw = CASES[name]
    B = grid.crystal.reciprocal_basis
    q_min = 0.0 if math.isinf(d_max) else 1.0 / d_max
    q_max = 1.0 / d_min
    assert grid.q_min == pytest.approx(q_min) and grid.q_max == pytest.approx(q_max)
    hmax = np.ceil(q_max * np.linalg.norm(grid.crystal.real_basis, axis=0)).astype(int) + 1
    expected = set()
    for h in itertools.product(*[range(-m, m + 1) for m in hmax]):
        if h == (0, 0, 0) or absent_rule(sg, *h):
            continue
        q = np.linalg.norm(B @ np.asarray(h, float))
        if q - grid.radius >= q_min - 1e-12 and q + grid.radius <= q_max + 1e-12:
            expected.add(h)
    got = [tuple(h) for h in grid.hkl.tolist()]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert not any(absent_rule(sg, *h) for h in got)
    # Every kept reflection's whole sphere lies in the shell.
    qn = np.linalg.norm(grid.hkl @ B.T, axis=1)
    assert np.all(qn - grid.radius >= q_min - 1e-12) and np.all(qn + grid.radius <= q_max + 1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_perm_maps_offsets_like_the_laue_operators(name):
    grid = get_grid(name)
    crystal = grid.crystal
    D = np.diag(grid.divisions.astype(float))
    vq = grid.voxel_q()
    n_vox = grid.n_voxels
    assert grid.perm.shape == (crystal.n_ops, n_vox)
    assert np.array_equal(grid.perm[0], np.arange(n_vox))  # identity first
    for g, (m, r) in enumerate(zip(crystal.laue_ops, crystal.laue_ops_cartesian)):
        assert np.array_equal(np.sort(grid.perm[g]), np.arange(n_vox))
        conj = D @ np.linalg.inv(m.astype(float)) @ np.linalg.inv(D)
        mapped = grid.offsets @ conj.T
        assert np.allclose(mapped, np.rint(mapped), atol=1e-9)
        assert np.array_equal(grid.offsets[grid.perm[g]], np.rint(mapped).astype(int))
        # Cartesian: voxel j of a mate M h shows the representative's voxel at offset R^-1 dq_j.
        np.testing.assert_allclose(vq[grid.perm[g]], vq @ np.linalg.inv(r).T, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_asu_expansion_is_consistent_for_every_mate(name):
    """full[M_g h, j] == full[h, perm[g, j]] for every reflection h and op g with M_g h in the grid."""
    grid = get_grid(name)
    intensity = symmetric_model(grid, seed=1)
    padded = np.concatenate([intensity.reshape(-1), [0.0]])
    full = padded[grid.full_to_asu()]  # (n_refl, n_voxels + 1)
    assert np.all(full[:, -1] == 0)
    full = full[:, :-1]
    # Row h is the representative's voxels read through perm[op[h]].
    a, op = grid.asu.index, grid.asu.op
    assert np.array_equal(grid.asu.hkl[a], np.einsum("nij,nj->ni", np.linalg.inv(grid.crystal.laue_ops[op]).round().astype(int), grid.hkl))
    index = {tuple(h): i for i, h in enumerate(grid.hkl.tolist())}
    n_checked = 0
    for g, m in enumerate(grid.crystal.laue_ops):
        mates = grid.hkl @ m.T
        for i, h2 in enumerate(mates.tolist()):
            i2 = index.get(tuple(h2))
            if i2 is None:  # mate outside the shell can't happen: |M h| = |h|
                raise AssertionError(f"mate {h2} of {grid.hkl[i]} missing")
            np.testing.assert_array_equal(full[i2], full[i, grid.perm[g]])
            n_checked += 1
    assert n_checked == grid.n_refl * grid.crystal.n_ops


@pytest.mark.parametrize("name", ["tetragonal", "monoclinic", "hexagonal"])
def test_asu_expansion_general_reflections_need_no_symmetrisation(name):
    """Without stabilizer symmetrisation the expansion is still consistent on general reflections, and
    inconsistent exactly on the special ones (documents that the ASU model itself must be symmetrised)."""
    grid = get_grid(name)
    intensity = random_model(grid, seed=1)
    full = np.concatenate([intensity.reshape(-1), [0.0]])[grid.full_to_asu()][:, :-1]
    special = np.array([len(s) > 1 for s in stabilizers(grid)])[grid.asu.index]
    assert special.any() and not special.all()
    index = {tuple(h): i for i, h in enumerate(grid.hkl.tolist())}
    consistent = np.ones(grid.n_refl, bool)
    for g, m in enumerate(grid.crystal.laue_ops):
        i2 = np.array([index[tuple(h)] for h in (grid.hkl @ m.T).tolist()])
        consistent &= np.all(full[i2] == full[:, grid.perm[g]], axis=1)
    assert np.array_equal(consistent, ~special)


@pytest.mark.parametrize("name", ["tetragonal", "tetragonal_coarse", "monoclinic"])
def test_model_is_laue_invariant_at_arbitrary_points(name):
    """W(R_g q) == W(q) for random q near peaks: exact here because D M D^-1 is a signed permutation."""
    grid = get_grid(name)
    intensity = jnp.asarray(symmetric_model(grid, seed=2))
    q = points_near_peaks(grid, 400, seed=3)
    ref = Reference(grid, np.asarray(intensity))
    # Keep away from the support boundary, where float32 may decide in/out differently for q and R q.
    q = q[[ref.boundary_distance(p) > 1e-4 for p in q]]
    w0 = np.asarray(model.slice_points(intensity, jnp.asarray(q, jnp.float32), grid.tables))
    assert np.count_nonzero(w0) > 0.5 * len(q)
    for r in grid.crystal.laue_ops_cartesian:
        w = np.asarray(model.slice_points(intensity, jnp.asarray(q @ r.T, jnp.float32), grid.tables))
        np.testing.assert_allclose(w, w0, rtol=0, atol=2e-5)


def test_hexagonal_model_is_laue_invariant_at_grid_nodes():
    """Hexagonal 3-fold ops are not signed permutations of grid axes, so trilinear interpolation is only
    equivariant at the grid nodes; there W(R_g q) == W(q) must hold exactly."""
    grid = get_grid("hexagonal")
    intensity = jnp.asarray(symmetric_model(grid, seed=4))
    rng = np.random.default_rng(5)
    vq = grid.voxel_q()
    inner = np.flatnonzero(np.linalg.norm(vq, axis=1) < 0.99 * grid.radius)
    refl = rng.integers(0, grid.n_refl, size=300)
    vox = inner[rng.integers(0, inner.size, size=300)]
    q = grid.hkl[refl] @ grid.crystal.reciprocal_basis.T + vq[vox]
    w0 = np.asarray(model.slice_points(intensity, jnp.asarray(q, jnp.float32), grid.tables))
    full = np.concatenate([np.asarray(intensity).reshape(-1), [0]])[grid.full_to_asu()]
    np.testing.assert_allclose(w0, full[refl, vox], atol=2e-4)
    for r in grid.crystal.laue_ops_cartesian:
        w = np.asarray(model.slice_points(intensity, jnp.asarray(q @ r.T, jnp.float32), grid.tables))
        np.testing.assert_allclose(w, w0, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("name", list(CASES))
def test_slice_points_matches_float64_trilinear_loop(name):
    grid = get_grid(name)
    intensity = random_model(grid, seed=6)
    ref = Reference(grid, intensity)
    q = points_near_peaks(grid, 600, seed=7)
    # Also points far from any peak and beyond the shell (must be zero).
    far = np.random.default_rng(8).uniform(-1.5 * grid.q_max, 1.5 * grid.q_max, size=(200, 3))
    q = np.concatenate([q, far.astype(np.float32).astype(np.float64)])
    q = q[[ref.boundary_distance(p) > 1e-4 for p in q]]
    expected = ref.values(q)
    got = np.asarray(model.slice_points(jnp.asarray(intensity), jnp.asarray(q, jnp.float32), grid.tables))
    assert np.count_nonzero(expected) > 300
    assert np.array_equal(got == 0, expected == 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * intensity.max())
    # Shape is preserved for batched inputs.
    got2 = model.slice_points(jnp.asarray(intensity), jnp.asarray(q[:40].reshape(4, 10, 3), jnp.float32), grid.tables)
    assert got2.shape == (4, 10)
    np.testing.assert_allclose(np.asarray(got2).ravel(), got[:40], rtol=1e-6)


def test_slice_points_is_not_renormalised():
    grid = get_grid("tetragonal")
    intensity = np.zeros(grid.model_shape, np.float32)
    intensity[:] = 1.0  # constant model: renormalisation would give exactly 1 everywhere inside
    q = points_near_peaks(grid, 500, seed=9, spread=1.0)
    ref = Reference(grid, intensity)
    q = q[[ref.boundary_distance(p) > 1e-4 for p in q]]
    w = np.asarray(model.slice_points(jnp.asarray(intensity), jnp.asarray(q, jnp.float32), grid.tables))
    assert np.all(w <= 1 + 1e-5)
    assert np.any(w[w > 0] < 0.9)  # points near the edge lose the dropped corners
    # Deep inside (all 8 corners inside the support) the weights sum to 1.
    frac = q @ np.linalg.inv(grid.crystal.reciprocal_basis).T
    u = grid.divisions * (frac - np.rint(frac))
    corners = np.floor(u)[:, None, :] + np.array(list(itertools.product((0, 1), repeat=3)))[None]
    all_in = np.array([all(tuple(int(x) for x in c) in ref.vox for c in cs) for cs in corners])
    deep = all_in & np.array([ref.reflection(p) >= 0 for p in q])
    assert deep.sum() > 10
    np.testing.assert_allclose(w[deep], 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- entries
@pytest.mark.parametrize("name", ["tetragonal_coarse", "monoclinic"])
def test_build_entries_matches_brute_force(name):
    grid = get_grid(name)
    det = small_detector(8.0 if name.startswith("tetra") else 10.0)
    quats = random_quaternions(7, seed=10)
    quats[0] = [1.0, 0.0, 0.0, 0.0]
    entries = model.build_entries(grid, det.q, quats, chunk=4)
    intensity = random_model(grid, seed=11)
    ref = Reference(grid, intensity)
    rot = np.asarray(entries.rotation)
    pix = np.asarray(entries.pixel)
    assert entries.n_rot == 7 and entries.voxels.shape == (rot.size, 8) and entries.weights.shape == (rot.size, 8)
    order = np.lexsort((pix, rot))
    assert np.array_equal(order, np.arange(rot.size)), "entries sorted by rotation then pixel"
    got = set(zip(rot.tolist(), pix.tolist()))
    assert len(got) == rot.size
    expected, ambiguous = set(), set()
    q_all = []
    for r, qt in enumerate(quats):
        # crystal_from_lab(q) = R(q)^T, written out here with the active matrix.
        q_crys = det.q @ quaternion_to_matrix(qt.astype(np.float64))  # (R^T q_lab)^T = q_lab^T R
        q_all.append(q_crys)
        for t, p in enumerate(q_crys):
            if ref.reflection(p) >= 0:
                expected.add((r, t))
            if ref.boundary_distance(p) < 1e-5:
                ambiguous.add((r, t))
    assert len(expected) > 30
    assert (got ^ expected) <= ambiguous
    # The tomogram is W at the rotated pixels.
    tomo = np.asarray(model.tomogram(jnp.asarray(intensity), entries))
    q_ent = np.stack([q_all[r][t] for r, t in zip(rot, pix)])
    want = ref.values(q_ent)
    ok = np.array([(r, t) not in ambiguous for r, t in zip(rot, pix)])
    np.testing.assert_allclose(tomo[ok], want[ok], rtol=1e-4, atol=1e-5)
    sliced = np.asarray(model.slice_points(jnp.asarray(intensity), jnp.asarray(q_ent, jnp.float32), grid.tables))
    np.testing.assert_allclose(tomo[ok], sliced[ok], rtol=1e-4, atol=1e-5)
    # Weights are the trilinear weights: each in [0, 1] and summing to <= 1.
    wts = np.asarray(entries.weights)
    assert np.all(wts >= 0) and np.all(wts.sum(axis=1) <= 1 + 1e-5)


def test_expected_signal_matches_loop():
    grid = get_grid("tetragonal")
    det = small_detector(8.0)
    quats = random_quaternions(5, seed=12)
    entries = model.build_entries(grid, det.q, quats)
    intensity = random_model(grid, seed=13)
    ref = Reference(grid, intensity)
    n_shells = det.geometry.n_shells
    got = np.asarray(
        model.expected_signal(
            jnp.asarray(intensity), entries, jnp.asarray(det.polarization, jnp.float32),
            jnp.asarray(det.shell, jnp.int32), n_shells,
        )
    )
    assert got.shape == (5, n_shells)
    expected = np.zeros((5, n_shells))
    for r, qt in enumerate(quats):
        R = quaternion_to_matrix(qt)
        for t in range(det.n_pix):
            expected[r, det.shell[t]] += det.polarization[t] * ref.value(R.T @ det.q[t])
    assert np.all(expected.sum(axis=1) > 0)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- errors
def test_make_grid_rejects_bad_vn_and_overlapping_peaks():
    crystal = Crystal(cell=TETRA[0], space_group=TETRA[1])
    with pytest.raises(ConfigError, match="vn"):
        model.make_grid(crystal, d_min=8.0, d_max=math.inf, vn=0)
    with pytest.raises(ConfigError, match="gw"):
        model.make_grid(crystal, d_min=8.0, d_max=math.inf, vn=10, gw=0.0)
    with pytest.raises(ConfigError, match="overlap"):
        model.make_grid(crystal, d_min=8.0, d_max=math.inf, vn=4, gw=2.0)
    with pytest.raises(ConfigError, match="overlap"):
        model.make_grid(crystal, d_min=8.0, d_max=math.inf, vn=10, gw=7.0)
    # Just below the limit is fine, and the peaks indeed do not overlap.
    grid = model.make_grid(crystal, d_min=8.0, d_max=math.inf, vn=4, gw=1.9)
    assert 2 * grid.radius < np.linalg.norm(crystal.reciprocal_basis, axis=0).min()
