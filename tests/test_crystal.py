"""Tests for emcjax.crystal: cell/space-group validation, Laue operators, reflections, ASU, voxel grid."""

import itertools
import pickle

import gemmi
import numpy as np
import pytest

from emcjax.crystal import (
    AsymmetricUnit,
    Crystal,
    asymmetric_unit,
    is_absent,
    lattice_grid_divisions,
    reflections,
)
from emcjax.errors import ConfigError, EmcjaxError

CASES = {
    "P 1": ((30, 40, 50, 80, 95, 105), 2),
    "P 1 21 1": ((40, 50, 60, 90, 105, 90), 4),
    "P 21 21 21": ((40, 50, 60, 90, 90, 90), 8),
    "P 43 21 2": ((79.1, 79.1, 37.9, 90, 90, 90), 16),
    "P 61 2 2": ((50, 50, 120, 90, 90, 120), 24),
    "I 21 3": ((80, 80, 80, 90, 90, 90), 24),
    "R 3": ((60, 60, 140, 90, 90, 120), 6),
    "H 3": ((60, 60, 140, 90, 90, 120), 6),
    "R 3:R": ((50, 50, 50, 80, 80, 80), 6),
    "P 1 21/c 1": ((40, 50, 60, 90, 105, 90), 4),
    "19": ((40, 50, 60, 90, 90, 90), 8),
}

LYSO = ((79.1, 79.1, 37.9, 90, 90, 90), "P 43 21 2")


@pytest.fixture(scope="module")
def crystals():
    return {sg: Crystal(cell, sg) for sg, (cell, _) in CASES.items()}


def _set(hkl):
    return {tuple(int(x) for x in row) for row in hkl}


