"""Streaming at O(block) (emcjax.streaming, emcjax.core.stream): the join filled in from the disk cache is
emcjax.join's, and a streamed run (blocks re-read at every E-step, per-block M-step statistics, photon terms
on disk) equals the in-memory fused step.

One small simulation (64x64 detector to 8 Å, rotation_n = 2, 90 frames) with a dead-pixel frame, a frame
with a masked background shell and a frame of weight 0; streamed in blocks of 20 frames (5 blocks, the last
one padded).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc, parallel, streaming
from emcjax.blocks import build_block
from emcjax.core.stream import cached_join
from emcjax.detector import DetectorGeometry
from emcjax.errors import DataError
from emcjax.simulate import SimulationConfig, simulate, write_frames

GEOMETRY = DetectorGeometry(
    num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10
)
SIM = SimulationConfig(n_frames=90, geometry=GEOMETRY, rotation_n=2, bragg_photons=200.0, background_photons=20.0,
                       seed=4)
DEAD, MASKED, REJECTED = 3, 7, 11
BLOCK = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(dataset, frames, weights): the simulation with frame DEAD given 40 dead pixels (in-peak pixels without
    a photon), frame MASKED its first photon's shell masked, frame REJECTED weight 0."""
    frames, truth = simulate(SIM)
    path = tmp_path_factory.mktemp("stream") / "small.h5"
    write_frames(path, frames, truth, SIM)
    ds = data_io.SparseDataset(path)
    detector = emc.setup_problem(ds, emc.EMCConfig(rotation_n=2)).detector
    photons = frames.photon_pixels[frames.photon_offsets[DEAD] : frames.photon_offsets[DEAD + 1]]
    dead = np.setdiff1d(detector.pixel_id, photons)[::37][:40]
    dead_offsets = np.zeros(frames.n_frames + 1, np.int64)
    dead_offsets[DEAD + 1 :] = dead.shape[0]
    background = np.array(frames.background, np.float32)
    first = frames.photon_pixels[frames.photon_offsets[MASKED]]
    background[MASKED, detector.shell[detector.pixel_map()[first]]] = -1
    frames = dataclasses.replace(frames, dead_offsets=dead_offsets, dead_pixels=dead.astype(np.int64),
                                 background=background)
    frames.validate()
    weights = np.ones(frames.n_frames, np.float32)
    weights[REJECTED] = 0
    yield ds, frames, weights
    ds.close()


def test_cached_join_is_the_numpy_join(data):
    """The join filled in on the device from the disk cache is emcjax.join's join of the block, pair for pair
    (same order, same values, same padding), with the same cell offsets; a damaged cache file is refused."""
    ds, frames, weights = data
    config = emc.EMCConfig(rotation_n=2, block_frames=BLOCK, stream=True)
    problem = emc.setup_problem(ds, config, frames=frames, frame_weights=weights)
    fill = jax.jit(cached_join)
    for block in (problem.blocks[0], problem.blocks[-1]):  # the last block is padded
        expected = jax.tree.map(lambda x: np.asarray(parallel.local_pieces(x)[0]),
                                build_block(problem.plan, block, problem.lengths)[0].arrays)
        local = jax.tree.map(lambda x: parallel.local_pieces(x)[0],
                             streaming._record_block(problem.plan, block, problem.lengths))
        join = fill(local.join, local.records, local.photons, problem.shared.polarization)
        assert int(local.join.n_pairs) > 0
        for field in join._fields:
            np.testing.assert_array_equal(np.asarray(getattr(join, field)), getattr(expected.join, field), err_msg=field)
        np.testing.assert_array_equal(np.asarray(local.cell_offsets), expected.cell_offsets)
    cache = streaming._CACHES[problem.plan]
    path = cache.path(problem.blocks[1].start)
    damaged = np.fromfile(path, np.int32)
    damaged[5] += 1
    damaged.tofile(path)
    with pytest.raises(DataError, match="damaged"):
        streaming._record_block(problem.plan, problem.blocks[1], problem.lengths)


def _run(data, config, iterations):
    ds, frames, weights = data
    problem = emc.setup_problem(ds, config, frames=frames, frame_weights=weights)
    state = emc.initial_state(problem, config, seed=0)
    results = []
    for _ in range(iterations):
        state, metrics, per_frame = emc.iterate(problem, state, config)
        results.append((state, metrics, per_frame))
    return problem, results


