"""Frame tests of emcjax.merge.reject and the per-frame predictions of emcjax.merge.observe, against numpy
loops written here, on small simulated data sets with blank and two-crystal frames."""

from __future__ import annotations

import numpy as np
import pytest

from emcjax import model as model_lib
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.errors import ConfigError
from emcjax.merge import observe
from emcjax.merge import reject as reject_lib
from emcjax.rotations import crystal_from_lab, matrix_to_quaternion, quaternion_conjugate, quaternion_multiply
from emcjax.simulate import SimulationConfig, simulate

CRYSTAL = Crystal((79.1, 79.1, 37.9, 90.0, 90.0, 90.0), "P 43 21 2")
GEO = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)


def _rotate(q, angle, axis=(0.0, 0.0, 1.0)):
    axis = np.asarray(axis) / np.linalg.norm(axis)
    r = np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis])
    return quaternion_multiply(q, r)


def _angle_mod_group(a, b, ops):
    ca, cb = np.asarray(crystal_from_lab(a)), np.asarray(crystal_from_lab(b))
    return min(np.arccos(np.clip((np.trace(g @ ca @ cb.T) - 1) / 2, -1, 1)) for g in ops)


def test_cluster_masses_group_symmetry_mates_and_split_unrelated_orientations():
    ops = CRYSTAL.rotation_ops_cartesian
    rng = np.random.default_rng(0)
    q0 = rng.normal(size=4)
    q0 /= np.linalg.norm(q0)
    mate = quaternion_multiply(q0, quaternion_conjugate(matrix_to_quaternion(ops[3])))  # same crystal, other setting
    near = _rotate(q0, np.deg2rad(4.0))
    other = _rotate(q0, np.deg2rad(40.0), axis=(1.0, 0.3, 0.0))
    table = np.stack([q0, mate, near, other])
    assert _angle_mod_group(q0, mate, ops) < 1e-6 and _angle_mod_group(q0, other, ops) > np.deg2rad(30)
    # kept pairs, unsorted, of three frames
    frame = np.array([0, 0, 0, 0, 1, 1, 2])
    rotation = np.array([1, 0, 3, 2, 3, 0, 2])
    prob = np.array([0.3, 0.5, 0.05, 0.15, 0.55, 0.45, 1.0])
    rotations, probs = reject_lib.per_frame_pairs(frame, rotation, prob, 4)
    assert rotations.shape == (4, 4) and np.all(rotations[3] == -1) and np.all(np.diff(probs, axis=1) <= 0)
    first, second = reject_lib.cluster_masses(rotations, probs, table, ops, radius=np.deg2rad(10.0))
    np.testing.assert_allclose(first, [0.95, 0.55, 1.0, 0.0])
    np.testing.assert_allclose(second, [0.05, 0.45, 0.0, 0.0])


def test_frame_flags_reasons():
    criteria = reject_lib.RejectionCriteria()
    phi = np.array([1.0, 0.01, 1.2, 0.9, 1.1, 0.8, np.nan])
    first = np.array([1.0, 0.2, 0.3, 0.9, 1.0, 1.0, np.nan])
    second = np.array([0.0, 0.1, 0.0, 0.1, 0.0, 0.0, np.nan])
    observed = np.array([30.0, 30.0, 30.0, 30.0, 130.0, 31.0, np.nan])
    expected = np.full(7, 30.0)
    flags, z = reject_lib.frame_flags(phi, first, second, (observed, expected), criteria)
    bits = reject_lib.REASONS
    assert flags.tolist() == [
        0,
        bits["phi_zero"] | bits["undetermined"] | bits["two_orientations"],
        bits["undetermined"],
        bits["two_orientations"],
        bits["unexplained_photons"],
        0,
        0,
    ]
    assert reject_lib.describe(flags)[1] == "phi_zero,undetermined,two_orientations"
    assert reject_lib.reason_counts(flags) == {"phi_zero": 1, "undetermined": 2, "two_orientations": 2, "unexplained_photons": 1,
                                               "no_crystal": 0, "second_crystal": 0}
    assert np.isnan(z[-1]) and z[4] > 6


