"""Tests of emcjax.detector against direct per-pixel evaluations of the METHOD.md §3 formulas."""

import math

import numpy as np
import pytest

from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError

# A small detector, close to the sample (large angles), with an off-centre beam and a tilted beam.
SMALL = dict(num_rows=21, num_cols=17, pixel_size_m=1e-3, distance_m=0.02,
             beam_center_px=(8.3, 10.7), beam_direction=(0.01, -0.02, -1.0), wavelength_A=1.3,
             beamstop_radius_px=2.0, resolution_max_A=2.2, n_shells=7)


def _small_mask():
    mask = np.zeros((21, 17), dtype=bool)
    mask[3, 4] = mask[15, 2] = mask[9, 12] = True
    mask[:, 0] = True
    return mask


def _reference_pixels(p, mask):
    """Per-pixel loop with plain floats: {pid: (q (3-tuple), unnormalised pol)} of kept pixels."""
    sx, sy, sz = p["beam_direction"]
    s_len = math.sqrt(sx * sx + sy * sy + sz * sz)
    dist_px = p["distance_m"] / p["pixel_size_m"] * s_len / abs(sz)
    bx, by, bz = dist_px * sx / s_len, dist_px * sy / s_len, dist_px * sz / s_len
    b_len = math.sqrt(bx * bx + by * by + bz * bz)
    wl = p["wavelength_A"]
    q_max = 1.0 / p["resolution_max_A"]
    q_min = 2.0 * math.sin(0.5 * math.atan(p["beamstop_radius_px"] / dist_px)) / wl
    out = {}
    for row in range(p["num_rows"]):
        for col in range(p["num_cols"]):
            X = bx + row - p["beam_center_px"][0]
            Y = by + col - p["beam_center_px"][1]
            Z = bz
            r = math.sqrt(X * X + Y * Y + Z * Z)
            q = ((X / r - bx / b_len) / wl, (Y / r - by / b_len) / wl, (Z / r - bz / b_len) / wl)
            qn = math.sqrt(sum(c * c for c in q))
            if mask[row, col] or not (q_min <= qn <= q_max):
                continue
            pol = (1.0 - (Y / r) ** 2) * abs(Z) / r ** 3
            out[row * p["num_cols"] + col] = (q, pol)
    return out


@pytest.fixture(scope="module")
def small():
    return make_detector(DetectorGeometry(**SMALL), mask=_small_mask())


