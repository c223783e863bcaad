"""emcjax.merge.modelled_pixels: on the pixels frame rejection tests, every peak of a reflection the model left
out at its resolution limits is absent, so each pixel a crystal's peak touches is one of the model's peaks."""

from __future__ import annotations

import numpy as np

from emcjax import model as model_lib
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.merge.modelled_pixels import modelled_detector
from emcjax.simulated_truth import random_quaternions

# experiments/pipeline.py's detector (48 x 48 pixels to 4.5 Å) and crystal; the model to 6 Å, as the tutorial
GEOMETRY = DetectorGeometry(num_rows=48, num_cols=48, pixel_size_m=3.6e-3, beam_center_px=(23.5, 23.5),
                            distance_m=0.3, resolution_max_A=4.5, n_shells=10)
CRYSTAL = Crystal(cell=(36.0, 36.0, 30.0, 90.0, 90.0, 90.0), space_group="P 43 21 2")


def _in_peak(grid, detector, quaternions) -> np.ndarray:
    """(n_rot, n_pix) bool: the pixels of ``detector`` a peak of ``grid`` touches in each rotation."""
    entries = model_lib.build_entries_by_reflection(grid, detector, quaternions)
    on = np.zeros((quaternions.shape[0], detector.n_pix), bool)
    on[np.asarray(entries.rotation), np.asarray(entries.pixel)] = True
    return on


def test_every_peak_on_the_modelled_pixels_is_one_of_the_models():
    detector = make_detector(GEOMETRY).truncate(6.0)  # the run's valid pixels to its d_min
    q_min = float(detector.q_norm.min())
    grid = model_lib.make_grid(CRYSTAL, d_min=6.0, d_max=1.0 / q_min, vn=5, gw=2.0)  # as emcjax.problem
    # every reflection whose peak can reach the pixels: from |q| = 0 to beyond the detector's corner
    every = model_lib.make_grid(CRYSTAL, d_min=4.0, d_max=np.inf, vn=5, gw=2.0)
    quaternions = random_quaternions(np.random.default_rng(0), 40)
    modelled = modelled_detector(grid, detector)
    rho = grid.radius
    np.testing.assert_array_equal(  # a subset, in the same order, cut at 2 rho inside the model's limits
        modelled.pixel_id, detector.pixel_id[(detector.q_norm >= grid.q_min + 2 * rho)
                                             & (detector.q_norm <= grid.q_max - 2 * rho)])
    assert 0 < modelled.n_pix < detector.n_pix
    # on all valid pixels, peaks of reflections the model left out (photons no predicted peak explains) ...
    unexplained = _in_peak(every, detector, quaternions) & ~_in_peak(grid, detector, quaternions)
    assert unexplained.sum() > 100
    # ... only within 2 rho of its limits: none on the modelled pixels, where the model's peaks are every peak
    q = detector.q_norm[np.nonzero(unexplained)[1]]
    assert np.all((q < grid.q_min + 2 * rho) | (q > grid.q_max - 2 * rho))
    np.testing.assert_array_equal(_in_peak(every, modelled, quaternions), _in_peak(grid, modelled, quaternions))
