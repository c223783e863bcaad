"""Merging statistics, half-set sigma(I) and the MTZ, on synthetic half sets with a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from emcjax.crystal import Crystal, asymmetric_unit, is_absent, reflections
from emcjax.merge import sigma as sigma_lib
from emcjax.merge import stats as stats_lib
from emcjax.mtz import read_mtz, write_hkl_text, write_mtz


def synthetic_halves(n=6000, seed=0, noise_growth=4.0):
    """Truth with a Wilson fall-off, half sets with independent Gaussian errors whose variance grows with
    resolution and with the intensity (var = a(q) + b I), on a common scale times 2.5 for half b."""
    rng = np.random.default_rng(seed)
    q = np.cbrt(rng.uniform(0.02**3, 0.25**3, n))
    truth = rng.exponential(size=n) * np.exp(-20 * q**2)
    a = 0.02 * np.exp(noise_growth * q / 0.25) ** 2 / 50
    b = 0.05
    sd = np.sqrt(a + b * truth)
    i_a = truth + sd * rng.normal(size=n)
    i_b = (truth + sd * rng.normal(size=n)) * 2.5
    return q, truth, i_a, i_b, sd


def test_shells_have_equal_volumes_and_cover_the_range():
    edges = stats_lib.equal_volume_edges(0.05, 0.25, 7)
    vol = np.diff(edges**3)
    np.testing.assert_allclose(vol, vol[0], rtol=1e-12)
    q = np.array([0.05, 0.1, 0.25, 0.3, 0.01])
    shells = stats_lib.shell_of(q, edges)
    assert shells[0] == 0 and shells[2] == 6 and shells[3] == -1 and shells[4] == -1
    assert edges[shells[1]] <= 0.1 < edges[shells[1] + 1]


def test_rsplit_cc_and_p_value_match_references():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50) + 3, rng.normal(size=50) + 3
    assert stats_lib.r_split(a, b) == pytest.approx(np.sum(np.abs(a - b)) / np.sqrt(2) / (0.5 * np.sum(a + b)))
    assert stats_lib.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    from scipy import stats

    r = stats_lib.pearson(a, b)
    assert stats_lib.correlation_p_value(r, 50) == pytest.approx(stats.pearsonr(a, b, alternative="greater").pvalue)
    assert stats_lib.cc_star(0.5) == pytest.approx(np.sqrt(2 / 3))
    assert np.isnan(stats_lib.cc_star(-0.1))


def test_cc_star_tracks_true_correlation_and_sigma_is_calibrated():
    q, truth, i_a, i_b_raw, _ = synthetic_halves()
    scale = sigma_lib.common_scale(i_a, i_b_raw)
    assert scale == pytest.approx(1 / 2.5, rel=0.05)
    i_b = i_b_raw * scale
    edges = stats_lib.equal_volume_edges(q.min(), q.max(), 8)
    shell = stats_lib.shell_of(q, edges)
    sigma, params = sigma_lib.half_set_sigma(i_a, i_b, shell)
    assert params.shape == (8, 2) and np.all(params >= 0)
    stats = stats_lib.merging_statistics(q, i_a, i_b, sigma, np.full(q.shape, 3), q, edges=edges, i_true=truth)
    # CC1/2 falls with resolution, as the signal does
    assert np.all(np.diff(stats.cc_half) < 0.02) and stats.cc_half[0] > 0.9 and stats.cc_half[-1] < 0.5
    good = stats.cc_half > 0.3
    assert good.sum() >= 4
    np.testing.assert_array_less(np.abs(stats.cc_star - stats.cc_true)[good], 0.05)
    # standardized deviations from the truth have unit spread in every shell
    assert np.all((stats.true_z_sd > 0.8) & (stats.true_z_sd < 1.25)), stats.true_z_sd
    assert np.all(stats.multiplicity == 3) and np.all(stats.completeness == 1)
    assert stats.overall.n_unique[0] == q.size


def test_truth_columns_are_computed_over_the_reflections_the_truth_holds():
    q, truth, i_a, i_b, sd = synthetic_halves(n=2000, seed=3)
    edges = stats_lib.equal_volume_edges(q.min(), q.max(), 4)
    sigma, n_obs = sd / np.sqrt(2), np.full(q.shape, 2)
    missing = np.random.default_rng(4).random(q.size) < 0.1
    partial = stats_lib.merging_statistics(q, i_a, i_b, sigma, n_obs, q, edges=edges,
                                           i_true=np.where(missing, np.nan, truth))
    # numpy reference over the reflections the truth holds, with their own overall scale
    keep = ~missing
    m, t, w = 0.5 * (i_a + i_b)[keep], truth[keep], sigma[keep] ** -2.0
    k = np.sum(w * m * t) / np.sum(w * t * t)
    shell = stats_lib.shell_of(q[keep], edges)
    for s in range(4):
        sel = shell == s
        assert partial.cc_true[s] == pytest.approx(np.corrcoef(m[sel], t[sel])[0, 1], rel=1e-12)
        assert partial.true_z_sd[s] == pytest.approx(np.std((m[sel] - k * t[sel]) / sigma[keep][sel]), rel=1e-12)
    # the other columns still count every reflection
    full = stats_lib.merging_statistics(q, i_a, i_b, sigma, n_obs, q, edges=edges, i_true=truth)
    np.testing.assert_array_equal(partial.cc_half, full.cc_half)
    assert partial.overall.n_unique[0] == q.size


def test_stabilizer_order_matches_gemmi_and_small_classes_merge():
    import gemmi

    crystal = Crystal((79.1, 79.1, 37.9, 90, 90, 90), "P 43 21 2")
    hkl = reflections(crystal, d_min=6.0)
    laue = gemmi.find_spacegroup_by_name("P 4/m m m").operations()
    expected = [laue.epsilon_factor_without_centering([int(x) for x in h]) for h in hkl]
    order = sigma_lib.stabilizer_order(crystal.laue_ops, hkl)
    np.testing.assert_array_equal(order, expected)
    assert set(order.tolist()) == {1, 2, 4, 8}
    classes = sigma_lib.reflection_classes([1] * 30 + [2] * 25 + [4] * 3 + [8] * 1, min_count=20)
    np.testing.assert_array_equal(classes, [0] * 30 + [1] * 29)  # 4 and 8 join 2
    np.testing.assert_array_equal(sigma_lib.reflection_classes([1, 2, 2, 2], min_count=2), [0, 0, 0, 0])


def test_class_variance_factor_calibrates_reflections_on_symmetry_elements():
    """Reflections of one class (e.g. on symmetry elements, fewer distinct observations) scatter 2.5x more in
    variance: one shell model for all mis-states both classes, a factor per class calibrates each."""
    q, truth, _, _, sd = synthetic_halves(seed=4)
    rng = np.random.default_rng(5)
    special = rng.uniform(size=q.size) < 0.3
    sd = sd * np.where(special, np.sqrt(2.5), 1.0)
    i_a, i_b = (truth + sd * rng.normal(size=q.size) for _ in range(2))
    shell = stats_lib.shell_of(q, stats_lib.equal_volume_edges(q.min(), q.max(), 8))
    z_spread = lambda sigma, sel: np.std(((i_a + i_b) / 2 - truth)[sel] / sigma[sel])  # noqa: E731
    pooled, _ = sigma_lib.half_set_sigma(i_a, i_b, shell)
    assert z_spread(pooled, special) > 1.05 and z_spread(pooled, ~special) < 0.8
    by_class, params = sigma_lib.half_set_sigma(i_a, i_b, shell, classes=special.astype(int))
    assert params.shape == (8, 2)
    for sel in (special, ~special):
        assert 0.9 < z_spread(by_class, sel) < 1.1
        assert all(0.8 < z_spread(by_class, sel & (shell == s)) < 1.2 for s in range(8))


def test_sigma_from_a_single_difference_would_not_do():
    """The shell model matters: sigma = |A - B| / 2 per reflection gives heavy-tailed standardized errors."""
    q, truth, i_a, i_b, _ = synthetic_halves(seed=2)
    i_b = i_b / 2.5
    z = (0.5 * (i_a + i_b) - truth) / np.maximum(0.5 * np.abs(i_a - i_b), 1e-12)
    assert np.std(z) > 3


def test_suggested_limit_and_table():
    q, truth, i_a, i_b, _ = synthetic_halves(seed=3)
    i_b = i_b / 2.5
    edges = stats_lib.equal_volume_edges(q.min(), q.max(), 8)
    sigma, _ = sigma_lib.half_set_sigma(i_a, i_b, stats_lib.shell_of(q, edges))
    stats = stats_lib.merging_statistics(q, i_a, i_b, sigma, np.full(q.shape, 2), q, edges=edges)
    d, criterion = stats_lib.suggest_resolution(stats)
    passing = (stats.cc_half >= 0.3) & (stats.cc_half_p < 0.01)
    last = int(np.argmin(passing))
    assert 0 < last < 8 and d == pytest.approx(stats.d_min[last - 1])
    assert "CC1/2 >= 0.3" in criterion
    table = stats_lib.format_table(stats)
    lines = table.splitlines()
    assert "cc_half" in lines[0] and "cc_true" not in lines[0] and len(lines) == 8 + 3
    assert lines[1].count("*") == 1
    csv = stats_lib.to_csv(stats).splitlines()
    assert csv[0].startswith("shell,d_max,d_min") and csv[-1].startswith("overall")


def test_mtz_reads_back_with_cell_space_group_and_columns(tmp_path):
    crystal = Crystal((61.0, 72.0, 83.0, 90.0, 90.0, 90.0), "P 21 21 21")
    everything = reflections(crystal, d_min=5.0)
    hkl = asymmetric_unit(crystal, everything).hkl
    assert not is_absent(crystal, hkl).any()
    # add an absence to check it is dropped
    hkl = np.concatenate([hkl, [[0, 0, 3]]]).astype(np.int32)
    assert is_absent(crystal, hkl[-1:])[0]
    rng = np.random.default_rng(0)
    intensity, sigma = rng.exponential(size=len(hkl)) * 100, rng.uniform(1, 2, len(hkl))
    path = write_mtz(tmp_path / "x.mtz", crystal, hkl, intensity, sigma, half_a=intensity + 1, half_b=intensity - 1,
                     wavelength_A=1.3)
    back = read_mtz(path)
    assert back["space_group"] == "P 21 21 21"
    np.testing.assert_allclose(back["cell"], crystal.cell)
    assert [k for k in back if k not in ("cell", "space_group")] == ["H", "K", "L", "IMEAN", "SIGIMEAN", "I_half1", "I_half2"]
    got = np.stack([back["H"], back["K"], back["L"]], axis=1).astype(int)
    assert got.shape[0] == len(hkl) - 1
    row = {tuple(h): i for i, h in enumerate(hkl.tolist())}
    idx = [row[tuple(h)] for h in got.tolist()]
    np.testing.assert_allclose(back["IMEAN"], intensity[idx], rtol=1e-6)
    np.testing.assert_allclose(back["SIGIMEAN"], sigma[idx], rtol=1e-6)
    text = write_hkl_text(tmp_path / "x.hkl", crystal, hkl, intensity, sigma).read_text().splitlines()
    assert text[0].startswith("# emcjax") and len(text) == 2 + len(hkl) - 1
