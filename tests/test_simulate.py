"""Tests of emcjax.simulate: photon statistics against an independent float64 forward model, stored truth,
determinism, the HDF5 round trip and the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import model
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.rotations import quaternion_to_matrix
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig, simulate, write

GEO = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)
BASE = SimulationConfig(n_frames=300, geometry=GEO, seed=3)
CONFIGS = {
    "grid": BASE,
    "continuous": dataclasses.replace(BASE, rotation_n=0, seed=4),
    "no_background": dataclasses.replace(BASE, background_photons=0.0, phi_sigma=0.0, n_frames=200, seed=5),
}

_CACHE: dict = {}


def run(name: str):
    if name not in _CACHE:
        _CACHE[name] = simulate(CONFIGS[name])
    return _CACHE[name]


def grid_and_detector(config: SimulationConfig):
    """The grid and detector the simulator must have used, built here from the config."""
    det = make_detector(config.geometry)
    q_min = float(np.linalg.norm(det.q, axis=1).min())
    grid = model.make_grid(
        Crystal(cell=config.cell, space_group=config.space_group),
        d_min=config.geometry.resolution_max_A, d_max=1.0 / q_min, vn=config.vn, gw=config.gw,
    )
    return grid, det


def _keys(v: np.ndarray, span: int = 1 << 10) -> np.ndarray:
    v = np.asarray(v, np.int64) + span // 2
    return (v[..., 0] * span + v[..., 1]) * span + v[..., 2]


def reference_w(grid: model.ReciprocalGrid, intensity: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 trilinear W(q) (METHOD.md §5.2), vectorised over points, written independently of the kernels."""
    B = grid.crystal.reciprocal_basis
    frac = q @ np.linalg.inv(B).T
    h = np.rint(frac)
    inside = np.linalg.norm(q - h @ B.T, axis=1) <= grid.radius
    rkeys = _keys(grid.hkl)
    rorder = np.argsort(rkeys)
    pos = np.clip(np.searchsorted(rkeys[rorder], _keys(h)), 0, len(rkeys) - 1)
    refl = rorder[pos]
    inside &= rkeys[refl] == _keys(h)
    okeys = _keys(grid.offsets)
    oorder = np.argsort(okeys)
    u = grid.divisions * (frac - h)
    base = np.floor(u)
    a = grid.asu.index[refl]
    g = grid.asu.op[refl]
    out = np.zeros(q.shape[0])
    for corner in itertools.product((0, 1), repeat=3):
        c = base + np.asarray(corner)
        k = _keys(c.astype(np.int64))
        p = np.clip(np.searchsorted(okeys[oorder], k), 0, len(okeys) - 1)
        j = oorder[p]
        ok = inside & (okeys[j] == k)
        w = np.prod(1.0 - np.abs(u - c), axis=1)
        out += np.where(ok, w * intensity[a, grid.perm[g, j]], 0.0)
    return out


def forward_model(config: SimulationConfig, frames: data_io.SparseFrames, truth: dict):
    """Per (frame, valid pixel) expected Bragg and background photons from the stored truth and background."""
    grid, det = grid_and_detector(config)
    intensity = np.asarray(truth["intensity"], np.float64)
    rot = quaternion_to_matrix(np.asarray(truth["quaternion"], np.float64))  # (n, 3, 3) active
    q_crys = np.einsum("pi,nij->npj", det.q, rot)  # crystal_from_lab(q) @ q_lab = R^T q_lab
    w = reference_w(grid, intensity, q_crys.reshape(-1, 3)).reshape(config.n_frames, det.n_pix)
    bragg = truth["phi"][:, None] * det.polarization[None, :] * w
    background = det.polarization[None, :] * frames.background[:, det.shell].astype(np.float64)
    return grid, det, bragg, background


def observed_counts(frames: data_io.SparseFrames, det) -> np.ndarray:
    """(n_frames, n_pix) observed counts on the valid pixels; asserts no photon falls elsewhere."""
    pmap = det.pixel_map()
    out = np.zeros((frames.n_frames, det.n_pix), np.int64)
    frame = np.repeat(np.arange(frames.n_frames), np.diff(frames.photon_offsets))
    t = pmap[frames.photon_pixels]
    assert np.all(t >= 0), "photons on masked or out-of-resolution pixels"
    np.add.at(out, (frame, t), frames.photon_counts)
    return out


