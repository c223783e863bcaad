"""Frame rejection: ``python -m emcjax.reject --run DIR``.

Reads a finished run (phi, the most likely orientation and the kept posterior pairs of its last iteration,
and the data set's photons), flags frames whose phi went to 0, whose orientation is not clearly
determined, that show two orientations no Laue-group rotation relates, whose photons the orientation
does not explain, that background alone explains better than a crystal, or that a second crystal explains
better (emcjax.merge.reject, emcjax.merge.evidence), and writes ``DIR/rejection.h5``: ``weights`` (0 = rejected; a
frame-weights file for ``lowres --frame-weights``), ``flags`` (bitmask), the test statistics and the
reasons. Prints the counts per reason (and, for simulated data, per true frame kind).

The orientation the photon and evidence tests take for the frame's (first) crystal is the refined continuous
``best_quaternion`` when the run saved one (emcjax.refinement), else the sampling rotation ``best_rotation``;
the output says which (attribute ``first_orientation``). The photon test and the second-crystal test look only
at the pixels where every Bragg photon falls in a peak the model holds (emcjax.merge.modelled_pixels: not within
two peak radii of the model's resolution limits, where the reflections it leaves out put theirs).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import h5py
import numpy as np

from emcjax import atomic_files, cli
from emcjax.merge import evidence as evidence_lib
from emcjax.merge.modelled_pixels import modelled_detector
from emcjax.merge import observe
from emcjax.merge import reject as reject_lib
from emcjax.merge.rundata import RunData, load_run

REJECTION_FILE = "rejection.h5"
READ_FRAMES = 20000  # frames read from the data set at a time by the photon test


@dataclasses.dataclass(frozen=True)
class RejectConfig:
    """Frame rejection for a finished run."""

    run: pathlib.Path
    """Run directory (of python -m emcjax.lowres); rejection.h5 is written into it."""
    criteria: reject_lib.RejectionCriteria = dataclasses.field(default_factory=reject_lib.RejectionCriteria)
    """Thresholds of the tests."""
    photon_test: bool = True
    """Test the photons outside the predicted peaks (reads the data set's photons)."""
    evidence_test: bool = True
    """The Bayes-factor tests for a crystal and a second crystal (reads the photons; scans the rotations of
    --criteria.evidence-rotation-n for the second)."""
    drop: tuple[reject_lib.Reason, ...] = tuple(reject_lib.REASONS)
    """Reasons that set a frame's weight to 0 (every reason is still flagged and counted); e.g. --drop phi_zero
    drops only the blank frames and keeps the two-crystal ones, whose leading crystal EMC fits
    (docs/BENCHMARKS.md: with few frames that did better than dropping both)."""


def _unexplained(run: RunData, log) -> tuple[np.ndarray, np.ndarray]:
    from emcjax.data import SparseDataset

    observed, expected = np.zeros(run.n_frames), np.zeros(run.n_frames)
    detector = modelled_detector(run.grid, run.detector)  # no photons of reflections the model leaves out
    with SparseDataset(run.data_path) as ds:
        for start in range(0, run.n_frames, READ_FRAMES):
            stop = min(start + READ_FRAMES, run.n_frames)
            frames = ds.read_block(start, stop)
            o, e = observe.unexplained_photons(run.grid, detector, frames, run.best_quaternions(start, stop))
            observed[start:stop], expected[start:stop] = o, e
            log(f"photon test: {stop}/{run.n_frames} frames")
    return observed, expected


def _evidence(run: RunData, criteria: reject_lib.RejectionCriteria, used: np.ndarray, radius: float, log):
    from emcjax.data import SparseDataset, SparseFrames
    from emcjax.frontend.grid_orbits import grid_orbits
    from emcjax.sampling_600cell import sample_600cell

    def reduced(n):  # one rotation per orbit of the Laue group (the model is symmetric)
        sampling = sample_600cell(n)
        return sampling.quaternions[grid_orbits(sampling, run.crystal.rotation_ops_cartesian).representative]

    scan_n = criteria.evidence_rotation_n or run.sampling_n
    # a scan rotation nearer the first crystal than the scan's own cluster radius shares its peaks: not a second
    away = max(radius, criteria.cluster_angle * 0.944 / scan_n)
    n_orientations = reduced(run.sampling_n).shape[0]
    intensity = run.result.intensity
    # the second crystal (and the first's refinement for it): only where no reflection the model leaves out puts
    # photons (the first crystal's there would be evidence for a second)
    detector = modelled_detector(run.grid, run.detector)
    scan = evidence_lib.ScanTables(run.grid, detector, intensity, reduced(scan_n))
    phi = np.asarray(run.iteration["phi"], np.float64)
    psi = criteria.evidence_scale * float(np.median(phi[used]))
    crystal, second = np.zeros(run.n_frames), np.zeros(run.n_frames)
    step = criteria.evidence_refine_step * 0.944 / run.sampling_n
    ops = run.crystal.rotation_ops_cartesian
    refined = 0
    with SparseDataset(run.data_path) as ds:
        for start in range(0, run.n_frames, READ_FRAMES):
            stop = min(start + READ_FRAMES, run.n_frames)
            frames, best_q = ds.read_block(start, stop), run.best_quaternions(start, stop)
            # a crystal: all valid pixels (photons no predicted peak holds only add 0 to its sum)
            crystal[start:stop] = evidence_lib.crystal_bound(run.grid, run.detector, frames, intensity, best_q, psi,
                                                             n_orientations)
            second[start:stop] = evidence_lib.crystal_evidence(
                run.grid, detector, frames, intensity, best_q, phi[start:stop], scan, ops, away, psi,
                n_orientations)[1]
            # the frames a second crystal would flag, again with their first crystal refined off the grid
            # (emcjax.merge.evidence: why); the others are not flagged either way, and refining all costs ~27x
            again = np.flatnonzero(second[start:stop] > criteria.max_second_evidence) if step > 0 else []
            if len(again):
                some = SparseFrames.concatenate(frames.frame_slice(d, d + 1) for d in again)
                first = evidence_lib.refine_first(run.grid, detector, some, intensity, best_q[again],
                                                  phi[start + again], step)
                second[start + again] = evidence_lib.crystal_evidence(
                    run.grid, detector, some, intensity, best_q[again], phi[start + again], scan, ops, away, psi,
                    n_orientations, first_quaternions=first)[1]
                refined += len(again)
            log(f"evidence test ({scan.n_rot} rotations): {stop}/{run.n_frames} frames"
                + (f", {refined} with the first crystal refined" if step > 0 else ""))
    return crystal, second


def reject(config: RejectConfig, log=print) -> dict:
    """Runs the tests and writes ``config.run/rejection.h5``; returns the counts per reason (and totals)."""
    start = time.perf_counter()
    run = load_run(config.run)
    it = run.iteration
    used = run.weights() > 0
    criteria = config.criteria
    first_orientation = "best_quaternion" if run.has_refined_orientations else "best_rotation"
    if config.photon_test or config.evidence_test:
        log("first crystal's orientation: " + (
            "the run's refined continuous orientations (best_quaternion)" if run.has_refined_orientations
            else "the run's most likely sampling rotations (best_rotation)"))
    radius = criteria.cluster_angle * 0.944 / run.sampling_n
    if "kept_frame" in it:
        rotations, probs = reject_lib.per_frame_pairs(
            it["kept_frame"], it["kept_rotation"], it["kept_prob"], run.n_frames
        )
        from emcjax.sampling_600cell import sample_600cell

        first, second = reject_lib.cluster_masses(
            rotations, probs, sample_600cell(run.sampling_n).quaternions, run.crystal.rotation_ops_cartesian, radius
        )
    else:
        log("note: the run's iteration file holds no kept pairs: the orientation tests use the best probability only")
        first, second = np.asarray(it["best_probability"], np.float64), np.full(run.n_frames, np.nan)
    unexplained = _unexplained(run, log) if config.photon_test else None
    if unexplained is not None:  # frames outside this run's set take no part in the robust statistics
        unexplained = tuple(np.where(used, x, np.nan) for x in unexplained)
    evidence = _evidence(run, criteria, used, radius, log) if config.evidence_test else None
    if evidence is not None:
        evidence = tuple(np.where(used, x, np.nan) for x in evidence)
    flags, z = reject_lib.frame_flags(
        *(np.where(used, x, np.nan) for x in (it["phi"], first, second)), unexplained, criteria, evidence
    )
    flags[~used] = 0
    weights = reject_lib.weights_from_flags(run.weights(), flags, config.drop)

    path = config.run / REJECTION_FILE
    with atomic_files.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("weights", data=weights.astype(np.float32))
            f.create_dataset("flags", data=flags)
            f.create_dataset("first_mass", data=first.astype(np.float32))
            f.create_dataset("second_mass", data=second.astype(np.float32))
            f.create_dataset("unexplained_z", data=z.astype(np.float32))
            if evidence is not None:
                f.create_dataset("crystal_evidence", data=evidence[0].astype(np.float32))
                f.create_dataset("second_evidence", data=evidence[1].astype(np.float32))
            f.attrs["reasons"] = ", ".join(f"{name}={bit}" for name, bit in reject_lib.REASONS.items())
            f.attrs["iteration"] = int(it.get("iteration", -1))
            f.attrs["drop"] = ", ".join(config.drop)
            f.attrs["first_orientation"] = first_orientation
            for key, value in dataclasses.asdict(criteria).items():
                f.attrs[key] = value
    counts = reject_lib.reason_counts(flags)
    n_used, n_rejected = int(used.sum()), int(np.sum(used & (flags != 0)))
    n_dropped = int(np.sum(used & (weights == 0)))
    log(
        f"rejected {n_rejected} of {n_used} frames ({100 * n_rejected / max(n_used, 1):.1f} %); "
        "a frame may have several reasons:"
    )
    if set(config.drop) != set(reject_lib.REASONS):
        log(f"weight 0 (reasons {', '.join(config.drop)}): {n_dropped} frames")
    for name, count in counts.items():
        log(f"  {name:<20s} {count:8d}")
    summary = {"n_frames": n_used, "rejected": n_rejected, "weight_zero": n_dropped, **counts}
    kind = None if run.truth is None else run.truth.get("frame_kind")
    if kind is not None:
        parts = []
        for label, k in (("one crystal", 0), ("blank", 1), ("two crystals", 2)):
            sel = used & (np.asarray(kind) == k)
            if sel.any():
                frac = float(np.mean(flags[sel] != 0))
                summary[f"rejected_fraction_{label.replace(' ', '_')}"] = frac
                parts.append(f"{label}: {int(np.sum(flags[sel] != 0))}/{int(sel.sum())} ({100 * frac:.1f} %)")
        log("rejected per true frame kind: " + "; ".join(parts))
    log(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return summary


def run(config: RejectConfig, log=print):
    """The stage as a function (for emcjax.pipeline and scripts): the same as :func:`reject`."""
    return reject(config, log=log)


main = cli.stage_main(RejectConfig, reject, "emcjax.reject", __doc__)


if __name__ == "__main__":
    main()