def test_matches_direct_loop(small):
    ref = _reference_pixels(SMALL, _small_mask())
    assert 50 < len(ref) < 21 * 17 - 20  # both limits and the mask remove pixels
    assert sorted(ref) == sorted(small.pixel_id.tolist())
    q_ref = np.array([ref[pid][0] for pid in small.pixel_id])
    pol_ref = np.array([ref[pid][1] for pid in small.pixel_id])
    pol_ref /= pol_ref.max()
    np.testing.assert_allclose(small.q, q_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(small.polarization, pol_ref, rtol=1e-12, atol=0)
    assert small.polarization.max() == 1.0
    assert small.q.dtype == np.float64 and small.q.shape == (small.n_pix, 3)
    assert small.polarization.dtype == np.float64
    assert small.shell.dtype == np.int32 and small.pixel_id.dtype == np.int64


def test_q_norm_is_bragg_angle():
    """|q| = 2 sin(θ)/λ with 2θ the angle between the pixel and the beam (straight beam)."""
    g = DetectorGeometry(num_rows=21, num_cols=17, pixel_size_m=2e-4, distance_m=0.01,
                         beam_center_px=(10.0, 8.0), wavelength_A=0.8, beamstop_radius_px=0.0,
                         resolution_max_A=0.41)  # q_max > 2/λ·sin(max 2θ/2): keep everything
    d = make_detector(g)
    assert d.n_pix == 21 * 17
    assert d.pixel_id[0] == 10 * 17 + 8 and d.q_norm[0] < 1e-14  # beam-centre pixel first, q ~ 0
    rows, cols = np.divmod(d.pixel_id, 17)
    r_m = g.pixel_size_m * np.hypot(rows - 10.0, cols - 8.0)
    two_theta = np.arctan2(r_m, g.distance_m)
    np.testing.assert_allclose(d.q_norm, 2 * np.sin(two_theta / 2) / g.wavelength_A, atol=1e-13)
    # q points from the beam direction towards the pixel: q_x ∝ row offset, q_y ∝ col offset.
    assert np.all(np.sign(d.q[:, 0]) == np.sign(rows - 10.0))
    assert np.all(np.sign(d.q[:, 1]) == np.sign(cols - 8.0))
    assert np.all(d.q[:, 2] >= 0)  # q_z = (1 - cos 2θ)/λ >= 0: z points back to the sample


def test_tilted_beam_centre_pixel_has_zero_q():
    """With a tilted beam, the pixel at the beam centre still has q = 0 (S = b there)."""
    g = DetectorGeometry(num_rows=15, num_cols=15, pixel_size_m=1e-3, distance_m=0.05,
                         beam_center_px=(6.0, 9.0), beam_direction=(0.05, -0.03, -1.0),
                         beamstop_radius_px=0.0, resolution_max_A=1.0)
    d = make_detector(g)
    assert d.pixel_id[0] == 6 * 15 + 9
    assert np.abs(d.q[0]).max() < 1e-15
    # 2θ between the pixel vector S and the beam b, by an independent formula (atan2 of |S×b|, S·b).
    b = g.beam_vector_px
    assert b[2] == pytest.approx(-g.distance_m / g.pixel_size_m)
    rows, cols = np.divmod(d.pixel_id, 15)
    S = np.stack([b[0] + rows - 6.0, b[1] + cols - 9.0, np.full(rows.shape, b[2])], axis=1)
    two_theta = np.arctan2(np.linalg.norm(np.cross(S, b), axis=1), S @ b)
    np.testing.assert_allclose(d.q_norm, 2 * np.sin(two_theta / 2) / g.wavelength_A, atol=1e-13)


def test_sorted_limits_and_mask(small):
    g = small.geometry
    assert np.all(np.diff(small.q_norm) >= 0)
    assert small.q_norm[0] >= g.q_min and small.q_norm[-1] <= g.q_max
    assert g.q_min == pytest.approx(2 * math.sin(math.atan(2.0 / g.distance_px) / 2) / 1.3)
    mask = _small_mask()
    masked_ids = np.flatnonzero(mask.ravel())
    assert not np.isin(masked_ids, small.pixel_id).any()
    # Without the mask, exactly the masked in-range pixels come back, and the others are unchanged.
    full = make_detector(g)
    extra = np.setdiff1d(full.pixel_id, small.pixel_id)
    assert set(extra.tolist()) <= set(masked_ids.tolist()) and extra.size > 0
    pm = full.pixel_map()
    np.testing.assert_array_equal(full.q[pm[small.pixel_id]], small.q)


def test_stable_sort_ties():
    """Symmetric pixels with identical |q| keep raw pixel order."""
    g = DetectorGeometry(num_rows=9, num_cols=9, beam_center_px=(4.0, 4.0), beamstop_radius_px=0.0,
                         resolution_max_A=1.0)
    d = make_detector(g)
    for value in np.unique(d.q_norm):
        ids = d.pixel_id[d.q_norm == value]
        assert np.all(np.diff(ids) > 0)


def test_mask_validation():
    g = DetectorGeometry(**SMALL)
    with pytest.raises(ConfigError, match="mask"):
        make_detector(g, mask=np.zeros((17, 21), dtype=bool))
    with pytest.raises(ConfigError, match="mask"):
        make_detector(g, mask=np.full((21, 17), 2))
    d_int = make_detector(g, mask=_small_mask().astype(np.int64))
    np.testing.assert_array_equal(d_int.pixel_id, make_detector(g, _small_mask()).pixel_id)
    with pytest.raises(ConfigError, match="mask"):
        make_detector(g, mask=np.ones((21, 17), dtype=bool))  # nothing left


def test_pixel_map_inverse(small):
    pm = small.pixel_map()
    assert pm.shape == (21 * 17,) and pm.dtype == np.int32
    np.testing.assert_array_equal(pm[small.pixel_id], np.arange(small.n_pix))
    assert np.count_nonzero(pm >= 0) == small.n_pix
    assert np.all(pm[np.setdiff1d(np.arange(21 * 17), small.pixel_id)] == -1)


def test_truncate_is_prefix(small):
    res = 3.0
    t = small.truncate(res)
    n = t.n_pix
    assert 0 < n < small.n_pix
    assert small.q_norm[n - 1] <= 1 / res < small.q_norm[n]
    np.testing.assert_array_equal(t.q, small.q[:n])
    np.testing.assert_array_equal(t.polarization, small.polarization[:n])  # not renormalised
    np.testing.assert_array_equal(t.shell, small.shell[:n])
    np.testing.assert_array_equal(t.pixel_id, small.pixel_id[:n])
    assert t.geometry == small.geometry
    assert small.truncate(SMALL["resolution_max_A"]).n_pix == small.n_pix
    assert small.truncate(100.0).n_pix == 0
    with pytest.raises(ConfigError, match="resolution_A"):
        small.truncate(0.0)


def test_shells(small):
    g = small.geometry
    assert small.shell_width == pytest.approx(1 / 2.2 / 7)
    assert np.all(np.diff(small.shell) >= 0)
    assert small.shell.min() >= 0 and small.shell.max() < g.n_shells
    expected = np.minimum(np.floor(small.q_norm * 2.2 * 7), 6).astype(int)
    np.testing.assert_array_equal(small.shell, expected)
    assert small.shell.max() == 6  # the outer shell is populated


def test_arrays_read_only(small):
    with pytest.raises(ValueError):
        small.q[0, 0] = 1.0
    assert isinstance(small, Detector)


def test_default_geometry():
    g = DetectorGeometry()
    d = make_detector(g)
    assert d.q_norm[0] >= g.q_min and d.q_norm[-1] <= 0.25
    assert g.beam_center_px == (127.5, 127.5) and g.beam_direction == (0.0, 0.0, -1.0)


@pytest.mark.parametrize("field, value", [
    ("num_rows", 0), ("num_rows", 2.5), ("num_cols", -3), ("num_cols", True),
    ("pixel_size_m", 0.0), ("pixel_size_m", float("nan")), ("distance_m", -0.1),
    ("distance_m", float("inf")), ("beam_center_px", (1.0,)), ("beam_center_px", (1.0, "a")),
    ("beam_center_px", (1.0, float("nan"))), ("beam_direction", (0.0, 0.0, 1.0)),
    ("beam_direction", (0.0, 0.0, 0.0)), ("beam_direction", (0.0, -1.0)),
    ("wavelength_A", 0.0), ("beamstop_radius_px", -1.0), ("resolution_max_A", 0.0),
    ("resolution_max_A", "4"), ("n_shells", 0), ("n_shells", 3.0),
])
def test_invalid_geometry(field, value):
    with pytest.raises(ConfigError, match=field):
        DetectorGeometry(**{field: value})
