"""Why good frames get positive second-crystal evidence (emcjax.merge.evidence) on continuous orientations.

    python experiments/second_evidence.py RUN_DIR [RUN_DIR ...]          # runs with rejection.h5 and a truth
    python experiments/second_evidence.py --simulate 3 4 5 --out /tmp/second_evidence   # small sets first
    python experiments/second_evidence.py --simulate 4 --frames 30 --out /tmp/second_evidence-quick  # the test's

For each finished run (``emcjax.reject`` done; simulated data) it recomputes the second-crystal log Bayes
factor of every frame with three choices of the first crystal's orientation: the run's most likely grid
rotation A, the **true** orientation, and A refined off the grid (emcjax.merge.evidence.refine_first),
and what ``reject`` now computes ("reject": refined for the frames whose evidence with A is positive; checked
against the run's rejection.h5 when that was written with the refinement). It prints, per true frame kind, how many
frames have positive evidence with each, and the photons the first crystal's predicted peaks leave
(minus the background expected there) at A and at the truth, on all valid pixels and on the pixels reject
tests (emcjax.merge.modelled_pixels: away from the model's resolution limits). ``--simulate SEED ...``: first simulates
the data set of experiments/pipeline.py (60 frames, continuous orientations, 5 % blank, 5 % two-crystal)
with each seed (``--frames`` frames) and runs lowres (6 Å, 2 iterations, as the tutorial) and reject on it.
A run that saved refined continuous orientations (``best_quaternion``) has them as A, as reject does.

Small runs only (a Python loop over photons): ~10^2 frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emcjax.data import SparseDataset  # noqa: E402
from emcjax.frontend.grid_orbits import grid_orbits  # noqa: E402
from emcjax.merge import evidence as ev  # noqa: E402
from emcjax.merge.modelled_pixels import modelled_detector  # noqa: E402
from emcjax.merge.rundata import load_run  # noqa: E402
from emcjax.rotations import symmetric_misorientation  # noqa: E402
from emcjax.sampling_600cell import sample_600cell  # noqa: E402


def first_crystal_at(run, frames, photons, quaternions):
    """(n_photons,) W of each frame's first crystal at its photons' pixels and (n_frames,) its expected Bragg
    photons at scale 1 over the frame's valid shells, for one orientation per frame."""
    owner, index = photons[0], photons[1]
    tables = ev.ScanTables(run.grid, run.detector, run.result.intensity, quaternions)
    w = np.zeros(owner.shape[0])
    for j in range(owner.shape[0]):
        a, b = tables.pixel_start[index[j]], tables.pixel_start[index[j] + 1]
        w[j] = tables.w[a:b][tables.rotation[a:b] == owner[j]].sum()
    valid = np.asarray(frames.background)[:, : tables.signal.shape[1]] >= 0
    return w, np.sum(valid * tables.signal, axis=1)


def second_evidence(run, frames, photons, scan, first_quaternions, phi, psi, away_radius):
    """(n_frames,) log Bayes factor of a second crystal (emcjax.merge.evidence) beside the given first one."""
    owner, index, count, bg = photons
    w_first, _ = first_crystal_at(run, frames, photons, first_quaternions)
    beside = bg + phi[owner] * w_first
    llr = np.zeros((frames.n_frames, scan.n_rot))
    for j in range(owner.shape[0]):
        a, b = scan.pixel_start[index[j]], scan.pixel_start[index[j] + 1]
        np.add.at(llr[owner[j]], scan.rotation[a:b], count[j] * np.log1p(psi * scan.w[a:b] / beside[j]))
    llr -= psi * ev.signal_over_valid_shells(scan.signal, frames.background)
    ops = run.crystal.rotation_ops_cartesian
    away = symmetric_misorientation(first_quaternions[:, None, :], scan.quaternions[None], ops) > away_radius
    return ev.log_mean_exp(llr, away)


def off_peak_excess(run, frames, photons, quaternions) -> np.ndarray:
    """(n_frames,) photons outside the predicted peaks of the given orientations minus the background expected
    there (emcjax's per-shell background x polarization)."""
    owner, index, count = photons[0], photons[1], photons[2]
    det = run.detector
    tables = ev.ScanTables(run.grid, det, run.result.intensity, quaternions)
    entry_pixel = np.repeat(np.arange(det.n_pix), np.diff(tables.pixel_start))
    on = np.zeros((frames.n_frames, det.n_pix), bool)
    on[tables.rotation, entry_pixel] = True
    off_photons = np.bincount(owner, weights=count * ~on[owner, index], minlength=frames.n_frames)
    background = np.clip(np.asarray(frames.background, np.float64), 0, None)[:, det.shell] * det.polarization
    return off_photons - np.sum(background * ~on, axis=1)


