"""Parity with the reference program on its own output (shared/fixtures/reference-small, see its README).

The fixture is a working directory written for the reference program plus what its ``emc`` wrote after one
intensity pass (``Data/high-prob/iter_flag-1/``). Its files are read here with plain numpy (an independent
reader), compared with what ``python -m emcjax.legacy import`` makes of them, and the program's update is
reproduced from its start model and phi.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import legacy, runio, toml_config
from emcjax.legacy import refmodel, refupdate

FIXTURE = pathlib.Path(os.environ.get("EMCJAX_REFERENCE_FIXTURE",
                                      pathlib.Path(__file__).resolve().parents[2] / "shared/fixtures/reference-small"))
OUT = FIXTURE / "Data/high-prob/iter_flag-1"
pytestmark = pytest.mark.skipif(not (FIXTURE / "config.ini").exists(), reason=f"no reference fixture at {FIXTURE}")


def hkl_val(path: pathlib.Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    lines = path.read_text().split("\n")
    rows = np.array([[float(x) for x in line.split()] for line in lines[1:] if line.strip()])
    return [int(x) for x in lines[0].split()], rows[:, :3].astype(np.int64), rows[:, 3]


@pytest.fixture(scope="module")
def directory():
    return legacy.read_legacy(FIXTURE)


@pytest.fixture(scope="module")
def update(directory):
    return refupdate.reference_update(directory)


def test_grid_is_the_programs(directory):
    """The program's voxel count and per-hkl voxel lists, in its order."""
    params = json.loads((FIXTURE / "truth/params.json").read_text())
    ref = directory.ref_grid
    assert ref.n_voxels == params["num_vox"] == 84136 and ref.hkl.shape[0] == params["num_hkl"] == 2850
    header, hkl, sums = hkl_val(OUT / "hkl-val.dat")
    assert header == [*ref.box, 2850]
    np.testing.assert_array_equal(ref.hkl, hkl)
    finish = np.fromfile(OUT / "finish_intensity.bin", "<f8")
    assert finish.shape == (ref.n_voxels,)
    # hkl-val.dat prints each reflection's voxel sum with %1.7e: equal to 8 significant digits
    np.testing.assert_allclose(np.add.reduceat(finish, ref.offsets[:-1]), sums, rtol=5.1e-8, atol=1e-12)
    # the lists themselves: a voxel g of S_h lies within gw of v_h and inside the box of 7^3 cells
    arrays = refmodel.reference_arrays(directory)
    d = ref.voxels - arrays.centre[ref.owner]
    assert np.all(np.sum(d * d, axis=1) <= directory.gw**2)


def test_estep_keeps_the_programs_rotations(directory, update):
    """The E-step (float32 tomograms, pruning at 0.999 / 1e-4) gives the kept rotations of high_p-*.dat and
    their probabilities to the file's 6 decimals."""
    program = refmodel.read_high_p(OUT, directory.frames.n_frames)
    assert len(update.kept) == len(program) == 100
    for (ids, p), (ids_file, p_file) in zip(update.kept, program):
        np.testing.assert_array_equal(ids, ids_file)
        np.testing.assert_allclose(p, p_file, rtol=0, atol=5.0001e-7)


def test_update_is_the_programs_finish_intensity(update):
    """One intensity pass from the program's start model and phi equals its finish_intensity.bin to rounding
    (measured: 1.0e-15 relative at most on voxels above 1e-3 of the maximum, 2.7e-15 absolute)."""
    finish = np.fromfile(OUT / "finish_intensity.bin", "<f8")
    big = np.abs(finish) > 1e-3 * np.abs(finish).max()
    assert big.sum() > 60000
    rel = np.abs(update.intensity - finish)[big] / np.abs(finish[big])
    assert rel.max() < 1e-12
    np.testing.assert_allclose(update.intensity, finish, rtol=0, atol=1e-12 * np.abs(finish).max())
    assert (update.intensity < 0).sum() == (finish < 0).sum() > 10000  # w = -min B where no photon falls
    _, _, sums = hkl_val(OUT / "hkl-val.dat")
    assert np.corrcoef(update.hkl_sums, sums)[0, 1] > 0.9999
    np.testing.assert_allclose(update.hkl_sums, sums, rtol=5.1e-8, atol=1e-6)