@pytest.mark.parametrize("settings", [
    {},  # the default: the reference's intensity update, then phi
    {"intensity_update": "mlem", "inner_iterations": 2, "update_phi": False},
], ids=["reference", "mlem-no-phi"])
def test_streamed_run_equals_the_in_memory_run(data, settings):
    """The same models, phi, log-likelihoods, best rotations and kept pairs for two iterations (float sums
    over blocks in another order only)."""
    memory_problem, memory = _run(data, emc.EMCConfig(rotation_n=2, **settings), 2)
    config = emc.EMCConfig(rotation_n=2, block_frames=BLOCK, stream=True, **settings)
    problem, streamed = _run(data, config, 2)
    assert memory_problem.batch is not None and len(problem.blocks) == 5
    assert streaming.applies(problem, problem.spec(config), streamed[0][0].likelihood)
    assert set(streaming.phase_seconds(problem)) >= {"estep_intensity", "intensity"}
    for (a, ma, fa), (b, mb, fb) in zip(memory, streamed):
        scale = float(np.abs(np.asarray(a.intensity)).max())
        np.testing.assert_allclose(np.asarray(b.intensity), np.asarray(a.intensity), rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(np.asarray(b.phi), np.asarray(a.phi), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mb["log_likelihood"], ma["log_likelihood"], rtol=1e-6)
        np.testing.assert_array_equal(fb["best_rotation"], fa["best_rotation"])
        order_a, order_b = (np.lexsort((f["kept_rotation"], f["kept_frame"])) for f in (fa, fb))
        for key in ("kept_frame", "kept_rotation"):
            np.testing.assert_array_equal(fb[key][order_b], fa[key][order_a])
        np.testing.assert_allclose(fb["kept_prob"][order_b], fa["kept_prob"][order_a], rtol=1e-5, atol=1e-6)
        assert REJECTED not in fb["kept_frame"]


def test_stale_join_caches_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from emcjax import streaming

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # finished: that pid no longer runs (unless reused within this instant)
    stale = tmp_path / f"{streaming.CACHE_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{streaming.CACHE_PREFIX}{os.getppid()}-def"  # the parent process runs
    other = tmp_path / "emcjax-terms-xyz"
    for path in (stale, live, other):
        path.mkdir()
        (path / "frames0000000000.i32").write_bytes(b"\0" * 16)
    assert streaming.remove_stale_caches(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_repeat_frames_writes_copies(data, tmp_path):
    """experiments/repeat_frames.py (the 200,000-frame benchmark's data): every copy holds the input's
    photons, dead pixels, backgrounds and per-frame truth."""
    import importlib.util
    import pathlib

    ds, _, _ = data
    script = pathlib.Path(__file__).parents[1] / "experiments" / "repeat_frames.py"
    spec = importlib.util.spec_from_file_location("repeat_frames", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "big.h5"
    module.main(["--data", str(ds.path), "--times", "3", "--out", str(out)])
    original = ds.read_block(0, ds.n_frames)
    n = original.n_frames
    with data_io.SparseDataset(out) as big:
        assert big.n_frames == 3 * n
        for k in range(3):
            copy = big.read_block(k * n, (k + 1) * n)
            for field in ("photon_offsets", "photon_pixels", "photon_counts", "dead_offsets", "background"):
                np.testing.assert_array_equal(getattr(copy, field), getattr(original, field), err_msg=field)
        np.testing.assert_array_equal(big.read_truth()["phi"], np.tile(ds.read_truth()["phi"], 3))
    # candidate lists (the paper-geometry candidate benchmark's subsets): every copy keeps its frames' lists
    counts = np.arange(n) % 4 + 1
    listed = dataclasses.replace(original, candidate_offsets=np.concatenate([[0], np.cumsum(counts)]),
                                 candidate_rotations=np.arange(counts.sum()) % 60)
    repeated = module.repeat_frames(listed, 2)
    repeated.validate(num_rotations=60)
    for k in range(2):
        copy = repeated.frame_slice(k * n, (k + 1) * n)
        np.testing.assert_array_equal(copy.candidate_offsets, listed.candidate_offsets)
        np.testing.assert_array_equal(copy.candidate_rotations, listed.candidate_rotations)
