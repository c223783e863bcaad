"""A resumed run with orientation refinement equals the uninterrupted run: the refiner's kept rotations and
refined candidates are saved next to every checkpoint (RUN/refinement/NNN.npz) and restored on --resume."""

import shutil

import numpy as np
import pytest

from emcjax import lowres, runio
from emcjax.detector import DetectorGeometry
from emcjax.simulate import SimulationConfig, write

GEOMETRY = DetectorGeometry(
    num_rows=80, num_cols=80, pixel_size_m=2.1e-3, beam_center_px=(39.5, 39.5), resolution_max_A=6.0, n_shells=12
)
REFINE = ["--emc.refine-orientations", "--emc.refine-start", "1", "--emc.refine-top-k", "1",
          "--emc.refine-steps", "8", "--keep-checkpoints", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_resume")
    return write(SimulationConfig(out=root / "data.h5", n_frames=32, geometry=GEOMETRY, orientations="uniform",
                                  candidates=4, candidate_n=6, bragg_photons=300.0, seed=5))


def _final(out):
    result = runio.read_run(out)
    return np.asarray(result.intensity), np.asarray(result.phi)


def test_resume_with_refinement_equals_uninterrupted(data, tmp_path):
    whole, cut, bare = tmp_path / "whole", tmp_path / "cut", tmp_path / "bare"
    lowres.main(["--data", str(data), "--out", str(whole), "--iters", "3", *REFINE])
    lowres.main(["--data", str(data), "--out", str(cut), "--iters", "2", *REFINE])
    assert sorted(p.name for p in (cut / runio.REFINEMENT_DIR).iterdir()) == ["001.npz", "002.npz"]
    shutil.copytree(cut, bare)
    lowres.main(["--out", str(cut), "--resume", "--iters", "3"])
    intensity, phi = _final(whole)
    resumed_intensity, resumed_phi = _final(cut)
    np.testing.assert_allclose(resumed_intensity, intensity, rtol=1e-5, atol=1e-6 * intensity.max())
    np.testing.assert_allclose(resumed_phi, phi, rtol=1e-5)
    # without the refiner's state the resumed run restarts from a grid E-step and ends elsewhere
    (bare / runio.REFINEMENT_DIR / "002.npz").unlink()
    lowres.main(["--out", str(bare), "--resume", "--iters", "3"])
    bare_intensity, _ = _final(bare)
    assert np.max(np.abs(bare_intensity - intensity)) > 1e-3 * intensity.max()
