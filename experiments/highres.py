"""Low-res then high-res on continuous orientations (issue 12 acceptance).

A simulation with continuous (uniform on SO(3)) true orientations and, per frame, the K rotations of the
n_c 600-cell sampling nearest the truth as candidates (what spot-based preselection gives); a 4 Å
low-resolution run in candidate mode on that sampling, then a 3 Å high-resolution local update
(`python -m emcjax.highres`) on the fine sampling n_f = ceil(n_c x 4/3). Prints cc_true per resolution shell
of both models, the median orientation error before and after, the time per iteration and the per-pair
rate, and the cost of a full search over the fine grid estimated from that rate.

    python experiments/highres.py [--frames 500] [--bragg-photons 150] [--coarse-n 24] [--candidates 20]
        [--lowres-iters 6] [--highres-iters 4] [--block-frames 100] [--full-search-n 6] [--out DIR]

The crystal is small (P 43 21 2, 36 x 36 x 30 Å) with broad peaks (vn = 5, gw = 2, profile sigma 0.8 grid
spacings) so that a grid of n ~ 30 resolves orientations to the peak width at 3 Å on a CPU; the detector
(128 x 128, 1.8 mm pixels at 0.3 m, 1 Å) reaches 2.9 Å at its edges. Frames are processed in blocks
(--block-frames) to bound the in-peak entries of the candidate rotations held at once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from emcjax import emc, highres, lowres, runio, scoring, simulate
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset
from emcjax.detector import DetectorGeometry
from emcjax.rotation_symmetry import grid_symmetry_orbits
from emcjax.sampling_600cell import n_rotations_600cell, sample_600cell

SHELLS_A = (30.0, 8.0, 6.0, 5.0, 4.0, 3.6, 3.3, 3.0)


def simulation(args, out: pathlib.Path) -> simulate.SimulationConfig:
    return simulate.SimulationConfig(
        out=out, n_frames=args.frames, orientations="uniform", candidates=args.candidates, candidate_n=args.coarse_n,
        geometry=DetectorGeometry(num_rows=128, num_cols=128, pixel_size_m=1.8e-3, beam_center_px=(63.5, 63.5),
                                  distance_m=0.3, resolution_max_A=3.0),
        cell=(36.0, 36.0, 30.0, 90.0, 90.0, 90.0), vn=5, gw=2.0, profile_width=0.8,
        bragg_photons=args.bragg_photons, background_photons=args.background_photons, wilson_b=5.0, seed=args.seed,
    )


def shells(run_dir: pathlib.Path, truth: dict, crystal: Crystal, edges=SHELLS_A) -> list[dict]:
    result = runio.read_run(run_dir)
    true_integrated = np.asarray(truth["intensity"], np.float64).sum(axis=1)
    return scoring.cc_by_shell(result.hkl, result.integrated, truth["hkl"], true_integrated,
                               crystal.reciprocal_basis, edges)


def full_search_rate(args, data: pathlib.Path, high: highres.HighresConfig, estep_passes: int) -> tuple[float, int]:
    """(frame, rotation) pairs per second of a full search (no candidate lists, exact symmetry reduction) at the
    high resolution on the coarser grid ``--full-search-n``, from the high-res model; the second of two
    iterations is timed (the first compiles)."""
    import dataclasses

    config = emc.EMCConfig(rotation_n=args.full_search_n, d_min=high.resolution, vn=5, gw=2.0,
                           update_phi=high.refine_phi, block_frames=args.block_frames)
    final = runio.read_run(high.out)
    with SparseDataset(data) as ds:
        frames = dataclasses.replace(ds.read_all(), candidate_offsets=None, candidate_rotations=None)
        problem = emc.setup_problem(ds, config, frames)
    state = emc.initial_state(problem, config, 0)
    state = state._replace(intensity=jnp.asarray(final.intensity), phi=jnp.asarray(final.phi))
    n_rot = int(problem.rotations.shape[0])
    for _ in range(2):
        state, metrics, _ = emc.iterate(problem, state, config)
    return args.frames * n_rot * estep_passes / metrics["seconds"], n_rot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--block-frames", type=int, default=100)
    parser.add_argument("--coarse-n", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--bragg-photons", type=float, default=150.0)
    parser.add_argument("--background-photons", type=float, default=40.0)
    parser.add_argument("--lowres-iters", type=int, default=6)
    parser.add_argument("--highres-iters", type=int, default=4)
    parser.add_argument("--full-search-n", type=int, default=6,
                        help="600-cell n of the full search timed at 3 Å for the per-pair rate (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/exp-highres"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    data = args.out / "data.h5"
    if not data.exists():
        start = time.perf_counter()
        simulate.write(simulation(args, data))
        print(f"simulated {args.frames} frames in {time.perf_counter() - start:.1f} s -> {data}")
    with SparseDataset(data) as ds:
        truth = ds.read_truth()
        crystal = Crystal(cell=tuple(ds.crystal["cell"]), space_group=str(ds.crystal["space_group"]))
        photons = ds.read_all().photons_per_frame()
    print(f"photons per frame: {photons.mean():.1f} (Bragg expected {np.mean(truth['expected_bragg_photons']):.1f})")
    q = np.linalg.norm(truth["hkl"] @ crystal.reciprocal_basis.T, axis=1)
    per_refl = np.asarray(truth["intensity"]).sum(axis=1)
    outer = q > 1 / 4.0
    print(f"unique reflections: {q.size}, {outer.sum()} in 4-3 Å holding {per_refl[outer].sum() / per_refl.sum():.1%} "
          "of the Bragg intensity")

    low = lowres.LowresConfig(data=data, out=args.out / "lowres", iters=args.lowres_iters,
                              emc=emc.EMCConfig(d_min=4.0, vn=5, gw=2.0, block_frames=args.block_frames))
    if not (low.out / runio.INTENSITIES_FILE).exists():
        lowres.run(low)
    high = highres.HighresConfig(from_run=low.out, resolution=3.0, iters=args.highres_iters, out=args.out / "highres",
                                  block_frames=args.block_frames)
    if not (high.out / runio.INTENSITIES_FILE).exists():
        highres.run(high)

    source = json.loads((high.out / highres.SOURCE_FILE).read_text())
    low_metrics, high_metrics = runio.read_metrics(low.out), runio.read_metrics(high.out)
    print("\ncc_true per shell (integrated intensities of the unique reflections)")
    print(f"{'shell (Å)':>12} {'n':>5} {'low-res 4 Å':>12} {'high-res 3 Å':>13}")
    low_shells = {(s["d_max"], s["d_min"]): s for s in shells(low.out, truth, crystal)}
    for s in shells(high.out, truth, crystal):
        lo = low_shells[(s["d_max"], s["d_min"])]
        lo_cc = f"{lo['cc']:.4f}" if lo["n"] >= 3 else "-"
        print(f"{s['d_max']:>5.1f}-{s['d_min']:<5.1f} {s['n']:>5d} {lo_cc:>12} {s['cc']:>13.4f}")
    low_wide = {(s["d_max"], s["d_min"]): s for s in shells(low.out, truth, crystal, (8.0, 4.0))}
    for s in shells(high.out, truth, crystal, (8.0, 4.0, 3.0)):
        lo = low_wide.get((s["d_max"], s["d_min"]))
        lo_cc = f"{lo['cc']:.4f}" if lo else "-"
        print(f"{s['d_max']:>5.1f}-{s['d_min']:<5.1f} {s['n']:>5d} {lo_cc:>12} {s['cc']:>13.4f}  (combined)")
    print(f"\ncc_true overall: low-res {low_metrics[-1]['cc_true']:.4f}, high-res {high_metrics[-1]['cc_true']:.4f}")
    print(f"median orientation error: low-res (n = {source['coarse_n']}) {source['lowres_orientation_error_median_deg']:.3f}°, "
          f"high-res (n = {source['fine_n']}) {high_metrics[-1]['orientation_error_median_deg']:.3f}°")

    # cost: per-iteration time of the local update vs a full search over the fine grid (same frames)
    seconds = float(np.median([m["seconds"] for m in high_metrics[1:] or high_metrics]))
    estep_passes = 2 if high.refine_phi else 1
    pairs = source["candidates_total"] * estep_passes
    # the exact reduction keeps ~ n_rot / |H| rotations for every n (H: the point-group operations that map the
    # 600-cell onto itself, the same for all n): its ratio measured on the n = 2 grid
    small = sample_600cell(2)
    ratio = grid_symmetry_orbits(small, crystal.rotation_ops_cartesian)[0].shape[0] / small.n_rot
    n_fine = n_rotations_600cell(source["fine_n"])
    reduced = int(round(n_fine * ratio))
    full_pairs = args.frames * reduced * estep_passes
    print(f"\nlocal update: {source['candidates_per_frame_mean']:.1f} fine candidates per frame "
          f"({source['fine_rotations_used']} of {n_fine} fine rotations used), {seconds:.2f} s per iteration "
          f"({pairs / seconds:.3g} (frame, rotation) pairs per second)")
    print(f"full search over the fine grid: ~{reduced} rotations after the exact symmetry reduction "
          f"({n_fine} in all) x {args.frames} frames = {full_pairs:.3g} pairs per iteration "
          f"({full_pairs / pairs:.0f}x the local update's pairs)")
    if args.full_search_n:
        rate, n_rot = full_search_rate(args, data, high, estep_passes)
        print(f"measured full search at 3 Å, n = {args.full_search_n} ({n_rot} rotations after reduction): "
              f"{rate:.3g} pairs per second -> the fine-grid full search would take ~{full_pairs / rate:.3g} s per "
              f"iteration, {full_pairs / rate / seconds:.0f}x the local update")
    low_seconds = float(np.median([m["seconds"] for m in low_metrics[1:]]))
    print(f"low-res iteration (candidate mode, {args.candidates} per frame, 2 E-steps): {low_seconds:.2f} s")


if __name__ == "__main__":
    main()
