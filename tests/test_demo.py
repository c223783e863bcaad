"""The built-in demo data set looks like real data: continuous (off-grid) orientations with per-frame
candidate lists, and the demo run turns on what such data need (refinement, a convergence stop)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emcjax import demo, emc, lowres, rotations, sampling_600cell
from emcjax.rotation_neighbours import nearest_rotations
from emcjax.data import SparseDataset
from emcjax.errors import ConfigError


def test_demo_orientations_are_off_grid_with_candidate_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("EMCJAX_CACHE", str(tmp_path))
    small = dataclasses.replace(demo.DemoConfig(), n_frames=24)  # the demo's settings, fewer frames
    path = demo.ensure_demo(small, log=lambda _: None)
    with SparseDataset(path) as data:
        truth = data.read_truth()
        frames = data.read_all()
    q = np.asarray(truth["quaternion"], dtype=np.float64)
    assert q.shape == (24, 4)
    assert np.all(np.asarray(truth["rotation_index"]) == -1)  # not drawn from any grid
    grid = sampling_600cell.sample_600cell(small.candidate_n)
    nearest = nearest_rotations(grid, q, small.candidates)
    off = np.degrees(rotations.misorientation_angle(grid.quaternions[nearest[:, 0]], q))
    # continuous orientations: typically ~0.65 x the grid's 2.7° from the nearest grid rotation, none on it
    assert np.all(off > 1e-3) and 0.8 < np.median(off) < 2.7
    # the candidate lists are the nearest grid rotations, nearest first
    np.testing.assert_array_equal(np.diff(frames.candidate_offsets), small.candidates)
    np.testing.assert_array_equal(frames.candidate_rotations.reshape(24, -1), nearest)


def test_demo_run_turns_on_refinement_and_convergence_stop():
    config = demo.DemoConfig()
    assert config.rotation_n == 0 and config.candidates > 0 and config.refine and config.stop_model_change > 0
    settings, stop = demo.run_settings(config, emc.EMCConfig())
    assert settings.refine_orientations and stop == config.stop_model_change
    line = demo.describe(config, settings)
    assert "continuous" in line and "candidate lists" in line and "refinement from iteration" in line
    # without refinement the settings pass through untouched
    off = dataclasses.replace(config, refine=False, stop_model_change=0.0)
    assert demo.run_settings(off, emc.EMCConfig()) == (emc.EMCConfig(), 0.0)
    with pytest.raises(ConfigError, match="stop_model_change"):
        demo.DemoConfig(stop_model_change=-1.0)
    # the lowres runner's default is the demo
    assert lowres.LowresConfig().demo == config
