"""Candidate orientations on the reference's n = 70 grid (17,150,700 rotations), timed in frames per second.

    python experiments/bench_orient.py [--frames 1000] [--sampling-n 70] [--frame-batch 8] [--chunk-rotations 8192]
                                       [--no-orbits]
    python experiments/bench_orient.py --frames 1000 --frame-batch 16 --chunk-rotations 65536   # GPU

Simulates detector images of the default experiment (lysozyme-like P 43 21 2 cell, 256 x 256 pixels, 4 Å,
continuous orientations; Bragg photons raised so that frames have spots), reduces them
(emcjax.frontend.reduce), then scores every frame's spots against every rotation of the grid
(emcjax.frontend.orient, vn = 15, gw = 2 as the reference). Prints the set-up time (600-cell sampling and
its symmetry orbits), frames per second of the scoring (and the elapsed time after each quarter of the
frames, to show it is linear in the frame count), the median candidate count and the fraction of frames (with >= 3 spots)
whose true orientation, or a symmetry mate, lies within 0.6 grid spacings of a candidate.
"""

from __future__ import annotations

import argparse
import sys
import pathlib
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax

from emcjax.crystal import Crystal
from emcjax.frontend import orient as orient_lib
from emcjax.frontend import reduce as reduce_lib
from emcjax.frontend import simulate_images as si
from emcjax.rotations import matrix_to_quaternion, misorientation_angle, quaternion_conjugate, quaternion_multiply
from emcjax.simulate import SimulationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--sampling-n", type=int, default=70)
    parser.add_argument("--frame-batch", type=int, default=8)
    parser.add_argument("--bragg-photons", type=float, default=1500.0)
    parser.add_argument("--chunk-rotations", type=int, default=8192)
    parser.add_argument("--no-orbits", action="store_true", help="score every rotation of the grid")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        sim = SimulationConfig(n_frames=args.frames, rotation_n=0, bragg_photons=args.bragg_photons,
                               background_photons=0.0, seed=7)
        si.write(si.ImageSimulationConfig(out=tmp, format="h5", simulation=sim, background_per_pixel=0.01,
                                          ring_q=0.0))
        reduce_lib.run(reduce_lib.ReduceConfig(images=(str(tmp / "images.h5"),), out=tmp / "red.h5",
                                               truth=tmp / "truth.h5",
                                               mask=reduce_lib.MaskConfig(file=tmp / "shadow_mask.npy")),
                       log=lambda s: None)
        crystal = Crystal(cell=sim.cell, space_group=sim.space_group)
        tolerance = orient_lib.default_tolerance(crystal, 15, 2.0)
        start = time.perf_counter()
        orienter = orient_lib.Orienter(crystal, args.sampling_n, tolerance, args.chunk_rotations,
                                       orbits=not args.no_orbits)
        setup = time.perf_counter() - start
        with h5py.File(tmp / "red.h5") as f:
            q, photons = orient_lib.read_spots(f, 0, args.frames)
            truth_q = f["truth/quaternion"][()]
        spots = [orient_lib.prepare_spots(x, w, tolerance, 0.0, 1 / 4.0, 20) for x, w in zip(q, photons)]
        orienter.candidates(spots[:1])  # compile
        start = time.perf_counter()
        lists = []
        marks = {args.frames * k // 4 for k in (1, 2, 3)}
        for a in range(0, args.frames, args.frame_batch):
            lists += orienter.candidates(spots[a:a + args.frame_batch])
            if any(a < m <= a + args.frame_batch for m in marks):
                print(f"  {len(lists)} frames: {time.perf_counter() - start:.1f} s", flush=True)
        seconds = time.perf_counter() - start

    sampling = orienter.sampling
    spacing = np.radians(72.0) / args.sampling_n  # rotation angle between neighbouring grid points
    usable = [i for i, s in enumerate(spots) if s.shape[0] >= 3]
    found = []
    for i in usable:
        best = np.inf
        if lists[i].size:
            for g in crystal.rotation_ops_cartesian:
                mate = quaternion_multiply(truth_q[i], quaternion_conjugate(matrix_to_quaternion(g)))
                best = min(best, float(misorientation_angle(sampling.quaternions[lists[i]], mate[None]).min()))
        found.append(best < 0.6 * spacing)
    counts = np.array([x.size for x in lists])
    print(f"grid n = {args.sampling_n}: {sampling.n_rot} rotations ({orienter.n_scored} scored), sampling and "
          f"orbit set-up {setup:.1f} s, chunk {orienter.chunk} x frame batch {args.frame_batch}")
    print(f"frames {args.frames}, spots per frame median {np.median([s.shape[0] for s in spots]):.0f}, "
          f">= 3 spots: {len(usable)}")
    print(f"orient: {seconds:.1f} s, {args.frames / seconds:.3f} frames/s "
          f"({args.frames * sampling.n_rot / seconds / 1e6:.1f} M rotation-frames/s)")
    print(f"candidates per frame: median {np.median(counts):.0f}, max {counts.max()}")
    print(f"truth (or mate) within 0.6 grid spacings of a candidate: {np.mean(found):.3f} of frames with >= 3 spots")


if __name__ == "__main__":
    main()