def assert_poisson(observed: float, expected: float, rel: float = 0.03):
    assert abs(observed - expected) <= 4 * np.sqrt(expected) + 1e-9, (observed, expected)
    assert abs(observed - expected) <= rel * expected, (observed, expected)


# ---------------------------------------------------------------------------------------------- photons
@pytest.mark.parametrize("name", ["grid", "continuous"])
def test_photon_totals_match_expectation(name):
    config = CONFIGS[name]
    frames, truth = run(name)
    exp_b, exp_bg = truth["expected_bragg_photons"], truth["expected_background_photons"]
    assert exp_b.shape == exp_bg.shape == (config.n_frames,)
    observed = frames.photons_per_frame()
    assert_poisson(observed.sum(), exp_b.sum() + exp_bg.sum())
    # The model is scaled so that a frame at phi = 1 holds bragg_photons on average over the frames.
    np.testing.assert_allclose(np.mean(exp_b / truth["phi"]), config.bragg_photons, rtol=1e-5)
    np.testing.assert_allclose(exp_b.mean(), config.bragg_photons * truth["phi"].mean(), rtol=0.03)
    # Background: a per-frame level uniform in [0.8, 1.2] x background_photons.
    assert np.all(exp_bg >= 0.8 * config.background_photons - 1e-6)
    assert np.all(exp_bg <= 1.2 * config.background_photons + 1e-6)
    np.testing.assert_allclose(exp_bg.mean(), config.background_photons, rtol=0.03)


@pytest.mark.parametrize("name", ["grid", "continuous"])
def test_photons_follow_the_forward_model(name):
    """lambda_t = pol_t (B_d(shell_t) + phi_d W(R_d q_t)), checked with an independent float64 forward model."""
    config = CONFIGS[name]
    frames, truth = run(name)
    grid, det, bragg, background = forward_model(config, frames, truth)
    # The stored per-frame expectations are the sums of the per-pixel means.
    np.testing.assert_allclose(bragg.sum(axis=1), truth["expected_bragg_photons"], rtol=2e-4)
    np.testing.assert_allclose(background.sum(axis=1), truth["expected_background_photons"], rtol=1e-5)
    counts = observed_counts(frames, det)
    in_peak = bragg > 0
    assert in_peak.any(axis=1).mean() > 0.9
    # Photons off the peaks are background only; on the peaks Bragg + background.
    assert_poisson(counts[~in_peak].sum(), background[~in_peak].sum(), rel=0.05)
    assert_poisson(counts[in_peak].sum(), (bragg + background)[in_peak].sum())
    # Bragg photons are distributed like W: bins of predicted mean agree with the observed counts.
    lam = (bragg + background)[in_peak]
    obs = counts[in_peak]
    edges = np.quantile(lam, [0, 0.5, 0.8, 0.95, 1.0])
    which = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, 3)
    for b in range(4):
        assert_poisson(obs[which == b].sum(), lam[which == b].sum(), rel=0.1)


def test_no_background_puts_every_photon_in_a_peak():
    config = CONFIGS["no_background"]
    frames, truth = run("no_background")
    np.testing.assert_array_equal(truth["phi"], 1.0)
    np.testing.assert_array_equal(truth["expected_background_photons"], 0.0)
    assert np.all(frames.background == 0)
    grid, det, bragg, background = forward_model(config, frames, truth)
    counts = observed_counts(frames, det)
    # Pixels within float32 rounding of a support boundary may go either way.
    assert counts[bragg == 0].sum() <= 1e-3 * counts.sum()
    assert_poisson(counts.sum(), truth["expected_bragg_photons"].sum())
    np.testing.assert_allclose(truth["expected_bragg_photons"].mean(), config.bragg_photons, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- truth
def test_truth_is_stored_and_physical():
    config = CONFIGS["grid"]
    frames, truth = run("grid")
    grid, det = grid_and_detector(config)
    intensity = np.asarray(truth["intensity"], np.float64)
    assert truth["intensity"].shape == grid.model_shape and truth["intensity"].dtype == np.float32
    np.testing.assert_array_equal(truth["hkl"], grid.asu.hkl)
    # phi: lognormal with mean 1 and log-spread phi_sigma.
    phi = truth["phi"]
    n = config.n_frames
    assert phi.shape == (n,) and np.all(phi > 0)
    assert abs(phi.mean() - 1) < 4 * config.phi_sigma / np.sqrt(n)
    assert abs(np.log(phi).mean() + config.phi_sigma**2 / 2) < 4 * config.phi_sigma / np.sqrt(n)
    assert np.log(phi).std() == pytest.approx(config.phi_sigma, rel=0.15)
    # Orientations: unit quaternions of the 600-cell sampling, spread over many rotations.
    quat = truth["quaternion"]
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1.0, atol=1e-12)
    idx = truth["rotation_index"]
    sampling = sample_600cell(config.rotation_n)
    assert np.all((idx >= 0) & (idx < sampling.n_rot))
    np.testing.assert_array_equal(quat, sampling.quaternions[idx])
    assert np.unique(idx).size > 0.9 * n
    # Integrated intensities: positive; every peak has the same Gaussian profile up to scale.
    integrated = model.integrated_intensity(intensity)
    assert np.all(integrated > 0)
    spacing = np.linalg.norm(grid.crystal.reciprocal_basis, axis=0).min() / config.vn
    dq = grid.voxel_q()
    gauss = np.exp(-np.sum(dq**2, axis=1) / (2 * (config.profile_width * spacing) ** 2))
    np.testing.assert_allclose(intensity / integrated[:, None], np.broadcast_to(gauss / gauss.sum(), intensity.shape), rtol=1e-5, atol=1e-9)
    # The isotropic profile makes the ASU model consistent for special reflections too.
    for a, h in enumerate(grid.asu.hkl):
        for g, m in enumerate(grid.crystal.laue_ops):
            if np.array_equal(m @ h, h):
                np.testing.assert_allclose(intensity[a, grid.perm[g]], intensity[a], rtol=1e-6)