# ------------------------------------------------------------------------------------------ construction
def test_fields_stored():
    c = Crystal([79.1, 79.1, 37.9, 90, 90, 90], "P 43 21 2")
    assert c.cell == (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    assert isinstance(c.cell, tuple)
    assert c.space_group == "P 43 21 2"
    assert Crystal((60, 60, 140, 90, 90, 120), "R 3").space_group == "R 3"
    assert c == Crystal(*LYSO)
    assert hash(c) == hash(Crystal(*LYSO))
    _ = c.laue_ops, c.gemmi_ops  # populate caches holding gemmi objects
    c2 = pickle.loads(pickle.dumps(c))
    assert c2 == c and np.array_equal(c2.laue_ops, c.laue_ops)
    assert Crystal(LYSO[0], 96).space_group == 96 and Crystal(LYSO[0], 96).laue_ops.shape == (16, 3, 3)


@pytest.mark.parametrize("sg", sorted(CASES))
def test_laue_group_order(crystals, sg):
    c = crystals[sg]
    ops = c.laue_ops
    assert ops.dtype == np.int32 and ops.shape == (CASES[sg][1], 3, 3)
    assert np.array_equal(ops[0], np.eye(3))
    assert len(_set(ops.reshape(len(ops), 9))) == len(ops)  # distinct
    # inversion included; second half is minus first half; first half are the proper rotations
    half = len(ops) // 2
    assert np.array_equal(ops[half:], -ops[:half])
    assert np.all(np.round(np.linalg.det(ops[:half])) == 1)
    assert c.rotation_ops_cartesian.shape == (half, 3, 3)
    assert np.allclose(c.rotation_ops_cartesian[0], np.eye(3))
    assert np.allclose(np.linalg.det(c.rotation_ops_cartesian), 1.0)


@pytest.mark.parametrize("sg", sorted(CASES))
def test_cartesian_ops_orthogonal_and_closed(crystals, sg):
    c = crystals[sg]
    r = c.laue_ops_cartesian
    assert r.dtype == np.float64
    assert np.allclose(np.einsum("nji,njk->nik", r, r), np.eye(3), atol=1e-10)
    # closure of the integer ops under products
    keys = _set(c.laue_ops.reshape(len(c.laue_ops), 9))
    prods = np.einsum("aij,bjk->abik", c.laue_ops, c.laue_ops).reshape(-1, 9)
    assert _set(prods) == keys
    # norm preservation on random hkl
    rng = np.random.default_rng(0)
    hkl = rng.integers(-20, 21, size=(50, 3))
    b = c.reciprocal_basis
    q = hkl @ b.T
    for m, rm in zip(c.laue_ops, r):
        assert np.allclose(np.linalg.norm((hkl @ m.T) @ b.T, axis=1), np.linalg.norm(q, axis=1))
        assert np.allclose(rm @ b, b @ m)


@pytest.mark.parametrize("sg", sorted(CASES))
def test_bases(crystals, sg):
    c = crystals[sg]
    a, b = c.real_basis, c.reciprocal_basis
    assert a.shape == b.shape == (3, 3) and a.dtype == b.dtype == np.float64
    assert np.allclose(a.T @ b, np.eye(3))
    assert np.allclose(np.linalg.norm(a, axis=0), c.cell[:3])
    assert abs(a[1, 0]) < 1e-12 and abs(a[2, 0]) < 1e-12 and abs(a[2, 1]) < 1e-12  # a along x, b in xy
    # |q| = 1/d agrees with gemmi
    hkl = np.array([[1, 2, 3], [-4, 0, 5], [2, -3, -1]], dtype=np.int32)
    d2 = c.gemmi_cell.calculate_1_d2_array(hkl)
    assert np.allclose(np.sum((hkl @ b.T) ** 2, axis=1), d2)


@pytest.mark.parametrize("sg", sorted(CASES))
def test_ops_map_reflection_set_onto_itself(crystals, sg):
    c = crystals[sg]
    hkl = reflections(c, d_min=6.0, d_max=30.0, margin=0.003)
    assert len(hkl) > 50
    s = _set(hkl)
    for m in c.laue_ops:
        assert _set(hkl @ m.T) == s


# ------------------------------------------------------------------------------------------ reflections
def test_reflections_sorted_shell_and_no_absent(crystals):
    c = crystals["P 43 21 2"]
    d_min, d_max, margin = 4.0, 40.0, 0.002
    hkl = reflections(c, d_min, d_max, margin)
    assert hkl.dtype == np.int32 and hkl.shape[1] == 3
    assert np.all(np.lexsort(hkl.T[::-1]) == np.arange(len(hkl)))
    q = np.linalg.norm(hkl @ c.reciprocal_basis.T, axis=1)
    assert q.min() >= 1 / d_max + margin and q.max() <= 1 / d_min - margin
    assert not np.any(np.all(hkl == 0, axis=1))
    assert not np.any(is_absent(c, hkl))
    assert len(_set(hkl)) == len(hkl)
    # without limits: every allowed reflection with |q| <= 1/d_min
    full = reflections(c, d_min)
    assert len(full) > len(hkl)
    assert _set(hkl) <= _set(full)


def test_reflections_oblique_triclinic_matches_brute_force():
    c = Crystal((25, 40, 60, 55, 65, 115), "P 1")
    d_min, d_max, margin = 5.0, 12.0, 0.004
    hkl = reflections(c, d_min, d_max, margin)
    box = np.array(list(itertools.product(range(-30, 31), repeat=3)), dtype=np.int32)
    inv_d = np.sqrt(c.gemmi_cell.calculate_1_d2_array(box))  # independent code path (gemmi)
    keep = (inv_d >= 1 / d_max + margin) & (inv_d <= 1 / d_min - margin)
    brute = box[keep]
    # the brute-force box must not be the limiting factor
    assert np.abs(brute).max() < 30
    assert _set(hkl) == _set(brute)
    assert len(hkl) == len(brute)


def test_reflections_bad_args(crystals):
    c = crystals["P 1"]
    with pytest.raises(ConfigError, match="d_min"):
        reflections(c, 0.0)
    with pytest.raises(ConfigError, match="d_max"):
        reflections(c, 4.0, 3.0)
    with pytest.raises(ConfigError, match="margin"):
        reflections(c, 4.0, margin=-1.0)
    assert reflections(c, 4.0, 4.1, margin=0.1).shape == (0, 3)


# ------------------------------------------------------------------------------------------ absences
@pytest.mark.parametrize(
    "sg, rule",
    [
        ("P 21 21 21", lambda h, k, l: (k == 0) & (l == 0) & (h % 2 == 1)
         | (h == 0) & (l == 0) & (k % 2 == 1) | (h == 0) & (k == 0) & (l % 2 == 1)),
        ("P 43 21 2", lambda h, k, l: (h == 0) & (k == 0) & (l % 4 != 0)
         | (k == 0) & (l == 0) & (h % 2 == 1) | (h == 0) & (l == 0) & (k % 2 == 1)),
        ("I 21 3", lambda h, k, l: (h + k + l) % 2 == 1),
        ("R 3", lambda h, k, l: (-h + k + l) % 3 != 0),
        ("P 1", lambda h, k, l: np.zeros_like(h, dtype=bool)),
    ],
)
def test_absences(crystals, sg, rule):
    c = crystals[sg]
    box = np.array(list(itertools.product(range(-8, 9), repeat=3)), dtype=np.int32)
    box = box[np.any(box != 0, axis=1)]
    absent = is_absent(c, box)
    assert absent.dtype == bool and absent.shape == (len(box),)
    assert np.array_equal(absent, rule(*box.T))
    kept = reflections(c, 8.0)
    assert not np.any(rule(*kept.T))


def test_absences_examples(crystals):
    c = crystals["P 43 21 2"]
    assert list(is_absent(c, [[0, 0, 4], [0, 0, 2], [3, 0, 0], [2, 0, 0], [1, 1, 1]])) == [
        False, True, True, False, False]


# ------------------------------------------------------------------------------------------ asymmetric unit
@pytest.mark.parametrize("sg", sorted(CASES))
def test_asymmetric_unit_reconstructs(crystals, sg):
    c = crystals[sg]
    hkl = reflections(c, 5.0, margin=0.001)
    a = asymmetric_unit(c, hkl)
    assert isinstance(a, AsymmetricUnit)
    n = len(hkl)
    assert a.hkl.dtype == a.index.dtype == a.op.dtype == a.multiplicity.dtype == np.int32
    assert a.index.shape == a.op.shape == (n,) and a.multiplicity.shape == (a.n_asu,)
    # exact reconstruction
    rec = np.einsum("nij,nj->ni", c.laue_ops[a.op], a.hkl[a.index])
    assert np.array_equal(rec, hkl)
    assert a.multiplicity.sum() == n
    assert np.array_equal(a.multiplicity, np.bincount(a.index, minlength=a.n_asu))
    # representatives unique, sorted, in gemmi's reciprocal ASU
    assert len(_set(a.hkl)) == a.n_asu
    assert np.all(np.lexsort(a.hkl.T[::-1]) == np.arange(a.n_asu))
    gasu = gemmi.ReciprocalAsu(c.gemmi_space_group)
    assert all(gasu.is_in([int(x) for x in r]) for r in a.hkl)
    # members of one orbit share the index; different orbits do not
    all_hkl = _set(hkl)
    for i in range(0, n, max(1, n // 40)):
        mates = _set(np.einsum("oij,j->oi", c.laue_ops, hkl[i]))
        same = _set(hkl[a.index == a.index[i]])
        assert same == mates & all_hkl
    # the kept set is symmetric, so every orbit is complete: multiplicity == orbit size
    images = np.einsum("oij,nj->noi", c.laue_ops, a.hkl).astype(np.int64)  # (n_asu, n_ops, 3)
    code = np.sort((images[..., 0] * 1000 + images[..., 1]) * 1000 + images[..., 2], axis=1)
    orbit_size = 1 + np.count_nonzero(np.diff(code, axis=1), axis=1)
    assert np.array_equal(a.multiplicity, orbit_size)


def test_asymmetric_unit_lysozyme_count(crystals):
    c = crystals["P 43 21 2"]
    hkl = reflections(c, 4.0)
    a = asymmetric_unit(c, hkl)
    n = len(hkl)
    assert 15000 < n < 16000
    # general orbits have 16 members; orbits on the centric zones (hk0, h0l, hhl, ...) have 8 or fewer, so
    # n_asu is somewhat above n / 16 (by ~20 % here, because the short c axis makes l = 0 a large zone).
    assert 1.0 < a.n_asu * 16 / n < 1.3
    assert set(np.unique(a.multiplicity)) <= {2, 4, 8, 16}
    general = a.multiplicity == 16
    assert general.mean() > 0.6


def test_asymmetric_unit_partial_input():
    c = Crystal(*LYSO)
    hkl = reflections(c, 2.8)
    assert len(hkl) > 40000
    a = asymmetric_unit(c, hkl)
    # a subset whose orbit representatives are missing from the input still maps
    sub = hkl[hkl[:, 0] < 0]
    b = asymmetric_unit(c, sub)
    assert np.array_equal(np.einsum("nij,nj->ni", c.laue_ops[b.op], b.hkl[b.index]), sub)
    assert b.multiplicity.sum() == len(sub)
    assert _set(b.hkl) <= _set(a.hkl)
    e = asymmetric_unit(c, np.zeros((0, 3), int))
    assert e.hkl.shape == (0, 3) and e.index.shape == (0,)


# ------------------------------------------------------------------------------------------ voxel grid
def test_lattice_grid_divisions():
    c = Crystal(*LYSO)
    assert lattice_grid_divisions(c, 10) == (10, 10, 21)
    h = Crystal((50, 50, 120, 90, 90, 120), "P 61 2 2")
    n = lattice_grid_divisions(h, 10)
    assert n[0] == n[1]
    r = Crystal((60, 60, 140, 90, 90, 120), "R 3")
    n = lattice_grid_divisions(r, 7)
    assert n[0] == n[1]
    cub = Crystal((80, 80, 80, 90, 90, 90), "I 21 3")
    assert lattice_grid_divisions(cub, 5) == (5, 5, 5)
    tri = Crystal((30, 40, 50, 80, 95, 105), "P 1")
    nt = lattice_grid_divisions(tri, 10)
    assert min(nt) == 10
    rh = Crystal((50, 50, 50, 80, 80, 80), "R 3:R")
    assert len(set(lattice_grid_divisions(rh, 4))) == 1
    for cr in (c, h, r, cub, tri, rh):
        nd = np.diag(lattice_grid_divisions(cr, 10)).astype(float)
        for m in cr.laue_ops:
            t = np.linalg.inv(nd) @ m @ nd
            assert np.allclose(t, np.round(t))
    with pytest.raises(ConfigError, match="vn"):
        lattice_grid_divisions(c, 0)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "cell, sg, field",
    [
        ((79.1, 79.1, 37.9, 90, 90, 90), "P 99 99", "space_group"),
        ((79.1, 79.1, 37.9, 90, 90, 90), "", "space_group"),
        ((79.1, 79.1, 37.9, 90, 90, 90), None, "space_group"),
        ((79.1, 75.0, 37.9, 90, 90, 90), "P 43 21 2", "cell"),
        ((79.1, 79.1, 37.9, 90, 90, 100), "P 43 21 2", "cell"),
        ((50, 50, 120, 90, 90, 90), "P 61 2 2", "cell"),
        ((80, 80, 81, 90, 90, 90), "I 21 3", "cell"),
        ((40, 50, 60, 95, 105, 90), "P 1 21 1", "cell"),
        ((40, 50, 60, 90, 90, 95), "P 21 21 21", "cell"),
        ((-40, 50, 60, 90, 90, 90), "P 1", "cell"),
        ((40, 50, 60, 90, 90, 180), "P 1", "cell"),
        ((40, 50, 60, 10, 10, 90), "P 1", "cell"),
        ((40, 50, 60, 90, 90), "P 1", "cell"),
        ((40, 50, 60, 90, 90, float("nan")), "P 1", "cell"),
    ],
)
def test_invalid_config(cell, sg, field):
    with pytest.raises(ConfigError, match=rf"^{field}:") as exc:
        Crystal(cell, sg)
    assert isinstance(exc.value, EmcjaxError) and isinstance(exc.value, ValueError)
    if field == "space_group" and sg:
        assert repr(sg) in str(exc.value)
    if field == "cell":
        assert any(v in str(exc.value) for v in (str(cell[0]), str(float(cell[0]))))
