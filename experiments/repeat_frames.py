"""A large data set for timing and memory from a smaller simulation: its frames repeated ``--times`` times.

    python experiments/repeat_frames.py --data sim40k.h5 --times 5 --out sim200k.h5

Frame d of copy k is frame d of the input (same photons, candidate rotations if any, same truth: orientation,
phi, the one true model), with frame id k x n_frames + d. Per frame the work and memory of a run are those of the input's frames, so a
run on the result costs what a run on a fresh simulation of that many frames costs (the 200,000-frame
streaming benchmark in docs/BENCHMARKS.md: ``python -m emcjax.simulate`` takes ~26 min for 200,000 frames on a
quiet 2-core machine, hours on a loaded one); the reconstruction of repeated frames is not new information.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from emcjax import data as data_io


def repeat_frames(frames: data_io.SparseFrames, times: int) -> data_io.SparseFrames:
    """``frames`` followed by ``times - 1`` copies of themselves (CSR offsets shifted, ids renumbered)."""

    def csr(offsets: np.ndarray, *values: np.ndarray):
        shifted = [offsets[:-1] + k * offsets[-1] for k in range(times)] + [offsets[-1:] * times]
        return (np.concatenate(shifted), *(np.tile(v, times) for v in values))

    photon_offsets, pixels, counts = csr(frames.photon_offsets, frames.photon_pixels, frames.photon_counts)
    dead_offsets, dead = csr(frames.dead_offsets, frames.dead_pixels)
    candidates = {}
    if frames.has_candidates:  # each copy keeps its frame's candidate rotations
        offsets, rotations = csr(frames.candidate_offsets, frames.candidate_rotations)
        candidates = {"candidate_offsets": offsets, "candidate_rotations": rotations}
    return data_io.SparseFrames(
        frame_id=np.arange(times * frames.n_frames), photon_offsets=photon_offsets, photon_pixels=pixels,
        photon_counts=counts, dead_offsets=dead_offsets, dead_pixels=dead,
        background=np.tile(frames.background, (times, 1)), **candidates,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--times", type=int, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if args.times < 1:
        parser.error(f"--times {args.times}: expected >= 1")
    with data_io.SparseDataset(args.data) as dataset:
        frames = dataset.read_block(0, dataset.n_frames)
        sampling_n = dataset.candidate_sampling_n
        truth = dataset.read_truth() if dataset.has_truth else None
        geometry, crystal, mask = dataset.geometry, dataset.crystal, dataset.mask
    n = frames.n_frames
    if truth is not None:  # per-frame arrays repeated; the model and the rest as they are
        truth = {k: np.tile(v, (args.times,) + (1,) * (v.ndim - 1))
                 if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n else v for k, v in truth.items()}
    big = repeat_frames(frames, args.times)
    big.validate()
    data_io.write_dataset(args.out, big, geometry=geometry, crystal=crystal, mask=mask, truth=truth,
                          candidate_sampling_n=sampling_n)
    print(f"wrote {args.out}: {big.n_frames} frames ({args.times} x {n}), {int(big.photon_offsets[-1])} photons")


if __name__ == "__main__":
    main()