def test_continuous_orientations():
    config = CONFIGS["continuous"]
    frames, truth = run("continuous")
    np.testing.assert_array_equal(truth["rotation_index"], -1)
    quat = truth["quaternion"]
    assert quat.shape == (config.n_frames, 4)
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1.0, atol=1e-12)
    # Uniform on SO(3): the mean of R is ~0 and the q0 >= 0 hemisphere is used.
    assert np.all(quat[:, 0] >= 0)
    assert np.abs(quaternion_to_matrix(quat).mean(axis=0)).max() < 0.12
    # Off the 600-cell grid.
    grid_q = sample_600cell(4).quaternions
    assert np.abs(quat @ grid_q.T).max() < 1 - 1e-9


# ---------------------------------------------------------------------------------------------- determinism
def _arrays(frames: data_io.SparseFrames, truth: dict) -> dict:
    out = {f"frames.{f.name}": getattr(frames, f.name) for f in dataclasses.fields(frames)}
    out.update({f"truth.{k}": v for k, v in truth.items()})
    return {k: np.asarray(v) for k, v in out.items() if v is not None}


def test_same_config_gives_identical_arrays_and_seed_changes_them():
    config = dataclasses.replace(BASE, n_frames=100, seed=11)
    first = _arrays(*simulate(config))
    second = _arrays(*simulate(config))
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert first[key].tobytes() == second[key].tobytes(), key
    other = _arrays(*simulate(dataclasses.replace(config, seed=12)))
    for key in ("frames.photon_pixels", "truth.intensity", "truth.phi", "truth.quaternion"):
        assert first[key].tobytes() != other[key].tobytes(), key


