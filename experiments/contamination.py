"""When do blank and two-crystal frames hurt the reconstruction, and does rejecting them help?

    python experiments/contamination.py --out /tmp/contamination --scenarios acceptance --seeds 0 1 2

For each scenario (contaminated fractions, photons per frame, frames) and seed it simulates a data set
(``emcjax.simulate --blank-fraction --multi-fraction``) and reconstructs it from the same seed with:

* ``all``: every frame;
* ``rejected``: with the weights of ``emcjax.reject`` run on ``all`` (``lowres --frame-weights``);
* ``oracle`` (``--arms ... oracle``): only the frames the truth says hold one crystal;
* ``no_blank``, ``no_multi``: every frame but the truth's blank ones, or its two-crystal ones;
* ``rejected_phi_zero``: the weights ``reject --drop phi_zero`` gives (only the frames flagged phi_zero out);
* ``next_all``, ``next_rejected``: the pipeline's order: ``--next-iters`` more iterations started from the
  ``all`` run's model and phi (``lowres --init-from``), on every frame or with ``reject``'s weights (compared
  with each other: the same start and iterations).

Per run it records, against the truth's integrated intensities (overall and per equal-volume shell): the
Pearson cc_true; the scale-only agreement (I ~ k I_true, k fitted without an offset, so an additive
offset such as a second crystal's photons would show): R_scale = sum |I - k I_true| / sum k I_true and
the uncentred correlation; the offset c of a fit I ~ k I_true + c relative to the shell's mean I; and
cc_true after each iteration (convergence from the random start). Prints one line per run and the
paired differences (arm - all; next_rejected - next_all) over seeds; writes OUT/summary.json and
OUT/contamination.png (the differences per seed). ``--quick``: one tiny scenario (the test's; ``--quick small``: on
the small crystal in continuous orientations). The runners are called in-process
(``emcjax.lowres.run``, ``emcjax.reject.reject``), so there is one JAX start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pipeline as pipeline_experiment  # noqa: E402  (experiments/pipeline.py: the small crystal's data set)



class Scenario(NamedTuple):
    """One contaminated data set: fractions of blank and two-crystal frames, photons per frame, frames."""

    blank: float
    multi: float
    bragg_photons: float
    n_frames: int
    equal_crystals: bool = False  # the second crystal gets the first's phi
    background_photons: float = 30.0
    background_error: float = 0.0  # the true background is (1 + this) x the data set's (poisson-bgscale draw)
    small_crystal: str = ""  # experiments/pipeline.py's small crystal (below) in "uniform" or "grid" orientations


SCENARIOS = {
    "acceptance": Scenario(0.05, 0.05, 150.0, 2000),
    "heavy": Scenario(0.3, 0.3, 150.0, 2000),
    "heavy_equal": Scenario(0.3, 0.3, 150.0, 2000, True),
    "heavy_weak": Scenario(0.3, 0.3, 40.0, 2000),
    "blank_weak": Scenario(0.6, 0.0, 40.0, 2000),
    "many_equal": Scenario(0.05, 0.05, 150.0, 20000, True),
    "few_1000": Scenario(0.05, 0.05, 150.0, 1000),
    "few_500": Scenario(0.05, 0.05, 150.0, 500),
    "few_heavy_500": Scenario(0.3, 0.3, 150.0, 500),
    "few_heavy_1000": Scenario(0.3, 0.3, 150.0, 1000),
    # sparse, background-rich frames (the paper's regime), 5 % blank + 5 % two-crystal
    "sparse_40_100": Scenario(0.05, 0.05, 40.0, 1000, background_photons=100.0),
    "sparse_40_100_2000": Scenario(0.05, 0.05, 40.0, 2000, background_photons=100.0),
    "sparse_20_60": Scenario(0.05, 0.05, 20.0, 2000, background_photons=60.0),
    "sparse_60_150": Scenario(0.05, 0.05, 60.0, 1000, background_photons=150.0),
    "sparse_30_150": Scenario(0.05, 0.05, 30.0, 2000, background_photons=150.0),
    "sparse_equal_40_100": Scenario(0.05, 0.05, 40.0, 1000, True, 100.0),
    # ... with 10 % more background photons than the data set's background says (EMC fits phi to them)
    "sparse_bgerr_40_100": Scenario(0.05, 0.05, 40.0, 1000, background_photons=100.0, background_error=0.1),
    # continuous (uniform random) true orientations, as real crystals have: experiments/pipeline.py's data set
    # (36 x 36 x 30 Å, broad peaks, 48 x 48 pixels to 4.5 Å, Wilson B 250) with the 12 rotations of the n = 16
    # sampling nearest each frame's truth as its candidate list; no searched rotation is the truth
    "continuous": Scenario(0.05, 0.05, 300.0, 1000, small_crystal="uniform"),
    "continuous_sparse": Scenario(0.05, 0.05, 60.0, 1000, background_photons=60.0, small_crystal="uniform"),
    "continuous_equal": Scenario(0.05, 0.05, 300.0, 1000, True, small_crystal="uniform"),
    # the same crystal with true orientations on the n = 16 grid (each candidate list holds the truth)
    "small_grid": Scenario(0.05, 0.05, 300.0, 1000, small_crystal="grid"),
}
SMALL_WILSON_B = 250.0
"""Wilson B (Å^2) of the small crystal's scenarios: the signal reaches the detector's edge."""
N_SHELLS = 5
ARMS = ["all", "rejected", "oracle", "no_blank", "no_multi", "rejected_phi_zero", "next_all", "next_rejected"]
BASE = {"next_rejected": "next_all"}  # the arm each is compared with (default: all)


def agreement(i: np.ndarray, t: np.ndarray) -> dict:
    """Pearson cc, scale-only R and uncentred cc, relative offset of I against the truth ``t`` (same rows)."""
    from emcjax.merge.stats import pearson

    k = float(i @ t / (t @ t))
    design = np.stack([t, np.ones_like(t)], axis=1)
    (_, c), *_ = np.linalg.lstsq(design, i, rcond=None)
    return {
        "cc": pearson(i, t),
        "r_scale": float(np.abs(i - k * t).sum() / (k * t).sum()),
        "cc_uncentred": float(i @ t / np.sqrt((i @ i) * (t @ t))),
        "offset": float(c / i.mean()),
    }


def measures(run: pathlib.Path, truth: dict, crystal) -> dict:
    """:func:`agreement` overall and per equal-volume shell of the run's integrated intensities; cc_true per
    iteration from its metrics.jsonl."""
    from emcjax import runio
    from emcjax.merge.stats import equal_volume_edges, shell_of
    from emcjax.scoring import values_by_hkl

    result = runio.read_run(run)
    true_i = values_by_hkl(result.hkl, truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))
    q = np.linalg.norm(result.hkl @ crystal.reciprocal_basis.T, axis=1)
    shell = shell_of(q, equal_volume_edges(float(q.min()), float(q.max()), N_SHELLS))
    i = np.asarray(result.integrated, np.float64)
    out = {"overall": agreement(i, true_i),
           "shells": [agreement(i[shell == s], true_i[shell == s]) for s in range(N_SHELLS)]}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out["cc_true_per_iteration"] = [round(float(json.loads(x)["cc_true"]), 5) for x in lines]
    return out


def stale(run: pathlib.Path, source) -> bool:
    """Whether a finished run used other frame weights than ``source`` holds now (e.g. reject's criteria
    changed since): the run is then redone."""
    import h5py

    used = run / "frame_weights.h5"
    if source is None or not used.exists():
        return source is not None or used.exists()
    with h5py.File(used, "r") as a, h5py.File(source, "r") as b:
        return not np.array_equal(a["weights"][()] > 0, b["weights"][()] > 0)


def paired(rows: list[dict], arm: str, base: str = "all") -> dict:
    """Mean and sd over seeds of (arm - base) for cc, r_scale, cc_uncentred overall and in the outer shell,
    and of cc_true after iterations 1-3."""
    if not all(arm in r and base in r for r in rows):
        return {}
    out = {}
    for key in ("cc", "r_scale", "cc_uncentred", "offset"):
        for where in ("overall", "outer"):
            pick = (lambda m: m["overall"][key]) if where == "overall" else (lambda m: m["shells"][-1][key])
            d = np.array([pick(r[arm]) - pick(r[base]) for r in rows])
            out[f"{key}_{where}"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                                     "n_positive": int(np.sum(d > 0)), "n": int(d.size)}
    done = min(len(r[a]["cc_true_per_iteration"]) for r in rows for a in (arm, base))
    for it in range(1, min(3, done) + 1):
        d = np.array([r[arm]["cc_true_per_iteration"][it - 1] - r[base]["cc_true_per_iteration"][it - 1]
                      for r in rows])
        out[f"cc_iteration_{it}"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                                     "n_positive": int(np.sum(d > 0)), "n": int(d.size)}
    return out


QUICK = Scenario(0.1, 0.1, 40.0, 100, background_photons=100.0)
"""--quick: 100 frames on a 64 x 64 detector to 8 Å (the tests' size), 2 + 1 iterations, one seed."""
QUICK_SMALL = Scenario(0.1, 0.1, 300.0, 60, small_crystal="uniform")
"""--quick small: 60 frames of the small crystal in continuous orientations, 2 + 1 iterations, one seed."""


def figure(summary: dict, path: pathlib.Path) -> None:
    """PNG: per scenario, cc_true of each arm minus its base (all, or next_all) for every seed, and the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["scenarios"])
    arms = sorted({a for v in summary["scenarios"].values() for a in v["paired"] if v["paired"][a]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.0))
    for k, arm in enumerate(arms):
        offset = (k - (len(arms) - 1) / 2) * 0.8 / max(len(arms), 1)
        for i, name in enumerate(names):
            rows = summary["scenarios"][name]["runs"]
            base = BASE.get(arm, "all")
            d = [r[arm]["overall"]["cc"] - r[base]["overall"]["cc"] for r in rows if arm in r and base in r]
            if d:
                ax.plot([i + offset] * len(d), d, ".", color=f"C{k}", alpha=0.6)
                ax.plot(i + offset, np.mean(d), "_", color=f"C{k}", markersize=14, label=arm if i == 0 else None)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("cc_true - cc_true of its base")
    ax.set_title("arm - all frames (next_rejected - next_all); dots: seeds, bars: mean", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-contamination"))
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--next-iters", type=int, default=5, help="iterations of the next_* arms")
    p.add_argument("--scenarios", nargs="*", default=["acceptance"], choices=list(SCENARIOS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--arms", nargs="*", default=["all", "rejected"], choices=ARMS)
    p.add_argument("--quick", nargs="?", const="default", choices=["default", "small"],
                   help="one tiny scenario (QUICK, or QUICK_SMALL with 'small'), for the tests")
    args = p.parse_args(argv)
    scenarios, geometry = SCENARIOS, {}
    if args.quick:
        from emcjax.detector import DetectorGeometry

        scenarios, args.scenarios, args.seeds, args.iters, args.next_iters = \
            {"quick": QUICK if args.quick == "default" else QUICK_SMALL}, ["quick"], [0], 2, 1
        args.arms = ["all", "rejected", "next_all", "next_rejected"]
        geometry = {"geometry": DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=3.6e-3,
                                                 beam_center_px=(31.5, 31.5), resolution_max_A=8.0, n_shells=10)}

    from emcjax import lowres, reject, simulate
    from emcjax.crystal import Crystal
    from emcjax.data import SparseDataset
    import h5py

    from emcjax.merge.reject import REASONS as reject_reasons, weights_from_flags
    from emcjax.merge.rundata import write_frame_weights

    quiet = lambda *a, **k: None  # noqa: E731
    path = args.out / "summary.json"  # scenarios run by separate calls accumulate
    summary = json.loads(path.read_text()) if path.exists() else {"scenarios": {}}
    summary["scenarios"] = {k: v for k, v in summary["scenarios"].items() if "runs" in v}  # this version's only
    summary.update(machine=f"{platform.node()} {platform.machine()}", iters=args.iters)
    for name in args.scenarios:
        blank, multi, photons, n_frames, equal, background, background_error, small = scenarios[name]
        rows = []
        for seed in args.seeds:
            out = args.out / name / f"seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            data = out / "data.h5"
            start, cpu = time.perf_counter(), time.process_time()
            if not data.exists():
                if small:
                    config = dataclasses.replace(
                        pipeline_experiment.simulation(data, n_frames, wilson_b=SMALL_WILSON_B, seed=seed),
                        blank_fraction=blank, multi_fraction=multi, bragg_photons=photons,
                        background_photons=background, multi_equal=equal, orientations=small, rotation_n=16)
                else:
                    config = simulate.SimulationConfig(
                        out=data, n_frames=n_frames, blank_fraction=blank, multi_fraction=multi,
                        bragg_photons=photons, background_photons=background, multi_equal=equal, seed=seed,
                        **geometry, **({"likelihood": "poisson-bgscale", "background_scale": 1 + background_error}
                                       if background_error else {}))
                simulate.write(config)
            with SparseDataset(data) as ds:
                truth = ds.read_truth()
                crystal = Crystal(tuple(ds.crystal["cell"]), str(ds.crystal["space_group"]))
            kind = np.asarray(truth["frame_kind"])
            for arm, keep in (("oracle", kind == 0), ("no_blank", kind != 1), ("no_multi", kind != 2)):
                write_frame_weights(out / f"{arm}.h5", keep.astype(np.float32), {"source": f"truth frame_kind: {arm}"})
            base = lowres.LowresConfig(iters=args.iters, data=data, seed=seed, keep_checkpoints=1, iterations_every=0)
            if small:  # the small crystal's model: vn = 5 voxels per reciprocal-lattice spacing
                base = dataclasses.replace(base, emc=dataclasses.replace(base.emc, vn=5))
            weights = {"all": None, "rejected": out / "all" / reject.REJECTION_FILE,
                       **{arm: out / f"{arm}.h5" for arm in ("oracle", "no_blank", "no_multi", "rejected_phi_zero")}}
            row: dict = {"seed": seed}
            for arm in ["all"] + [a for a in args.arms if a != "all"]:
                run = out / arm
                source = weights["rejected" if arm == "next_rejected" else "all" if arm == "next_all" else arm]
                if (run / "intensities.h5").exists() and stale(run, source):
                    shutil.rmtree(run)
                if not (run / "intensities.h5").exists():
                    if arm.startswith("next_"):
                        config = dataclasses.replace(base, out=run, iters=args.next_iters, init_from=out / "all",
                                                     frame_weights=source)
                    else:
                        config = dataclasses.replace(base, out=run, frame_weights=weights[arm])
                    lowres.run(config, log=quiet)
                if arm == "all":
                    counts = reject.reject(reject.RejectConfig(run=run), log=quiet)
                    row["reasons"] = {k: counts[k] for k in reject_reasons}
                    row["rejected_fraction"] = {k.removeprefix("rejected_fraction_"): round(v, 4)
                                                for k, v in counts.items() if k.startswith("rejected_fraction_")}
                    with h5py.File(run / reject.REJECTION_FILE, "r") as f:
                        flags = f["flags"][()]
                    write_frame_weights(weights["rejected_phi_zero"],
                                        weights_from_flags(np.ones(flags.shape), flags, ("phi_zero",)),
                                        {"source": "reject flags, phi_zero only"})
                row[arm] = measures(run, truth, crystal)
            row["seconds"] = round(time.perf_counter() - start, 1)
            row["cpu_seconds"] = round(time.process_time() - cpu, 1)
            rows.append(row)
            brief = {a: {k: round(v, 5) for k, v in row[a]["overall"].items()} for a in args.arms}
            print(name, seed, json.dumps({"rejected_fraction": row["rejected_fraction"], **brief,
                                          "seconds": row["seconds"]}), flush=True)
        summary["scenarios"][name] = {
            "blank": blank, "multi": multi, "bragg_photons": photons, "n_frames": n_frames, "equal_crystals": equal,
            "background_photons": background, "background_error": background_error, "small_crystal": small,
            "runs": rows, "paired": {a: paired(rows, a, BASE.get(a, "all")) for a in args.arms if a not in ("all", "next_all")},
        }
        for arm, d in summary["scenarios"][name]["paired"].items():
            print(name, f"{arm} - {BASE.get(arm, 'all')}:", json.dumps({k: [round(v["mean"], 5), round(v["sd"], 5), v["n_positive"]]
                                                     for k, v in d.items()}), flush=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
        figure(summary, args.out / "contamination.png")


if __name__ == "__main__":
    main()
