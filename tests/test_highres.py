"""The high-resolution local update end to end on a tiny simulation with continuous orientations: the command
line, its outputs and record of the low-res run, the fine candidates, the extended start model, resume, and
clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import emc, highres, local_grid, lowres, runio, toml_config
from emcjax import model as model_lib
from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError, DataError
from emcjax.rotations import misorientation_angle
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig, write

GEOMETRY = DetectorGeometry(
    num_rows=96, num_cols=96, pixel_size_m=1.8e-3, beam_center_px=(47.5, 47.5), resolution_max_A=6.0, n_shells=20
)
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def lowres_run(tmp_path_factory):
    """A 1-iteration low-res run at 8 Å on continuous orientations with candidate lists (n = 3)."""
    root = tmp_path_factory.mktemp("highres")
    data = write(SimulationConfig(
        out=root / "data.h5", n_frames=40, geometry=GEOMETRY, orientations="uniform", candidates=8, candidate_n=3,
        bragg_photons=300.0, seed=1,
    ))
    config = lowres.LowresConfig(data=data, out=root / "low", iters=1, emc=emc.EMCConfig(d_min=8.0))
    lowres.run(config, log=lambda s: None)
    return root, config


def test_command_line_outputs_and_record(lowres_run):
    root, low = lowres_run
    out = root / "high_cli"
    args = [sys.executable, "-m", "emcjax.highres", "--from", str(low.out), "--resolution", "6.0", "--iters", "2",
            "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "fine candidates per frame" in done.stdout and "iter 2/2" in done.stdout
    for name in ("config.toml", "source.json", "metrics.jsonl", "iterations/002.h5", "intensities.h5",
                 "figures/convergence.png", "figures/sections.png", "figures/cc_true.png"):
        assert (out / name).exists(), name
    record = json.loads((out / "source.json").read_text())
    assert record["lowres_run"] == os.fspath(low.out.absolute()) and record["lowres_iteration"] == 1
    assert record["coarse_n"] == 3 and record["fine_n"] == local_grid.fine_sampling_n(3, 8.0, 6.0) == 4
    assert record["kept_pairs_recorded"] and record["fine_rotations_used"] < record["fine_rotations_total"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["log_likelihood"]) and "orientation_error_median_deg" in m for m in metrics)
    # the low-res run scored its orientations too (angle to the nearest symmetry-equivalent truth)
    assert all(0 < m["orientation_error_median_deg"] < 180 for m in runio.read_metrics(low.out))
    final, low_final = runio.read_run(out), runio.read_run(low.out)
    assert final.hkl.shape[0] > low_final.hkl.shape[0]  # the model grew to 6 Å
    np.testing.assert_array_equal(final.phi, low_final.phi)  # phi fixed by default
    assert toml_config.config_from_toml(highres.HighresConfig, out / "config.toml").from_run == low.out


def test_candidates_are_fine_neighbours_of_the_kept_coarse_rotations(lowres_run):
    _, low = lowres_run
    source = highres.read_lowres(low.out)
    last = h5py.File(runio.iteration_path(low.out, 1), "r")
    np.testing.assert_array_equal(source.kept_frame, last["kept_frame"][()])
    config = highres.HighresConfig(from_run=low.out, resolution=6.0)
    problem, emc_config, local = highres.setup(config, source)
    assert emc_config.d_min == 6.0 and not emc_config.update_phi and emc_config.vn == low.emc.vn
    assert problem.sampling.n == 4 and problem.n_frames == 40
    coarse, fine = sample_600cell(3), sample_600cell(4)
    radius = local_grid.neighbour_radius(3, 4)
    for d in (0, 17, 39):
        use = (source.kept_frame == d) & (source.kept_prob >= 0.01)
        kept = coarse.quaternions[source.kept_rotation[use]]
        angles = misorientation_angle(fine.quaternions[:, None, :], kept[None, :, :]).min(axis=1)
        want = np.flatnonzero(angles <= radius)
        np.testing.assert_array_equal(local.rotations[local.offsets[d] : local.offsets[d + 1]], want)


def test_extend_model_keeps_old_values_and_starts_new_reflections_from_the_outer_profile(lowres_run):
    _, low = lowres_run
    source = highres.read_lowres(low.out)
    problem, _, _ = highres.setup(highres.HighresConfig(from_run=low.out, resolution=6.0), source)
    grid = problem.grid
    intensity, is_new = highres.extend_model(grid, source.result.hkl, source.result.intensity)
    row = {tuple(h): i for i, h in enumerate(source.result.hkl.tolist())}
    old = np.array([row.get(tuple(h), -1) for h in grid.asu.hkl.tolist()])
    np.testing.assert_array_equal(is_new, old < 0)
    assert is_new.sum() > 0 and (~is_new).sum() == source.result.hkl.shape[0]
    np.testing.assert_allclose(intensity[~is_new], source.result.intensity[old[~is_new]], rtol=1e-6)
    # new ones: the symmetrised mean profile of the outermost 20 % of the old reflections
    q = np.linalg.norm(source.result.hkl @ grid.crystal.reciprocal_basis.T, axis=1)
    profile = source.result.intensity[q >= np.quantile(q, 0.8)].mean(axis=0)
    want = np.asarray(model_lib.symmetrize(jnp.asarray(np.tile(profile, (grid.n_asu, 1)), jnp.float32), grid.tables))
    np.testing.assert_allclose(intensity[is_new], want[is_new], rtol=1e-5)
    with pytest.raises(ConfigError, match="vn and gw"):
        highres.extend_model(grid, source.result.hkl, source.result.intensity[:, :-1])


def test_resume_equals_uninterrupted_run(lowres_run):
    root, low = lowres_run
    config = highres.HighresConfig(from_run=low.out, resolution=6.0, out=root / "full", iters=2, refine_phi=True)
    highres.run(config, log=lambda s: None)
    part = dataclasses.replace(config, out=root / "part", iters=1)
    highres.run(part, log=lambda s: None)
    lines: list[str] = []
    highres.run(dataclasses.replace(part, iters=2, resume=True), log=lines.append)
    assert any("resumed" in line and "iteration 1" in line for line in lines)
    full, resumed = runio.read_run(config.out), runio.read_run(part.out)
    np.testing.assert_array_equal(resumed.intensity, full.intensity)
    np.testing.assert_array_equal(resumed.phi, full.phi)
    assert [json.loads(x)["iteration"] for x in (part.out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not np.array_equal(full.phi, runio.read_run(low.out).phi)  # --refine-phi changed phi


def test_bad_input_gives_messages(lowres_run, tmp_path):
    root, low = lowres_run
    missing = subprocess.run(
        [sys.executable, "-m", "emcjax.highres", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert missing.returncode != 0 and missing.stderr.startswith("error: ") and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="beyond the pixels"):
        highres.run(highres.HighresConfig(from_run=low.out, resolution=5.0, out=tmp_path / "a"), log=lambda s: None)
    with pytest.raises(ConfigError, match="from"):
        highres.run(highres.HighresConfig(out=tmp_path / "b"), log=lambda s: None)
    # a low-res run that did not record its kept pairs: each frame's most likely rotation is used
    old = tmp_path / "old"
    shutil.copytree(low.out, old)
    with h5py.File(runio.iteration_path(old, 1), "a") as f:
        for name in ("kept_frame", "kept_rotation", "kept_prob"):
            del f[name]
    source = highres.read_lowres(old)
    assert not source.kept_recorded
    np.testing.assert_array_equal(source.kept_rotation, source.best_rotation)
    os.remove(old / "intensities.h5")
    with pytest.raises(DataError, match="not finished"):
        highres.read_lowres(old)


def test_frames_without_confident_coarse_rotations_get_no_candidates(lowres_run):
    """With a high threshold some frames keep no coarse rotation: they have no fine candidate, and the run
    still gives a finite model (those frames simply do not contribute)."""
    root, low = lowres_run
    config = highres.HighresConfig(from_run=low.out, resolution=6.0, out=root / "strict", iters=1,
                                   min_probability=0.999)
    final = highres.run(config, log=lambda s: None)
    record = json.loads((config.out / "source.json").read_text())
    source = highres.read_lowres(low.out)
    confident = np.unique(source.kept_frame[source.kept_prob >= 0.999])
    assert record["frames_without_candidates"] == 40 - confident.shape[0] > 0
    assert np.isfinite(final["log_likelihood"])
    assert np.all(np.isfinite(runio.read_run(config.out).intensity))


def test_orientation_errors_count_only_the_frames_the_run_uses(lowres_run):
    """With frame weights (a half set, rejected frames) the orientation error of the record and of every
    iteration is the median over the frames of weight > 0 only (the other half's frames get no fine candidates
    in a half set's run, so their 'best' rotation is arbitrary: 33° medians in the tutorial)."""
    from emcjax import scoring
    from emcjax.crystal import Crystal
    from emcjax.data import SparseDataset
    from emcjax.merge import rundata

    root, low = lowres_run
    used = np.arange(40) % 2 == 0
    weights = rundata.write_frame_weights(root / "half_weights.h5", used.astype(np.float32))
    config = highres.HighresConfig(from_run=low.out, resolution=6.0, out=root / "weighted", iters=1,
                                   frame_weights=weights)
    highres.run(config, log=lambda s: None)
    with SparseDataset(low.data) as ds:
        true_q, crystal = ds.read_truth()["quaternion"], ds.crystal
    ops = Crystal(cell=tuple(crystal["cell"]), space_group=str(crystal["space_group"])).rotation_ops_cartesian
    record = json.loads((config.out / "source.json").read_text())
    low_best = sample_600cell(3).quaternions[h5py.File(runio.iteration_path(low.out, 1))["best_rotation"][()]]
    low_errors = np.degrees(scoring.orientation_errors(low_best, true_q, ops))
    assert record["lowres_orientation_error_median_deg"] == pytest.approx(np.median(low_errors[used]), rel=1e-9)
    assert np.median(low_errors[used]) != pytest.approx(np.median(low_errors), rel=1e-6)  # the test can tell
    high_best = sample_600cell(4).quaternions[h5py.File(runio.iteration_path(config.out, 1))["best_rotation"][()]]
    high_errors = np.degrees(scoring.orientation_errors(high_best, true_q, ops))
    metric = runio.read_metrics(config.out)[-1]["orientation_error_median_deg"]
    assert metric == pytest.approx(np.median(high_errors[used]), rel=1e-9)
    assert np.median(high_errors[used]) != pytest.approx(np.median(high_errors), rel=1e-6)
