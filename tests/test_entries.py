"""Tests of emcjax.model.build_entries_by_reflection: the reflection-driven in-peak entries.

The reflection-driven builder must give exactly the entries of :func:`emcjax.model.build_entries` (which
tests every pixel against every rotation): same (rotation, pixel) pairs in the same order, same voxels and
weights. A pair may differ only if its pixel lies within 1e-5 (relative) of a peak sphere's boundary, where
float32 rounding of two differently written kernels may decide either way; the tests count such pairs
(none so far). The box half-width around a reflection's projection is checked against in-peak points
directly, including points on the Ewald sphere that are no pixel centres.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from emcjax import model
from emcjax.model import projection as model_projection
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.rotations import quaternion_to_matrix

TETRA = ((79.1, 79.1, 37.9, 90.0, 90.0, 90.0), "P 43 21 2")  # the simulator's default crystal
MONO = ((40.0, 50.0, 60.0, 90.0, 105.0, 90.0), "P 1 21 1")


def _mask(geometry: DetectorGeometry) -> np.ndarray:
    """Random dead pixels, a dead module gap and a dead corner block."""
    rng = np.random.default_rng(5)
    mask = rng.random((geometry.num_rows, geometry.num_cols)) < 0.1
    mask[:, 120:136] = True
    mask[:40, :70] = True
    return mask


# name: (cell and space group, geometry, mask or None)
CASES = {
    "default": (TETRA, DetectorGeometry(), None),
    "tilted_off_centre": (
        TETRA,
        DetectorGeometry(beam_direction=(0.01, -0.02, -1.0), beam_center_px=(100.3, 160.7)),
        None,
    ),
    "masked": (TETRA, DetectorGeometry(), _mask(DetectorGeometry())),
    "monoclinic": (MONO, DetectorGeometry(), None),
    # Scattering up to ~36° (detector corners ~44° from the normal): the cos² stretch of the box matters.
    "wide_angle": (
        MONO,
        DetectorGeometry(distance_m=0.12, wavelength_A=2.5, beam_center_px=(140.2, 119.6)),
        None,
    ),
}

_SETUPS: dict = {}


def setup(name: str):
    if name not in _SETUPS:
        (cell, sg), geometry, mask = CASES[name]
        det = make_detector(geometry, mask)
        q_min = float(det.q_norm.min())
        grid = model.make_grid(Crystal(cell=cell, space_group=sg), d_min=geometry.resolution_max_A, d_max=1.0 / q_min)
        _SETUPS[name] = (grid, det)
    return _SETUPS[name]


def random_quaternions(n: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def boundary_distance(grid: model.ReciprocalGrid, det, quats: np.ndarray, rot: np.ndarray, pix: np.ndarray):
    """float64 | |q_crystal - G_nearest| - r | / r of (rotation, pixel) pairs."""
    B = grid.crystal.reciprocal_basis
    mats = quaternion_to_matrix(quats.astype(np.float64))  # active R; crystal_from_lab = R^T
    q_crys = np.einsum("eji,ej->ei", mats[rot], det.q[pix])
    hkl = np.rint(q_crys @ np.linalg.inv(B).T)
    dist = np.linalg.norm(q_crys - hkl @ B.T, axis=1)
    return np.abs(dist - grid.radius) / grid.radius


def pairs(entries: model.Entries) -> np.ndarray:
    return np.stack([np.asarray(entries.rotation), np.asarray(entries.pixel)], axis=1)


def compare(grid, det, quats, ref: model.Entries, got: model.Entries) -> int:
    """Asserts that ``got`` equals ``ref`` up to pairs on a peak boundary; returns how many differ."""
    assert got.n_rot == ref.n_rot
    for e in (ref, got):
        rot, pix = np.asarray(e.rotation), np.asarray(e.pixel)
        assert e.voxels.shape == (rot.size, 8) and e.weights.shape == (rot.size, 8)
        assert np.array_equal(np.lexsort((pix, rot)), np.arange(rot.size)), "sorted by rotation then pixel"
    if ref.n_entries == got.n_entries and np.array_equal(pairs(ref), pairs(got)):
        assert np.array_equal(np.asarray(got.voxels), np.asarray(ref.voxels))
        assert np.array_equal(np.asarray(got.weights), np.asarray(ref.weights))
        return 0
    p_ref, p_got = pairs(ref), pairs(got)
    key = lambda p: p[:, 0].astype(np.int64) * det.n_pix + p[:, 1]  # noqa: E731
    k_ref, k_got = key(p_ref), key(p_got)
    only = np.concatenate([p_ref[~np.isin(k_ref, k_got)], p_got[~np.isin(k_got, k_ref)]])
    rel = boundary_distance(grid, det, quats, only[:, 0], only[:, 1])
    assert np.all(rel < 1e-5), f"{np.sum(rel >= 1e-5)} differing pairs away from a peak boundary"
    common_ref, common_got = np.isin(k_ref, k_got), np.isin(k_got, k_ref)
    assert np.array_equal(np.asarray(ref.voxels)[common_ref], np.asarray(got.voxels)[common_got])
    assert np.array_equal(np.asarray(ref.weights)[common_ref], np.asarray(got.weights)[common_got])
    return int(only.shape[0])


@pytest.mark.parametrize("name", list(CASES))
def test_same_entries_as_build_entries(name):
    grid, det = setup(name)
    quats = random_quaternions(50, seed=list(CASES).index(name))
    quats[0] = [1.0, 0.0, 0.0, 0.0]
    ref = model.build_entries(grid, det.q, quats)
    got = model.build_entries_by_reflection(grid, det, quats, chunk=16)
    assert ref.n_entries > 50 * 50  # many in-peak pixels per rotation
    n_diff = compare(grid, det, quats, ref, got)
    print(f"{name}: {ref.n_entries} entries, {n_diff} boundary mismatches")
    assert n_diff <= 1e-4 * ref.n_entries


def test_truncated_detector_and_small_h_max_retry():
    grid, det = setup("tilted_off_centre")
    det = det.truncate(5.0)
    quats = random_quaternions(20, seed=3)
    ref = model.build_entries(grid, det.q, quats)
    got = model.build_entries_by_reflection(grid, det, quats, chunk=8, h_max=32)  # too small: recomputed
    assert compare(grid, det, quats, ref, got) == 0


def test_no_rotations():
    grid, det = setup("default")
    got = model.build_entries_by_reflection(grid, det, np.zeros((0, 4)))
    assert got.n_rot == 0 and got.n_entries == 0 and got.voxels.shape == (0, 8)


@pytest.mark.parametrize("name", ["default", "tilted_off_centre", "wide_angle"])
def test_box_contains_every_in_peak_point(name):
    """The proven half-width bounds the detector offset of every Ewald-sphere point within r of a centre.

    Random centres g within r of the Ewald sphere and random points q on the sphere with |q - g| <= r whose
    direction hits the detector inside the valid pixels' cone: the row and column offsets between their
    detector points never exceed the half-width (float64, no margins: the bound holds exactly), and the
    sphere and cone tests of the kernel accept every such g.
    """
    grid, det = setup(name)
    geo = det.geometry
    shell_tol, cos_min, half_width = model_projection.projection_bounds(grid, det)
    r = grid.radius
    wl = geo.wavelength_A
    b = geo.beam_vector_px
    k = b / np.linalg.norm(b) / wl
    rng = np.random.default_rng(1)
    # Points on the sphere at the valid pixels (the directions the detector sees), plus random offsets.
    pix = rng.integers(0, det.n_pix, size=200_000)
    q = det.q[pix]
    step = rng.normal(size=q.shape)
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    g = q + step * r * rng.random((q.shape[0], 1)) ** (1 / 3)  # uniform in the ball of radius r around q
    s = g + k
    assert np.all(np.abs(np.linalg.norm(s, axis=1) - 1 / wl) <= shell_tol)
    assert np.all(-s[:, 2] >= cos_min * np.linalg.norm(s, axis=1))

    def project(v):
        scale = b[2] / v[:, 2]
        row = v[:, 0] * scale - b[0] + geo.beam_center_px[0]
        return np.stack([row, v[:, 1] * scale - b[1] + geo.beam_center_px[1]], 1)

    offset = np.abs(project(s) - project(q + k))
    ratio = offset.max() / half_width
    print(f"{name}: largest offset {offset.max():.3f} px of half-width {half_width:.3f} px ({ratio:.3f})")
    assert ratio <= 1.0
    # The bound is not loose by more than the cos² stretch and margins: worst cases come close.
    assert ratio > 0.5
    # Valid pixels lie on the Ewald sphere (the premise of the search).
    np.testing.assert_allclose(np.linalg.norm(det.q + k, axis=1), 1 / wl, rtol=1e-12)
    assert math.isfinite(half_width)
