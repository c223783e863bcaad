"""When do blank and two-crystal frames hurt the reconstruction, and does rejecting them help?

    python experiments/contamination.py --out /tmp/contamination

For each scenario (contaminated fractions, photons per frame, frames) it simulates a data set
(``emcjax.simulate --blank-fraction --multi-fraction``) and reconstructs it three times from the same seed:

* ``all``: every frame;
* ``rejected``: with the weights of ``emcjax.reject`` run on ``all`` (``lowres --frame-weights``);
* ``oracle``: only the frames the truth says hold one crystal (the best any rejection can do).

and prints cc_true (integrated intensities against the truth) overall and in the outer resolution shells,
plus the rejection per true frame kind. Writes OUT/summary.json. The runners are called in-process
(``emcjax.lowres.run``, ``emcjax.reject.reject``), so there is one JAX start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax

# name: (blank fraction, two-crystal fraction, Bragg photons per frame, frames, equal-strength second crystal)
SCENARIOS = {
    "acceptance": (0.05, 0.05, 150.0, 2000, False),
    "heavy": (0.3, 0.3, 150.0, 2000, False),
    "heavy_equal": (0.3, 0.3, 150.0, 2000, True),
    "heavy_weak": (0.3, 0.3, 40.0, 2000, False),
    "blank_weak": (0.6, 0.0, 40.0, 2000, False),
    "many_equal": (0.05, 0.05, 150.0, 20000, True),
}


def cc_shells(run: pathlib.Path, truth: dict, crystal, n_shells: int = 5) -> tuple[float, list[float]]:
    """cc_true of the run's integrated intensities, overall and per equal-volume shell."""
    from emcjax import runio
    from emcjax.merge.stats import equal_volume_edges, pearson, shell_of
    from emcjax.scoring import values_by_hkl

    result = runio.read_run(run)
    true_i = values_by_hkl(result.hkl, truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))
    q = np.linalg.norm(result.hkl @ crystal.reciprocal_basis.T, axis=1)
    shell = shell_of(q, equal_volume_edges(float(q.min()), float(q.max()), n_shells))
    i = np.asarray(result.integrated, np.float64)
    return pearson(i, true_i), [pearson(i[shell == s], true_i[shell == s]) for s in range(n_shells)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-contamination"))
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from emcjax import lowres, reject, simulate
    from emcjax.crystal import Crystal
    from emcjax.data import SparseDataset
    from emcjax.merge.rundata import write_frame_weights

    quiet = lambda *a, **k: None  # noqa: E731
    summary = {"machine": f"{platform.node()} {platform.machine()}", "iters": args.iters, "scenarios": {}}
    for name in args.scenarios:
        blank, multi, photons, n_frames, equal = SCENARIOS[name]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data.h5"
        start = time.perf_counter()
        if not data.exists():
            simulate.write(simulate.SimulationConfig(
                out=data, n_frames=n_frames, blank_fraction=blank, multi_fraction=multi, bragg_photons=photons,
                multi_equal=equal, seed=args.seed))
        with SparseDataset(data) as ds:
            truth = ds.read_truth()
            crystal = Crystal(tuple(ds.crystal["cell"]), str(ds.crystal["space_group"]))
        kind = np.asarray(truth["frame_kind"])
        write_frame_weights(out / "oracle.h5", (kind == 0).astype(np.float32), {"source": "truth frame_kind == 0"})
        base = lowres.LowresConfig(iters=args.iters, data=data, seed=args.seed, keep_checkpoints=1, iterations_every=0)
        runs = {"all": None, "rejected": out / "all" / reject.REJECTION_FILE, "oracle": out / "oracle.h5"}
        row: dict = {"blank": blank, "multi": multi, "bragg_photons": photons, "n_frames": n_frames,
                     "equal_crystals": equal}
        for arm, weights in runs.items():
            run = out / arm
            if not (run / "intensities.h5").exists():
                lowres.run(dataclasses.replace(base, out=run, frame_weights=weights), log=quiet)
            if arm == "all":
                counts = reject.reject(reject.RejectConfig(run=run), log=quiet)
                row["rejected_fraction"] = {k.removeprefix("rejected_fraction_"): round(v, 4)
                                            for k, v in counts.items() if k.startswith("rejected_fraction_")}
            cc, shells = cc_shells(run, truth, crystal)
            row[arm] = {"cc_true": round(cc, 5), "cc_true_per_shell": [round(c, 4) for c in shells]}
        row["seconds"] = round(time.perf_counter() - start, 1)
        summary["scenarios"][name] = row
        print(name, json.dumps(row), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
