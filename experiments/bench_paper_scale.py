"""Candidate-restricted EMC at the paper's geometry: a Pilatus-6M-sized detector at 4 Å, continuous
orientations, ~200 candidates per frame from the n = 70 grid; set-up and iteration time per 1000 frames.

    python experiments/bench_paper_scale.py [--frames 250 500] [--angle 0.06] [--grid-n 70] [--iters 2]
        [--block-frames 250] [--signal tabulated] [--error-rotations 64] [--bin 1]

For each frame count (the first frames of one simulation) it runs the direct candidate path (emcjax.direct:
photon x candidate peak tests, no entry tables) and prints set-up and per-iteration seconds, also per 1000
frames, so that the linearity behind a projection to 80,000 frames can be read off; then the error of the
tabulated expected signal against the exact pixel sum on ``--error-rotations`` candidate rotations.
On a GPU machine the same command runs on the GPU (``JAX_PLATFORMS`` unset); ``--profile DIR`` writes a
jax.profiler trace of the last iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import data as data_io
from emcjax import direct, emc, simulate
from emcjax.core import cut_signal
from emcjax.detector import DetectorGeometry
from emcjax.rotation_neighbours import neighbours
from emcjax.rotations import crystal_from_lab
from emcjax.sampling_600cell import sample_600cell
from emcjax.sampling_index import SampledRotations

# Pilatus 6M: 2463 x 2527 pixels of 172 µm; at 0.45 m and λ = 1 Å the 4 Å circle holds ~1.4 M pixels.
PAPER = DetectorGeometry(num_rows=2463, num_cols=2527, pixel_size_m=172e-6, distance_m=0.45,
                         beam_center_px=(1231.0, 1263.0), wavelength_A=1.0, beamstop_radius_px=40.0,
                         resolution_max_A=4.0, n_shells=100)


def binned(bin_by: int) -> DetectorGeometry:
    """The paper's detector with ``bin_by`` x ``bin_by`` pixels binned (fewer pixels per peak: the exact signal
    is ``bin_by``² times cheaper, for comparing the tabulated and the exact signal on whole runs)."""
    if bin_by == 1:
        return PAPER
    return dataclasses.replace(PAPER, num_rows=PAPER.num_rows // bin_by, num_cols=PAPER.num_cols // bin_by,
                               pixel_size_m=PAPER.pixel_size_m * bin_by,
                               beam_center_px=tuple(c / bin_by for c in PAPER.beam_center_px),
                               beamstop_radius_px=PAPER.beamstop_radius_px / bin_by)


def signal_error(problem: direct.DirectProblem, intensity, n_rotations: int) -> dict:
    """Tabulated vs exact S over the first ``n_rotations`` candidates of block 0 (all shells, phi = 1)."""
    plan = problem.direct_plan
    quats = problem.direct_blocks[0].arrays.quaternions[:n_rotations]
    start = time.perf_counter()
    exact = np.asarray(direct.block_signal(dataclasses.replace(plan, signal="exact"), intensity, quats, problem.n_shells))
    exact_s = time.perf_counter() - start
    cut = cut_signal.cut_geometry(problem.grid, problem.detector)
    table = cut_signal.cut_table(intensity, cut, problem.grid.tables)
    proj, shape, _ = plan.projection
    reflections = cut_signal.frame_reflection_lists(quats, jnp.zeros(quats.shape[0]), proj, cut, 1024)[0]
    rot = crystal_from_lab(quats)[:, None]
    no_mask = jnp.full((quats.shape[0], 1), problem.n_shells, jnp.int32)
    approx = np.asarray(cut_signal.frame_signal(table, rot, reflections, no_mask, proj, cut, shape))[:, 0]
    total = exact.sum(axis=1)
    rel = approx / total - 1.0
    return {"rotations": int(quats.shape[0]), "mean": float(rel.mean()), "sd": float(rel.std()),
            "max_abs": float(np.abs(rel).max()), "spread_exact": float(total.std() / total.mean()),
            "exact_seconds_per_rotation": exact_s / quats.shape[0]}


def simulate_candidates(path: pathlib.Path, n_frames: int, angle: float, grid_n: int, geometry=PAPER) -> None:
    """Simulates ``n_frames`` at the paper's geometry (or ``geometry``) with the grid rotations within ``angle``
    of each truth as candidates, written to ``path``."""
    start = time.perf_counter()
    sampling = sample_600cell(grid_n)
    print(f"600-cell n={grid_n}: {sampling.n_rot} rotations in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    config = simulate.SimulationConfig(n_frames=n_frames, geometry=geometry, rotation_n=0, seed=3)
    frames, truth = simulate.simulate(config)
    offsets, rotations = neighbours(sampling, truth["quaternion"], angle)
    counts = np.diff(offsets)
    print(f"simulated {frames.n_frames} frames in {time.perf_counter() - start:.0f} s; candidates per frame: "
          f"mean {counts.mean():.0f}, min {counts.min()}, max {counts.max()}; "
          f"photons per frame {np.diff(frames.photon_offsets).mean():.0f}")
    frames = dataclasses.replace(frames, candidate_offsets=offsets, candidate_rotations=rotations)
    data_io.write_dataset(
        path, frames, geometry=dataclasses.asdict(geometry),
        crystal={"cell": np.asarray(config.cell), "space_group": config.space_group}, truth=truth,
        candidate_sampling_n=grid_n,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[250, 500])
    parser.add_argument("--angle", type=float, default=0.06, help="candidate radius around the truth (rad)")
    parser.add_argument("--grid-n", type=int, default=70)
    parser.add_argument("--block-frames", type=int, default=250)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--signal", choices=("tabulated", "exact"), default="tabulated")
    parser.add_argument("--error-rotations", type=int, default=64)
    parser.add_argument("--bin", type=int, default=1,
                        help="bin the detector's pixels by this factor per axis (compare --signal exact on whole runs)")
    parser.add_argument("--profile", type=pathlib.Path, default=None)
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="keep the simulated data set here (read it when present: same --frames max, --angle, --grid-n)")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}; load average {os.getloadavg()}")

    emc_config = emc.EMCConfig(block_frames=args.block_frames, max_kept=32)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data if args.data is not None else pathlib.Path(tmp) / "paper.h5"
        if not path.exists():
            simulate_candidates(path, max(args.frames), args.angle, args.grid_n, binned(args.bin))
        sampling = SampledRotations(args.grid_n)
        with data_io.SparseDataset(path) as dataset:
            for n in args.frames:
                subset = dataset.read_block(0, n)
                start, cpu = time.perf_counter(), time.process_time()
                problem = direct.setup_direct(dataset, emc_config, subset, sampling=sampling, signal=args.signal)
                setup = time.perf_counter() - start
                per_1000 = 1000 / n
                print(f"[{n} frames] set-up {setup:.1f} s ({setup * per_1000:.1f} s per 1000 frames; process CPU "
                      f"{time.process_time() - cpu:.1f} s, load average {os.getloadavg()[0]:.1f}), "
                      f"{len(problem.direct_blocks)} blocks, {problem.detector.n_pix} valid pixels, "
                      f"{problem.grid.n_refl} reflections, {problem.direct_plan.n_records} records per frame (padded)")
                held = [jax.tree.leaves(block.arrays) for block in problem.direct_blocks if block.arrays is not None]
                print(f"[{n} frames] device arrays the blocks hold: {sum(x.nbytes for b in held for x in b) / 2**20:.2f} MB"
                      f" ({sum(x.nbytes for b in held for x in b) / n / 1024:.1f} kB per frame)")
                state = emc.initial_state(problem, emc_config, seed=0)
                for i in range(args.iters):
                    problem.seconds.clear()
                    problem.cpu_seconds.clear()
                    if args.profile is not None and i == args.iters - 1:
                        jax.profiler.start_trace(str(args.profile))
                    cpu = time.process_time()
                    state, metrics, _ = emc.iterate(problem, state, emc_config)
                    cpu = time.process_time() - cpu
                    if args.profile is not None and i == args.iters - 1:
                        jax.profiler.stop_trace()
                    seconds = metrics["seconds"]
                    print(f"[{n} frames] iteration {int(state.iteration)}: {seconds:.1f} s "
                          f"({seconds * per_1000:.1f} s per 1000 frames; process CPU {cpu:.1f} s), certainty {metrics['certainty']:.3f}, "
                          f"cc_true {metrics['cc_true']:.4f}, load average {os.getloadavg()[0]:.1f}; seconds by phase: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in problem.seconds.items())
                          + "; process CPU by phase: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in problem.cpu_seconds.items() if not k.startswith("_")))
            if args.error_rotations:
                err = signal_error(problem, state.intensity, args.error_rotations)
                print(f"tabulated S vs the exact pixel sum on {err['rotations']} candidate rotations (model after "
                      f"{int(state.iteration)} iterations): relative error mean {err['mean']:+.4f}, sd {err['sd']:.4f}, "
                      f"max |.| {err['max_abs']:.4f} (spread of the exact S between rotations: {err['spread_exact']:.3f}); "
                      f"exact S costs {err['exact_seconds_per_rotation']:.3f} s per rotation")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