def analyse(run_dir: pathlib.Path) -> tuple[dict, float]:
    """Prints the run's comparison; returns the counts per true frame kind ({kind: {choice: frames with second
    evidence > 0, "frames": frames}}) and the largest |difference| (nats) of the recomputed evidence from the
    run's rejection.h5 over the used frames."""
    from emcjax.merge.reject import RejectionCriteria

    run = load_run(run_dir)
    all_pixels = run.detector
    run = dataclasses.replace(run, detector=modelled_detector(run.grid, all_pixels))  # the pixels reject tests
    with h5py.File(run_dir / "rejection.h5", "r") as f:
        stored = f["second_evidence"][()]
        stored_step = float(f.attrs.get("evidence_refine_step", 0.0))
    truth = run.truth
    kind = np.asarray(truth["frame_kind"])
    true_q = np.asarray(truth["quaternion"])
    with SparseDataset(run.data_path) as ds:
        frames = ds.read_all()
    ops = run.crystal.rotation_ops_cartesian
    criteria = RejectionCriteria()
    phi = np.asarray(run.iteration["phi"], np.float64)
    used = run.weights() > 0
    psi = criteria.evidence_scale * float(np.median(phi[used]))
    owner, index, count, bg = ev.photons_on_valid_pixels(run.detector, frames)
    photons = (owner, index, count, bg)
    sampling = sample_600cell(criteria.evidence_rotation_n)
    scan = ev.ScanTables(run.grid, run.detector, run.result.intensity,
                         sampling.quaternions[grid_orbits(sampling, ops).representative])
    away = max(criteria.cluster_angle * 0.944 / run.sampling_n, criteria.cluster_angle * 0.944 / criteria.evidence_rotation_n)
    grid_q = run.best_quaternions()  # what reject takes: the grid rotation, or the run's refined orientation
    step = (stored_step or 0.5) * 0.944 / run.sampling_n
    refined_q = ev.refine_first(run.grid, run.detector, frames, run.result.intensity, grid_q, phi, step)
    second = {name: second_evidence(run, frames, photons, scan, q, phi, psi, away)
              for name, q in (("A", grid_q), ("truth", true_q), ("refined", refined_q))}
    # what reject does: refined only where A's is positive
    second["reject"] = np.where(second["A"] > 0, second["refined"], second["A"])
    # what reject stores: A, or with --criteria.evidence-refine-step > 0 the refined one where A's is positive
    expected = second["reject"] if stored_step > 0 else second["A"]
    difference = float(np.nanmax(np.abs(expected - stored)[used]))
    print(f"{run_dir}: second evidence recomputed vs rejection.h5 (refine step {stored_step}): max |difference| "
          f"{difference:.2g} nats")
    errors = {name: np.degrees(symmetric_misorientation(q, true_q, ops)) for name, q in (("A", grid_q), ("refined", refined_q))}
    good = used & (kind == 0)
    print(f"  one-crystal frames: median orientation error A {np.median(errors['A'][good]):.2f}°, refined "
          f"{np.median(errors['refined'][good]):.2f}°")
    for pixels, run_at in (("all valid", dataclasses.replace(run, detector=all_pixels)), ("modelled", run)):
        every = ev.photons_on_valid_pixels(run_at.detector, frames)
        total = np.bincount(every[0], weights=every[2], minlength=frames.n_frames)
        for name, q in (("A", grid_q), ("truth", true_q)):
            excess = off_peak_excess(run_at, frames, every, q)
            share = 100 * np.median(excess[good] / total[good])
            print(f"  one-crystal frames, {pixels} pixels: photons outside the peaks of {name} beyond the background "
                  f"there: median {np.median(excess[good]):.1f} ({share:.1f} % of the frame's photons)")
    counts = {}
    for label, k in (("one crystal", 0), ("blank", 1), ("two crystals", 2)):
        sel = used & (kind == k)
        counts[label] = {name: int(np.sum(s[sel] > 0)) for name, s in second.items()} | {"frames": int(sel.sum())}
        print(f"  {label:12s} second > 0: " + ", ".join(f"{name} {counts[label][name]}/{int(sel.sum())}" for name in second))
    flagged = np.flatnonzero(good & ((second["A"] > 0) | (second["refined"] > 0)))
    if flagged.size:
        print("  one-crystal frames flagged with A or refined: frame, phi / median, second evidence A / truth / refined: " + "; ".join(
            f"{d} {phi[d] / np.median(phi[used]):.2f} {second['A'][d]:.1f}/{second['truth'][d]:.1f}/{second['refined'][d]:.1f}"
            for d in flagged))
    return counts, difference


def simulate_and_run(seed: int, out: pathlib.Path, frames: int = 60) -> pathlib.Path:
    """experiments/pipeline.py's data set with ``seed`` (``frames`` frames), lowres at 6 Å (2 iterations),
    reject."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from pipeline import simulation

    from emcjax import emc, lowres, reject, simulate

    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if frames == 60 else f"-{frames}"
    data = out / f"data-{seed}{suffix}.h5"
    if not data.exists():
        simulate.write(simulation(data, frames, seed=seed))
    run_dir = out / f"lowres-{seed}{suffix}"
    if not (run_dir / "rejection.h5").exists():
        lowres.run(lowres.LowresConfig(data=data, out=run_dir, iters=2, seed=seed,
                                       emc=emc.EMCConfig(vn=5, d_min=6.0)), log=lambda s: None)
        reject.reject(reject.RejectConfig(run=run_dir), log=lambda s: None)
    return run_dir


def main(argv=None) -> dict:
    """Runs the comparison; returns {run directory: (counts, max |difference| from rejection.h5)}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=pathlib.Path)
    parser.add_argument("--simulate", nargs="*", type=int, default=[], metavar="SEED")
    parser.add_argument("--frames", type=int, default=60, help="frames of each --simulate data set")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-second-evidence"))
    args = parser.parse_args(argv)
    runs = list(args.runs) + [simulate_and_run(seed, args.out, args.frames) for seed in args.simulate]
    totals: dict = {}
    results = {}
    for run_dir in runs:
        results[run_dir] = analyse(run_dir)
        for label, row in results[run_dir][0].items():
            for key, value in row.items():
                totals.setdefault(label, {}).setdefault(key, 0)
                totals[label][key] += value
    if len(runs) > 1:
        print("all runs: " + "; ".join(
            f"{label}: " + ", ".join(f"{k} {v}/{row['frames']}" for k, v in row.items() if k != "frames")
            for label, row in totals.items()))
    return results


if __name__ == "__main__":
    main()
