"""Streaming at O(block) (emcjax.streaming, emcjax.core.stream): the device-built join is emcjax.join's, and a
streamed run (blocks re-read at every E-step, per-block M-step statistics, photon terms on disk) equals the
in-memory fused step.

One small simulation (64x64 detector to 8 Å, rotation_n = 2, 90 frames) with a dead-pixel frame, a frame
with a masked background shell and a frame of weight 0; streamed in blocks of 20 frames (5 blocks, the last
one padded).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc, parallel, streaming
from emcjax.blocks import build_block
from emcjax.core.stream import expand_join
from emcjax.detector import DetectorGeometry
from emcjax.simulate import SimulationConfig, simulate

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
    data_io.write_dataset(
        path, frames, geometry=dataclasses.asdict(GEOMETRY),
        crystal={"cell": np.asarray(SIM.cell), "space_group": SIM.space_group, "vn": SIM.vn, "gw": SIM.gw},
        truth=truth,
    )
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


def test_device_join_is_the_numpy_join(data):
    """Every (record, in-peak entry) pair of a block, built on the device, is a pair of emcjax.join.build_join
    with the same cell, entry, count, dead flag, background and polarization, and the other way round."""
    ds, frames, weights = data
    config = emc.EMCConfig(rotation_n=2, block_frames=BLOCK, stream=True)
    problem = emc.setup_problem(ds, config, frames=frames, frame_weights=weights)
    index = streaming._stream(problem).index
    counts = streaming._stream(problem).counts
    for block in (problem.blocks[0], problem.blocks[-1]):  # the last block is padded
        expected = jax.tree.map(lambda x: parallel.local_pieces(x)[0],
                                build_block(problem.plan, block, problem.lengths)[0].arrays.join)
        records = streaming._record_block(problem.plan, block, problem.lengths[1], counts, problem.lengths[0])
        local = jax.tree.map(lambda x: parallel.local_pieces(x)[0], records)
        join, n_pairs = jax.jit(expand_join, static_argnums=(4, 5, 6))(
            index, local.records, local.photons, problem.shared.polarization, block.n_local, problem.n_slots,
            problem.lengths[0])
        n_pairs = int(n_pairs)
        real_numpy = np.asarray(expected.count) + np.asarray(expected.dead) > 0
        assert n_pairs == int(real_numpy.sum()) > 0

        def rows(j, real):
            table = np.stack([np.asarray(getattr(j, f), np.float64)[real] for f in j._fields], axis=1)
            return table[np.lexsort(table.T[::-1])]

        np.testing.assert_array_equal(rows(join, np.arange(join.cell.shape[0]) < n_pairs), rows(expected, real_numpy))
        assert np.all(np.asarray(join.count)[n_pairs:] == 0) and np.all(np.asarray(join.dead)[n_pairs:] == 0)


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
    """The same models, phi, log-likelihoods, best rotations and kept pairs for two iterations (float sums in
    another order only: the per-frame phi sums run over the join in record order)."""
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
