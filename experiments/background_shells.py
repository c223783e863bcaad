"""Experiment: the per-shell background correction on data whose recorded background is wrong shell by shell.

    python experiments/background_shells.py [--quick] [--out DIR] [--seeds N]

One simulated data set whose true background in radial shell s is g_s times the one written to the file (g_s
rising linearly in |q| from --low to --high over the detector's shells: a recorded radial profile that is too
steep or too flat, e.g. a mis-modelled solvent ring). It is reconstructed from the same random starts with the
recorded background (plain Poisson), with the per-shell correction refined in the M-step
(--emc.refine-background-shells), with the correction and the per-frame background scale refined together
(poisson-bgscale, --emc.refine-background), and, as the ceiling, from the same photons with the true background
recorded. Records cc_true, the log-likelihood, the median orientation error and the refined factors per
iteration. Writes background_shells.png, background_shells.md and background_shells.json.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

import emcjax
import research_common as rc
from emcjax import data as data_io
from emcjax import scoring
from emcjax.simulate import SimulationConfig, simulate


def write_data(work, sizes: dict, low: float, high: float):
    """(path with the mis-scaled recorded background, path with the true one, true factors (n_shells,))."""
    geometry = rc.geometry(sizes["d_min"])
    config = SimulationConfig(geometry=geometry, n_frames=sizes["frames"], rotation_n=sizes["rotation_n"],
                              bragg_photons=sizes["bragg"], background_photons=sizes["background"], seed=31)
    detector = emcjax.make_detector(geometry)
    n_shells = geometry.n_shells
    populated = np.bincount(detector.shell, minlength=n_shells) > 0
    factors = np.ones(n_shells)
    first, last = np.flatnonzero(populated)[[0, -1]]
    factors[first : last + 1] = np.linspace(low, high, last - first + 1)
    tag = f"{sizes['frames']}f_{sizes['background']:g}bg_{low:g}-{high:g}"
    paths = (work / f"bgshells_recorded_{tag}.h5", work / f"bgshells_true_{tag}.h5")
    if not all(p.exists() for p in paths):
        frames, truth = simulate(config)
        crystal = {"cell": np.asarray(config.cell), "space_group": config.space_group, "vn": config.vn,
                   "gw": config.gw}
        recorded = dataclasses.replace(frames, background=(frames.background / factors).astype(np.float32))
        for path, f in zip(paths, (recorded, frames)):
            data_io.write_dataset(path, f, geometry=dataclasses.asdict(geometry), crystal=crystal, truth=truth,
                                  overwrite=True)
    return paths, factors, populated


def intensity_error(problem, intensity) -> float:
    """||k I - I_true|| / ||I_true|| of the integrated intensities (common hkl), k the least-squares scale: what
    a background error adds to the intensities (a per-shell offset barely moves their correlation)."""
    truth = problem.truth
    key = {tuple(h): i for i, h in enumerate(np.asarray(problem.grid.asu.hkl).tolist())}
    pairs = [(key[tuple(h)], j) for j, h in enumerate(np.asarray(truth["hkl"]).tolist()) if tuple(h) in key]
    ia, ib = np.asarray(pairs).T
    model = np.asarray(problem.integrated(intensity), np.float64)[ia]
    true = np.asarray(truth["intensity"], np.float64).sum(1)[ib]
    k = model @ true / max(model @ model, 1e-30)
    return float(np.linalg.norm(k * model - true) / np.linalg.norm(true))


def main(argv=None) -> None:
    p = rc.parser(__doc__)
    p.add_argument("--seeds", type=int, default=None, help="random starts per model (default 1 quick, 3 full)")
    p.add_argument("--low", type=float, default=0.6, help="true / recorded background in the lowest shell")
    p.add_argument("--high", type=float, default=1.5, help="true / recorded background in the highest shell")
    args = p.parse_args(argv)
    sizes = (dict(d_min=8.0, frames=40, rotation_n=2, bragg=120.0, background=1500.0, iters=2, seeds=1)
             if args.quick else
             dict(d_min=8.0, frames=1000, rotation_n=3, bragg=120.0, background=1500.0, iters=10, seeds=3))
    if args.seeds is not None:
        sizes["seeds"] = args.seeds
    (recorded, true_path), factors, populated = write_data(rc.work_dir(args), sizes, args.low, args.high)
    n = sizes["rotation_n"]
    models = {
        "recorded background": (recorded, emcjax.EMCConfig(rotation_n=n)),
        "per-shell correction": (recorded, emcjax.EMCConfig(rotation_n=n, refine_background_shells=True)),
        "per-shell + per-frame scale": (recorded, emcjax.EMCConfig(
            rotation_n=n, likelihood="poisson-bgscale", refine_background=True, refine_background_shells=True)),
        "true background (ceiling)": (true_path, emcjax.EMCConfig(rotation_n=n)),
    }
    if args.quick:  # CI: the correction and its baselines (the joint refinement is tested in tests/)
        models.pop("per-shell + per-frame scale")
    start = time.perf_counter()
    histories, rows, recovered = {}, [], {}
    for name, (path, config) in models.items():
        problem = rc.setup(path, config)
        finals = []
        for seed in range(sizes["seeds"]):
            state = emcjax.initial_state(problem, config, seed)
            history, clock = [], time.perf_counter()
            for i in range(sizes["iters"]):
                state, metrics, per_frame = emcjax.iterate(problem, state, config)
                history.append({"iteration": i + 1, **metrics, "wall_s": time.perf_counter() - clock,
                                **scoring.orientation_metrics(problem, per_frame["best_rotation"])})
            histories[(name, seed)] = history
            finals.append(history[-1])
            error = float("nan")
            if state.background_shell is not None:
                g = np.asarray(state.background_shell, np.float64)
                if config.refine_background:  # the gauge: compare shapes (the per-frame scales hold the level)
                    g = g * np.median(np.asarray(state.likelihood.scale, np.float64))
                recovered[(name, seed)] = g.tolist()
                error = float(np.max(np.abs(g[populated] / factors[populated] - 1)))
            history[-1]["factor_error"] = error
            history[-1]["intensity_error"] = intensity_error(problem, state.intensity)
            print(f"{name} / seed {seed}: cc_true {history[-1]['cc_true']:.4f}, orientation error "
                  f"{history[-1].get('orientation_error_median_deg', float('nan')):.2f}°, factor error "
                  f"{error:.3f}, intensity error {history[-1]['intensity_error']:.4f}, {history[-1]['wall_s']:.1f} s",
                  flush=True)
        cc = [f["cc_true"] for f in finals]
        rows.append([name, float(np.mean(cc)), float(np.min(cc)), float(np.max(cc)),
                     float(np.mean([f["intensity_error"] for f in finals])),
                     float(np.mean([f["log_likelihood"] for f in finals])),
                     float(np.median([f.get("orientation_error_median_deg", float("nan")) for f in finals])),
                     max(f["factor_error"] for f in finals), sum(f["wall_s"] for f in finals) / len(finals)])
    elapsed, cpu = time.perf_counter() - start, time.process_time()
    header = ["model", "cc_true (mean)", "cc_true (min)", "cc_true (max)", "intensity error (mean)",
              "log-likelihood (mean)",
              "median orientation error (°)", "max |g/g_true - 1| (worst seed)", "seconds per run"]
    table = rc.markdown_table(header, rows)
    table += (f"\n{sizes['frames']} frames at {sizes['d_min']} Å, n = {n} grid orientations and EMC grid, "
              f"{sizes['bragg']:g} Bragg + {sizes['background']:g} background photons per frame, true background = "
              f"g_s x recorded with g from {args.low:g} to {args.high:g} over the populated shells, "
              f"{sizes['iters']} iterations, seeds 0-{sizes['seeds'] - 1}. The log-likelihoods of the first three "
              f"rows are of the same data; the ceiling's is of the true background. Total {elapsed:.0f} s wall, "
              f"{cpu:.0f} s CPU (process).\n")
    fig, axes = rc.figure(2)
    for i, name in enumerate(models):
        for seed in range(sizes["seeds"]):
            h = histories[(name, seed)]
            axes[0].plot([x["iteration"] for x in h], [x["cc_true"] for x in h], color=f"C{i}",
                         label=name if seed == 0 else None, alpha=0.8)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("cc_true")
    axes[0].legend(fontsize=8)
    shells = np.flatnonzero(populated)
    axes[1].plot(shells, factors[shells], "k--", label="true g_s")
    for (name, seed), g in recovered.items():
        i = list(models).index(name)
        axes[1].plot(shells, np.asarray(g)[shells], "o-", color=f"C{i}", alpha=0.7,
                     label=f"refined: {name}" if seed == 0 else None)
    axes[1].set_xlabel("radial shell")
    axes[1].set_ylabel("true / recorded background")
    axes[1].legend(fontsize=8)
    record = {"sizes": sizes, "true_factors": factors.tolist(), "populated": populated.tolist(),
              "seconds": elapsed, "cpu_seconds": cpu, "header": header, "rows": rows,
              "recovered": {"/".join(map(str, k)): g for k, g in recovered.items()},
              "runs": {"/".join(map(str, k)): h for k, h in histories.items()}}
    rc.save(args.out, "background_shells", table, record, fig)


if __name__ == "__main__":
    main()