# ---------------------------------------------------------------------------------------------- file I/O
def test_write_round_trips_through_sparse_dataset(tmp_path):
    config = dataclasses.replace(BASE, n_frames=120, seed=21, out=tmp_path / "sim.h5")
    frames, truth = simulate(config)
    assert write(config) == config.out
    with data_io.SparseDataset(config.out) as ds:
        assert ds.n_frames == config.n_frames
        whole = ds.read_block(0, ds.n_frames)
        for size in (1, 7, 50, 120):
            blocks = [ds.read_block(s, min(s + size, ds.n_frames)) for s in range(0, ds.n_frames, size)]
            joined = data_io.SparseFrames.concatenate(blocks)
            for f in dataclasses.fields(whole):
                a, b = getattr(joined, f.name), getattr(whole, f.name)
                assert (a is None) == (b is None), f.name
                if a is not None:
                    np.testing.assert_array_equal(a, b, err_msg=f"{f.name} with blocks of {size}")
        stored_truth = ds.read_truth()
        geometry = ds.geometry
        crystal = ds.crystal
    for f in dataclasses.fields(frames):
        a, b = getattr(whole, f.name), getattr(frames, f.name)
        if a is None or b is None:
            assert a is None and b is None, f.name
            continue
        np.testing.assert_array_equal(a, b, err_msg=f.name)
    for key, value in truth.items():
        np.testing.assert_array_equal(np.asarray(stored_truth[key]), np.asarray(value), err_msg=key)
    assert geometry["num_rows"] == GEO.num_rows and geometry["resolution_max_A"] == GEO.resolution_max_A
    assert crystal["space_group"] == config.space_group
    np.testing.assert_allclose(crystal["cell"], config.cell)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_command_line_writes_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli.h5"
    args = [
        sys.executable, "-m", "emcjax.simulate", "--out", str(out), "--n-frames", "50",
        "--geometry.num-rows", "64", "--geometry.num-cols", "64", "--geometry.pixel-size-m", "3.6e-3",
        "--geometry.beam-center-px", "31.5", "31.5", "--geometry.resolution-max-A", "8",
        "--geometry.n-shells", "10", "--seed", "7",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    with data_io.SparseDataset(out) as ds:
        assert ds.n_frames == 50
        cli_frames = ds.read_all()
    # The CLI writes exactly what simulate() gives for the same config.
    config = SimulationConfig(
        n_frames=50, seed=7,
        geometry=DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5),
                                  resolution_max_A=8.0, n_shells=10),
    )
    frames, _ = simulate(config)
    np.testing.assert_array_equal(cli_frames.photon_pixels, frames.photon_pixels)
    np.testing.assert_array_equal(cli_frames.photon_counts, frames.photon_counts)
    before, mtime = _sha(out), out.stat().st_mtime_ns
    again = subprocess.run(args[:-1] + ["8"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode != 0
    assert "error" in again.stderr.lower() and str(out.name) in again.stderr
    assert _sha(out) == before and out.stat().st_mtime_ns == mtime


def test_structure_factor_intensities(tmp_path):
    """Intensities from an atomic model through gemmi: one atom at the origin gives |f(s)|^2, a smooth
    function of resolution that falls with |q| (no Wilson randomness)."""
    import gemmi

    from emcjax.crystal import Crystal
    from emcjax.simulated_truth import structure_intensities

    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(79.1, 79.1, 37.9, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    residue = gemmi.Residue()
    residue.name = "HOH"
    residue.seqid = gemmi.SeqId("1")
    atom = gemmi.Atom()
    atom.name = "O"
    atom.element = gemmi.Element("O")
    atom.pos = gemmi.Position(0, 0, 0)
    atom.occ = 1.0
    atom.b_iso = 0.0
    residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    st.add_model(model)
    path = tmp_path / "one_atom.pdb"
    st.write_pdb(str(path))

    crystal = Crystal(cell=(79.1, 79.1, 37.9, 90, 90, 90), space_group="P 1")
    hkl = np.array([[1, 0, 0], [0, 0, 1], [5, 3, 2], [10, 0, 4]])
    intensity = structure_intensities(path, crystal, hkl)
    s = np.linalg.norm(hkl @ crystal.reciprocal_basis.T, axis=1) / 2  # sin(theta)/lambda
    expected = np.array([gemmi.Element("O").it92.calculate_sf(x**2) for x in s]) ** 2
    np.testing.assert_allclose(intensity, expected, rtol=1e-3)


def test_command_line_uniform_orientations_with_candidate_lists(tmp_path):
    """--orientations uniform --candidates K --candidate-n N: continuous true orientations and, per frame, the
    K rotations of the n = N sampling nearest the truth (brute-force angles), nearest first; the photons are
    those of the same simulation without candidate lists."""
    from emcjax.rotations import misorientation_angle

    out = tmp_path / "cand.h5"
    args = [
        sys.executable, "-m", "emcjax.simulate", "--out", str(out), "--n-frames", "30",
        "--geometry.num-rows", "64", "--geometry.num-cols", "64", "--geometry.pixel-size-m", "3.6e-3",
        "--geometry.beam-center-px", "31.5", "31.5", "--geometry.resolution-max-A", "8",
        "--geometry.n-shells", "10", "--seed", "7", "--orientations", "uniform",
        "--candidates", "6", "--candidate-n", "3",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert done.returncode == 0, done.stderr
    with data_io.SparseDataset(out) as ds:
        assert ds.candidate_sampling_n == 3
        frames, truth = ds.read_all(), ds.read_truth()
    np.testing.assert_array_equal(truth["rotation_index"], -1)
    quat = truth["quaternion"]
    grid = sample_600cell(3)
    angles = misorientation_angle(quat[:, None, :], grid.quaternions[None])
    np.testing.assert_array_equal(np.diff(frames.candidate_offsets), 6)
    cand = frames.candidate_rotations.reshape(30, 6)
    np.testing.assert_allclose(np.take_along_axis(angles, cand, axis=1), np.sort(angles, axis=1)[:, :6], atol=1e-12)
    config = SimulationConfig(
        n_frames=30, seed=7, orientations="uniform",
        geometry=DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5),
                                  resolution_max_A=8.0, n_shells=10),
    )
    plain, plain_truth = simulate(config)
    np.testing.assert_array_equal(plain.photon_pixels, frames.photon_pixels)
    np.testing.assert_array_equal(plain_truth["quaternion"], quat)
    # rotation_n = 0 (the older spelling) draws the same continuous orientations
    _, zero_truth = simulate(dataclasses.replace(config, orientations="grid", rotation_n=0))
    np.testing.assert_array_equal(zero_truth["quaternion"], quat)
    with pytest.raises(Exception, match="candidate-n"):
        SimulationConfig(candidates=3, rotation_n=0)


# ---------------------------------------------------------------------------------------------- likelihoods
def test_negative_binomial_counts_are_over_dispersed():
    """--likelihood negbin: every pixel ~ NB(mean lambda_t, r), checked against the float64 forward model:
    the counts' mean is lambda and their variance lambda + lambda^2 / r (Poisson would give lambda)."""
    r = 2.0
    config = dataclasses.replace(BASE, seed=8, likelihood="negbin", dispersion=r)
    frames, truth = simulate(config)
    assert float(truth["likelihood_dispersion"]) == r
    grid, det, bragg, background = forward_model(config, frames, truth)
    np.testing.assert_allclose(background.sum(axis=1), truth["expected_background_photons"], rtol=1e-5)
    counts = observed_counts(frames, det)
    lam = bragg + background
    variance = lam + lam**2 / r
    for name, where in (("in peaks", bragg > 0), ("off peaks", bragg == 0)):
        k, mu, var = counts[where], lam[where], variance[where]
        assert abs(k.sum() - mu.sum()) <= 4 * np.sqrt(var.sum()), name
        # sum (K - mu)^2 estimates sum var; 5 standard errors, the standard error estimated from the draws
        squares = (k - mu) ** 2
        spread = np.sqrt(((squares - var) ** 2).sum())
        assert abs(squares.sum() - var.sum()) <= 5 * spread, (name, squares.sum(), var.sum(), spread)
    in_peak = bragg > 0
    k, mu = counts[in_peak], lam[in_peak]
    assert ((k - mu) ** 2).sum() > 1.5 * mu.sum()  # clearly not Poisson


def test_background_scale_multiplies_the_true_background_only():
    """--likelihood poisson-bgscale: photons drawn with C x the background that the file stores."""
    config = dataclasses.replace(BASE, seed=9, likelihood="poisson-bgscale", background_scale=1.5)
    frames, truth = simulate(config)
    np.testing.assert_allclose(truth["likelihood_scale"], 1.5)
    grid, det, bragg, background = forward_model(config, frames, truth)  # background from the file
    np.testing.assert_allclose(truth["expected_background_photons"], 1.5 * background.sum(axis=1), rtol=1e-5)
    assert np.all(truth["expected_background_photons"] >= 1.5 * 0.8 * config.background_photons - 1e-4)
    counts = observed_counts(frames, det)
    off = bragg == 0
    assert_poisson(counts[off].sum(), 1.5 * background[off].sum(), rel=0.05)
    assert_poisson(counts[~off].sum(), (bragg + 1.5 * background)[~off].sum())


def test_research_doc_simulate_command(tmp_path):
    """The simulate command of docs/RESEARCH.md runs as written (in-process, output redirected)."""
    import pathlib
    import shlex

    from emcjax import simulate as simulate_lib

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "RESEARCH.md").read_text()
    section = text.split("## How to write a likelihood", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("python -m emcjax.simulate")]
    assert len(commands) == 1  # the EMC section's commands are run by tests/test_core.py
    args = shlex.split(commands[0].split("python -m emcjax.simulate", 1)[1])
    args[args.index("--out") + 1] = str(tmp_path / "nb.h5")
    simulate_lib.main(args)
    with data_io.SparseDataset(tmp_path / "nb.h5") as ds:
        assert ds.n_frames == int(args[args.index("--n-frames") + 1])
        assert float(ds.read_truth()["likelihood_dispersion"]) == float(args[args.index("--dispersion") + 1])
        assert ds.read_all().photons_per_frame().mean() > 100
