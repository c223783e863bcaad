"""Experiment (b): Poisson vs negative-binomial likelihood, on over-dispersed data and on Poisson data.

    python experiments/likelihood_choice.py [--quick] [--out DIR] [--dispersion 2] [--seeds N]

Two simulated data sets from the same crystal and orientations: counts drawn negative-binomially (variance
mu + mu^2 / r, r = --dispersion, every pixel drawn through the likelihood's sampler) and Poisson counts. Each is
reconstructed from the same random start with the Poisson likelihood (closed-form reference M-step, and the
gradient M-step so that the M-step is not what differs) and with the negative binomial at the true r
(gradient M-step). Records cc_true and the median orientation error per iteration. Writes
likelihood_choice.png, likelihood_choice.md and likelihood_choice.json.
"""

from __future__ import annotations

import time

import emcjax
import research_common as rc


def main(argv=None) -> None:
    p = rc.parser(__doc__)
    p.add_argument("--dispersion", type=float, default=2.0, help="r of the over-dispersed data (photons)")
    p.add_argument("--seeds", type=int, default=None, help="random starts per model (default 1 quick, 3 full)")
    args = p.parse_args(argv)
    sizes = (dict(d_min=8.0, frames=60, iters=2, seeds=1) if args.quick
             else dict(d_min=8.0, frames=300, iters=10, seeds=3))
    if args.seeds is not None:
        sizes["seeds"] = args.seeds
    work = rc.work_dir(args)
    r = args.dispersion
    common = dict(n_frames=sizes["frames"], rotation_n=4, bragg_photons=60.0, background_photons=30.0, seed=21)
    data = {
        f"negative binomial (r = {r:g})": rc.simulate(work / f"lik_nb{r:g}_{sizes['d_min']}A_{sizes['frames']}f.h5",
                                                     sizes["d_min"], likelihood="negbin", dispersion=r, **common),
        "Poisson": work / f"lik_poisson_{sizes['d_min']}A_{sizes['frames']}f.h5",
    }
    if args.quick:  # the same code for both data sets: CI runs one
        data.pop("Poisson")
    models = {
        "Poisson, reference M-step": emcjax.EMCConfig(rotation_n=4),
        "Poisson, gradient M-step": emcjax.EMCConfig(rotation_n=4, intensity_update="gradient"),
        f"negative binomial r = {r:g}, gradient M-step": emcjax.EMCConfig(rotation_n=4, likelihood="negbin",
                                                                         dispersion=r),
    }
    if "Poisson" in data:
        rc.simulate(data["Poisson"], sizes["d_min"], **common)
    start = time.perf_counter()
    histories, rows = {}, []
    for data_name, path in data.items():
        for model_name, config in models.items():
            problem = rc.setup(path, config)
            finals = []
            for seed in range(sizes["seeds"]):
                h = rc.run(problem, config, seed=seed, iters=sizes["iters"])
                histories[(data_name, model_name, seed)] = h
                finals.append(h[-1])
                print(f"{data_name} / {model_name} / seed {seed}: cc_true {h[-1]['cc_true']:.4f}, orientation error "
                      f"{h[-1].get('orientation_error_median_deg', float('nan')):.2f}°, {h[-1]['wall_s']:.1f} s",
                      flush=True)
            rows.append([data_name, model_name, min(f["cc_true"] for f in finals), max(f["cc_true"] for f in finals),
                         max(f.get("orientation_error_median_deg", float("nan")) for f in finals),
                         max(f.get("orientation_error_p90_deg", float("nan")) for f in finals),
                         sum(f["wall_s"] for f in finals) / len(finals)])
    elapsed = time.perf_counter() - start
    header = ["data", "model", "cc_true (worst seed)", "cc_true (best seed)", "median orientation error (°, worst)",
              "p90 orientation error (°, worst)", "seconds per run"]
    table = rc.markdown_table(header, rows)
    table += (f"\n{sizes['frames']} frames at {sizes['d_min']} Å, n = 4 grid, 60 Bragg + 30 background photons per "
              f"frame, {sizes['iters']} iterations, seeds 0-{sizes['seeds'] - 1}. Total {elapsed:.0f} s.\n")
    fig, axes = rc.figure(len(data))
    for ax, data_name in zip(axes, data):
        for i, model_name in enumerate(models):
            for seed in range(sizes["seeds"]):
                h = histories[(data_name, model_name, seed)]
                ax.plot([x["iteration"] for x in h], [x["cc_true"] for x in h], color=f"C{i}",
                        label=model_name if seed == 0 else None, alpha=0.8)
        ax.set_title(f"{data_name} data")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cc_true")
        ax.legend(fontsize=8)
    record = {"sizes": sizes, "dispersion": r, "seconds": elapsed, "header": header, "rows": rows,
              "runs": {"/".join(map(str, k)): h for k, h in histories.items()}}
    rc.save(args.out, "likelihood_choice", table, record, fig)


if __name__ == "__main__":
    main()