def test_weights_drop_only_the_chosen_reasons():
    bits = reject_lib.REASONS
    flags = np.array([0, bits["phi_zero"], bits["unexplained_photons"], bits["phi_zero"] | bits["undetermined"],
                      bits["two_orientations"]])
    weights = np.array([1.0, 1.0, 0.5, 1.0, 0.0])
    np.testing.assert_array_equal(reject_lib.weights_from_flags(weights, flags), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(reject_lib.weights_from_flags(weights, flags, ("phi_zero",)), [1, 0, 0.5, 0, 0])
    np.testing.assert_array_equal(
        reject_lib.weights_from_flags(weights, flags, ("undetermined", "two_orientations")), [1, 1, 0.5, 0, 0])
    with pytest.raises(ConfigError, match="unknown reasons"):
        reject_lib.weights_from_flags(weights, flags, ("blank",))


def test_unexplained_photon_test_clips_until_stable_when_many_frames_are_contaminated():
    """30 % of frames with a second crystal inflate the MAD of one pass so that it misses most of them; the
    iterated reference (frames this test flags leave it) catches them all and no good frame."""
    rng = np.random.default_rng(0)
    n, n_bad = 1000, 300
    expected = np.full(n, 100.0)
    observed = rng.poisson(expected).astype(np.float64)
    observed[:n_bad] += rng.uniform(90, 300, n_bad)  # a second crystal's photons outside the peaks
    ones = np.ones(n)
    criteria = reject_lib.RejectionCriteria()
    flags, z = reject_lib.frame_flags(ones, ones, 0 * ones, (observed, expected), criteria)
    bad = np.arange(n) < n_bad
    assert np.all(flags[bad] != 0) and np.mean(flags[~bad] != 0) < 0.01
    excess = (observed - expected) / 10.0
    one_pass = reject_lib.robust_z(excess, excess) > criteria.max_unexplained_z
    assert np.mean(one_pass[bad]) < 0.9  # what the single pass did
    np.testing.assert_allclose(z, reject_lib.robust_z(excess, excess[flags == 0]))


@pytest.fixture(scope="module")
def mixed_frames():
    config = SimulationConfig(n_frames=60, geometry=GEO, seed=11, blank_fraction=0.1, multi_fraction=0.2)
    frames, truth = simulate(config)
    detector = make_detector(GEO)
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(CRYSTAL, d_min=GEO.resolution_max_A, d_max=1 / q_min, vn=10, gw=2.0)
    return frames, truth, grid, detector


def test_unexplained_photons_match_a_numpy_loop(mixed_frames):
    frames, truth, grid, detector = mixed_frames
    quats = truth["quaternion"]
    observed, expected = observe.unexplained_photons(grid, detector, frames, quats, chunk=16)
    entries = model_lib.build_entries(grid, detector.q, quats)  # the brute-force entries, not by reflection
    rot, pix = np.asarray(entries.rotation), np.asarray(entries.pixel)
    pixel_map = detector.pixel_map()
    for d in range(frames.n_frames):
        in_peak = set(pix[rot == d].tolist())
        a, b = frames.photon_offsets[d], frames.photon_offsets[d + 1]
        valid = pixel_map[frames.photon_pixels[a:b]]
        outside = sum(int(c) for t, c in zip(valid, frames.photon_counts[a:b]) if t >= 0 and int(t) not in in_peak)
        bg = frames.background[d].astype(np.float64)[detector.shell] * detector.polarization
        mask = np.ones(detector.n_pix, bool)
        mask[list(in_peak)] = False
        assert observed[d] == outside
        assert expected[d] == pytest.approx(bg[mask].sum(), rel=1e-9)
    kind = truth["frame_kind"]
    excess = (observed - expected) / np.sqrt(expected)
    assert excess[kind == 2].min() > 5 > np.abs(excess[kind != 2]).max()


def test_observations_count_frames_per_unique_reflection(mixed_frames):
    frames, truth, grid, detector = mixed_frames
    quats = truth["quaternion"]
    used = truth["frame_kind"] != 1
    counts = observe.observations(grid, detector, quats, used, chunk=16)
    entries = model_lib.build_entries(grid, detector.q, quats)
    rot, voxels = np.asarray(entries.rotation), np.asarray(entries.voxels)
    want = np.zeros(grid.n_asu, int)
    sentinel = grid.n_asu * grid.n_voxels
    for d in np.flatnonzero(used):
        v = voxels[rot == d]
        refl = {int(x) // grid.n_voxels for x in v.ravel() if x < sentinel}
        for r in refl:
            want[r] += 1
    np.testing.assert_array_equal(counts, want)
    assert counts.sum() > 0


def _dense_models(grid, detector, intensity, quaternions):
    """(n_q, n_pix) Bragg photons per unit pol at scale 1 of every valid pixel (brute-force entries)."""
    entries = model_lib.build_entries(grid, detector.q, np.asarray(quaternions))
    w = np.zeros((len(quaternions), detector.n_pix))
    np.add.at(w, (np.asarray(entries.rotation), np.asarray(entries.pixel)),
              np.asarray(model_lib.tomogram(intensity, entries), np.float64))
    return w


def _dense_llr(detector, frames, d, w, psi, beside=0.0):
    """(n_q,) log-likelihood ratios of a crystal of scale psi with dense models ``w`` (n_q, n_pix) for frame d,
    every valid pixel summed, against the background plus ``beside`` (n_pix,) Bragg photons per unit pol."""
    counts = np.zeros(detector.n_pix)
    a, b = frames.photon_offsets[d], frames.photon_offsets[d + 1]
    index = detector.pixel_map()[frames.photon_pixels[a:b]]
    np.add.at(counts, index[index >= 0], frames.photon_counts[a:b][index >= 0])
    bg = frames.background[d].astype(np.float64)[detector.shell]
    valid = bg > 0
    terms = counts * np.log1p(psi * w / (bg + beside)) - psi * detector.polarization * w
    return np.sum(terms[:, valid], axis=1)


def test_crystal_evidence_matches_dense_sums_and_separates_blank_one_and_two_crystal_frames(mixed_frames):
    from emcjax.merge import evidence
    from emcjax.rotations import symmetric_misorientation

    frames, truth, grid, detector = mixed_frames
    intensity = np.asarray(truth["intensity"], np.float32)
    assert intensity.shape == grid.model_shape
    kind = np.asarray(truth["frame_kind"])
    ops = CRYSTAL.rotation_ops_cartesian
    # scan: every crystal's true orientation and a few random ones; first crystal = the truth's
    rng = np.random.default_rng(3)
    extra = rng.normal(size=(6, 4))
    scan_q = np.concatenate([truth["quaternion"], truth["second_quaternion"][kind == 2],
                             extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    scan = evidence.ScanTables(grid, detector, intensity, scan_q)
    phi = np.where(kind == 1, 0.0, truth["phi"])
    radius = np.deg2rad(5.0)
    crystal, second = evidence.crystal_evidence(grid, detector, frames, intensity, truth["quaternion"], phi, scan,
                                                ops, radius, psi=1.0, n_orientations=100)
    w_scan = _dense_models(grid, detector, intensity, scan_q)
    for d in (0, int(np.flatnonzero(kind == 1)[0]), int(np.flatnonzero(kind == 2)[0])):
        assert crystal[d] == pytest.approx(_dense_llr(detector, frames, d, w_scan[d : d + 1], 1.0)[0] - np.log(100),
                                           abs=1e-3)
        away = symmetric_misorientation(truth["quaternion"][d][None], scan_q, ops) > radius
        llr2 = _dense_llr(detector, frames, d, w_scan[away], 1.0, phi[d] * w_scan[d])
        assert second[d] == pytest.approx(np.log(np.mean(np.exp(llr2 - llr2.max()))) + llr2.max(), abs=1e-3)
    assert crystal[kind == 1].max() < 0 < crystal[kind != 1].min()
    assert second[kind != 2].max() < 0 < second[kind == 2].min()


def test_evidence_flags():
    criteria = reject_lib.RejectionCriteria()
    ones = np.ones(4)
    flags, _ = reject_lib.frame_flags(ones, ones, 0 * ones, None, criteria,
                                      (np.array([50.0, -3.0, 40.0, np.nan]), np.array([-9.0, -9.0, 12.0, np.nan])))
    bits = reject_lib.REASONS
    assert flags.tolist() == [0, bits["no_crystal"], bits["second_crystal"], 0]


def test_refine_first_finds_the_true_orientation_among_the_offsets_and_matches_dense_sums(mixed_frames):
    """Frames started one known offset away from their true orientation come back to it; the choice is the
    argmax of the dense log-likelihood ratios of the 27 candidates; a frame of phi 0 keeps its start."""
    from emcjax.merge import evidence
    from emcjax.rotations import misorientation_angle, quaternion_conjugate, quaternion_multiply

    frames, truth, grid, detector = mixed_frames
    intensity = np.asarray(truth["intensity"], np.float32)
    kind = np.asarray(truth["frame_kind"])
    step = np.deg2rad(1.5)
    offsets = evidence.local_offsets(step)
    assert offsets.shape == (27, 4) and np.allclose(offsets[0], [1, 0, 0, 0])
    np.testing.assert_allclose(np.sort(np.degrees(misorientation_angle(offsets, offsets[:1])))[[1, 7, 19, 26]],
                               np.degrees(step) * np.sqrt([1, 2, 3, 3]), rtol=1e-9)
    which = np.arange(frames.n_frames) % 26 + 1  # each frame its own known offset (never the identity)
    start = quaternion_multiply(truth["quaternion"], quaternion_conjugate(offsets[which]))
    phi = np.where(kind == 1, 0.0, truth["phi"])
    chosen = evidence.refine_first(grid, detector, frames, intensity, start, phi, step)
    back = np.degrees(misorientation_angle(chosen, truth["quaternion"])) < 1e-6
    one = kind == 0
    assert np.mean(back[one]) >= 0.9, np.mean(back[one])
    np.testing.assert_array_equal(chosen[kind == 1], start[kind == 1])  # phi = 0: every candidate ties
    for d in np.flatnonzero(one)[:3]:
        candidates = quaternion_multiply(start[d][None], offsets)
        llr = _dense_llr(detector, frames, d, _dense_models(grid, detector, intensity, candidates), phi[d])
        np.testing.assert_allclose(chosen[d], candidates[np.argmax(llr)], atol=1e-12)