def test_update_from_the_programs_printed_probabilities(directory):
    """With the program's own high_p-*.dat (probabilities rounded to 6 decimals) as responsibilities, the
    M-step alone is isolated; the rounding of P limits it to 1.6e-4 relative (measured)."""
    kept = refmodel.read_high_p(OUT, directory.frames.n_frames)
    result = refupdate.reference_update(directory, kept=kept)
    finish = np.fromfile(OUT / "finish_intensity.bin", "<f8")
    big = np.abs(finish) > 1e-3 * np.abs(finish).max()
    rel = np.abs(result.intensity - finish)[big] / np.abs(finish[big])
    assert rel.max() < 1e-3 and np.median(rel) < 1e-6
    _, _, sums = hkl_val(OUT / "hkl-val.dat")
    assert np.corrcoef(result.hkl_sums, sums)[0, 1] > 0.9999


def test_import_holds_the_files(directory, tmp_path):
    """The imported data set holds the fixture's frames, background, candidates, ids and phi (numpy reader)."""
    out = tmp_path / "a.h5"
    summary = legacy.import_directory(FIXTURE, out)
    n_pix = np.fromfile(FIXTURE / "make-detector/rec-vectors.bin", "<i4", count=3)[2]
    dense = np.fromfile(FIXTURE / "Data/mpi-datafile.bin", "<i2").reshape(100, n_pix)
    pix_map = np.loadtxt(FIXTURE / "make-detector/pix-map.dat", np.int64)
    raw_of = np.empty(n_pix, np.int64)  # raw pixel id of valid pixel t
    raw_of[pix_map[pix_map >= 0]] = np.flatnonzero(pix_map >= 0)
    po = np.fromfile(FIXTURE / "aux/prob-orien.bin", "<i4")
    ids = np.loadtxt(FIXTURE / "reduce-data/reduced-data_id.dat", np.int64)[1:]
    with data_io.SparseDataset(out) as ds:
        fr = ds.read_all()
        # prob-orien.bin lists all 420 rotations for every frame: no lists, the all-rotations path (issue 8)
        assert not ds.has_candidates and fr.candidate_offsets is None
    assert summary["orientation_search"].startswith("all 420 rotations of the 600-cell sampling n = 2")
    emc_cfg = toml_config.parse_toml(out.with_suffix(".toml"))["emc"]
    assert emc_cfg["rotation_n"] == 2 and emc_cfg["reduce_by_symmetry"] is True
    np.testing.assert_array_equal(fr.frame_id, ids)
    np.testing.assert_array_equal(fr.background, np.fromfile(FIXTURE / "Data/mpi-bg_model.bin").reshape(100, -1)
                                  .astype(np.float32))
    pos = 0
    for d in range(100):
        row = dense[d]
        sl = slice(fr.photon_offsets[d], fr.photon_offsets[d + 1])
        order = np.argsort(raw_of[row > 0])
        np.testing.assert_array_equal(fr.photon_pixels[sl], raw_of[row > 0][order])
        np.testing.assert_array_equal(fr.photon_counts[sl], row[row > 0][order])
        count = po[pos]
        np.testing.assert_array_equal(po[pos + 1:pos + 1 + count], np.arange(420))
        pos += 1 + count
    init = runio.read_run(tmp_path / "a-init")
    np.testing.assert_allclose(init.phi, np.loadtxt(FIXTURE / "aux/start-phi.dat"), rtol=1e-7)


def test_round_trip_is_the_identity(tmp_path):
    """import -> export -> import gives the same data set, phi and model (float32 storage rounding)."""
    legacy.import_directory(FIXTURE, tmp_path / "a.h5")
    legacy.export_run(tmp_path / "a-init", tmp_path / "exported")
    legacy.import_directory(tmp_path / "exported", tmp_path / "b.h5")
    with data_io.SparseDataset(tmp_path / "a.h5") as a, data_io.SparseDataset(tmp_path / "b.h5") as b:
        fa, fb = a.read_all(), b.read_all()
        for name in ("frame_id", "photon_offsets", "photon_pixels", "photon_counts", "dead_offsets",
                     "dead_pixels", "background", "candidate_offsets", "candidate_rotations"):
            np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name), err_msg=name)
        assert a.geometry == b.geometry and a.crystal == b.crystal
        assert not a.has_candidates and not b.has_candidates  # export listed all 420 rotations again
    assert toml_config.parse_toml(tmp_path / "b.toml")["emc"]["rotation_n"] == 2
    po = np.fromfile(tmp_path / "exported/aux/prob-orien.bin", "<i4").reshape(100, 421)
    assert np.all(po[:, 0] == 420) and np.all(po[:, 1:] == np.arange(420))
    ra, rb = runio.read_run(tmp_path / "a-init"), runio.read_run(tmp_path / "b-init")
    np.testing.assert_array_equal(ra.phi, rb.phi)
    np.testing.assert_allclose(rb.intensity, ra.intensity, rtol=0, atol=1e-7 * ra.intensity.max())
    assert np.fromfile(tmp_path / "exported/finish_intensity.bin").shape == (84136,)
