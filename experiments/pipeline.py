"""The one-command pipeline on simulated data with continuous orientations, blank and two-crystal frames
(issue 16 acceptance): ``python experiments/pipeline.py [--frames 300] [--iters 5] [--interrupt] [--highres 6]``.

Simulates a small crystal (P 43 21 2, 36 x 36 x 30 Å, broad peaks, Wilson B set by ``--wilson-b`` so that the
signal fades inside the detector) with uniform random orientations, ``--blank-fraction`` blank and
``--multi-fraction`` two-crystal frames and, per frame, the ``--candidates`` rotations of the n = 16 sampling
nearest the truth (what ``emcjax.orient`` gives from spots); runs ``python -m emcjax.pipeline`` on it (with
``--interrupt``: stopped by Ctrl-C-like interruption in half set a's second iteration, then run again; with
``--highres D``: the low-res runs to D Å, then the pipeline's [highres] stages to the detector's edge) and prints
the acceptance numbers: CC(IMEAN of the MTZ, truth), the per-shell CC of the merged data with the truth, the
suggested limit and the shell where the truth correlation drops below 0.5, frames rejected per true kind (and,
with ``--highres``, each high-resolution run's cc_true and median orientation error).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emcjax import pipeline, simulate  # noqa: E402
from emcjax.detector import DetectorGeometry  # noqa: E402

TRUTH_LIMIT = 0.5
"""The truth correlation of a shell below which the data stop: where the suggested limit should be."""


def simulation(out: pathlib.Path, frames: int, candidates: int = 12, wilson_b: float = 800.0, bragg: float = 300.0,
               seed: int = 3) -> simulate.SimulationConfig:
    """The simulated data set: 48 x 48 pixels out to 4.5 Å, continuous orientations, 5 % blank and 5 %
    two-crystal frames, candidate lists on the n = 16 sampling."""
    return simulate.SimulationConfig(
        out=out, n_frames=frames, orientations="uniform", candidates=candidates, candidate_n=16,
        geometry=DetectorGeometry(num_rows=48, num_cols=48, pixel_size_m=3.6e-3, beam_center_px=(23.5, 23.5),
                                  distance_m=0.3, resolution_max_A=4.5, n_shells=10),
        cell=(36.0, 36.0, 30.0, 90.0, 90.0, 90.0), vn=5, gw=2.0, profile_width=0.8, bragg_photons=bragg,
        background_photons=30.0, wilson_b=wilson_b, blank_fraction=0.05, multi_fraction=0.05, seed=seed,
    )


def pipeline_args(data: pathlib.Path, out: pathlib.Path, iters: int, shells: int = 6,
                  highres: float | None = None) -> list[str]:
    """The pipeline's flags; ``highres``: the low-res runs' d_min (Å), then [highres] (as many iterations) to
    the detector's edge (None: the low-res runs reach the edge)."""
    args = ["--data", str(data), "--out", str(out), "--lowres.iters", str(iters), "--lowres.emc.vn", "5",
            "--resolution.n-shells", str(shells)]
    if highres is not None:
        args += ["--lowres.emc.d-min", str(highres), "--highres.enabled", "--highres.iters", str(iters)]
    return args


class Interrupt:
    """A log function that raises KeyboardInterrupt (as Ctrl-C would) when a line starts with ``trigger`` in
    stage ``stage``, once; it prints what it gets."""

    def __init__(self, stage: str, trigger: str, log=print):
        self.stage, self.trigger, self.log = stage, trigger, log
        self.current, self.fired = None, False

    def __call__(self, line: str) -> None:
        self.log(line)
        if line.startswith("["):
            self.current = line.split("]", 1)[1].split(":", 1)[0].strip()
        if not self.fired and self.current == self.stage and line.strip().startswith(self.trigger):
            self.fired = True
            raise KeyboardInterrupt(f"test interruption in {self.stage} at {line.strip()[:20]!r}")


def acceptance(out: pathlib.Path, record: dict) -> dict:
    """The numbers of the issue's acceptance from a finished pipeline directory."""
    rows = list(csv.DictReader((out / "merged" / "merging_stats.csv").open()))[:-1]
    d_min = np.array([float(r["d_min"]) for r in rows])
    cc_true = np.array([float(r["cc_true"]) for r in rows])
    below = np.flatnonzero(cc_true < TRUTH_LIMIT)
    truth_shell = int(below[0]) - 1 if below.size else len(rows) - 1  # the last shell before the drop
    d_suggested = record["stages"]["resolution"]["summary"]["d_suggested"]
    suggested_shell = int(np.argmin(np.abs(d_min - d_suggested))) if d_suggested is not None else -1
    export = record["stages"]["export"]["summary"]
    return {"cc_true_imean": export["cc_true_imean"], "reflections": export["reflections"],
            "cc_true_per_shell": cc_true.round(3).tolist(), "shell_d_min": d_min.round(2).tolist(),
            "truth_shell": truth_shell, "suggested_shell": suggested_shell, "d_suggested": d_suggested,
            "reject": record["stages"]["reject"]["summary"],
            **{f"{name}_run": record["stages"][name]["summary"] | orientation_error(out / name)
               for name in HIGHRES_STAGES if name in record["stages"]}}


HIGHRES_STAGES = ("highres", "half_a_highres", "half_b_highres")


def orientation_error(run_dir: pathlib.Path) -> dict:
    """The last iteration's median orientation error (degrees, over the run's frames) of a run directory."""
    from emcjax import runio

    last = runio.read_metrics(run_dir)[-1]
    return {k: round(last[k], 3) for k in ("orientation_error_median_deg",) if k in last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--wilson-b", type=float, default=800.0)
    parser.add_argument("--bragg-photons", type=float, default=300.0)
    parser.add_argument("--shells", type=int, default=6)
    parser.add_argument("--interrupt", action="store_true", help="interrupt half set a once, then run again")
    parser.add_argument("--highres", type=float, default=None, metavar="D_LOW",
                        help="low-res runs to D_LOW Å, then the [highres] stages to the detector's edge (4.5 Å)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-pipeline"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data.h5"
    if not data.exists():
        simulate.write(simulation(data, args.frames, args.candidates, args.wilson_b, args.bragg_photons))
    out = args.out / (f"run-{args.frames}-{args.iters}{'-interrupted' if args.interrupt else ''}"
                      f"{f'-highres{args.highres:g}' if args.highres is not None else ''}")
    config = pipeline.parse_args(pipeline_args(data, out, args.iters, args.shells, args.highres))
    start = time.perf_counter()
    if args.interrupt:
        try:
            pipeline.run(config, log=Interrupt("half_a", "iter 2/"))
        except KeyboardInterrupt as err:
            print(f"interrupted: {err}")
    record = pipeline.run(config)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    numbers = acceptance(out, record)
    for key, value in numbers.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
