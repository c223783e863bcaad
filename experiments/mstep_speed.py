"""Experiment (c): closed-form vs gradient M-step: objective and cc_true against wall time.

    python experiments/mstep_speed.py [--quick] [--out DIR]

One Poisson data set, one random start, the same number of iterations with each intensity update: the
reference's per-pixel ML + compress ("reference"), multiplicative EM ("mlem") and Adam steps on the expected
log-likelihood ("gradient", --steps steps of size --lr; phi then also by gradient). Records the log-likelihood
(nats, the marginal one of the E-step) and cc_true after every iteration against the cumulative wall time.
Each rule first runs the same iterations once untimed, so that every step it needs is compiled (the kept-pair
budget changes in the first iterations, and each new budget compiles a new step); the timed run then hits the
compilation cache. Writes mstep_speed.png, mstep_speed.md and mstep_speed.json.
"""

from __future__ import annotations

import time

import emcjax
import research_common as rc


def main(argv=None) -> None:
    p = rc.parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="Adam steps per gradient M-step")
    p.add_argument("--lr", type=float, default=0.05, help="Adam step size")
    args = p.parse_args(argv)
    sizes = (dict(d_min=8.0, frames=80, iters=2) if args.quick else dict(d_min=8.0, frames=600, iters=15))
    work = rc.work_dir(args)
    path = rc.simulate(work / f"mstep_{sizes['d_min']}A_{sizes['frames']}f.h5", sizes["d_min"],
                       n_frames=sizes["frames"], rotation_n=4, bragg_photons=50.0, background_photons=50.0, seed=5)
    start = time.perf_counter()
    rules = {"reference": {}, "mlem": {},
             "gradient": dict(gradient_steps=args.steps, gradient_learning_rate=args.lr)}
    histories = {}
    for rule, extra in rules.items():
        config = emcjax.EMCConfig(rotation_n=4, intensity_update=rule, **extra)
        problem = rc.setup(path, config)
        compile_start = time.perf_counter()
        rc.run(problem, config, seed=0, iters=sizes["iters"])  # compiles every step the run needs
        compiled = time.perf_counter() - compile_start
        histories[rule] = rc.run(problem, config, seed=0, iters=sizes["iters"])
        histories[rule][0]["warm_up_s"] = compiled
        last = histories[rule][-1]
        print(f"{rule}: cc_true {last['cc_true']:.4f}, logL {last['log_likelihood']:.6e}, {last['wall_s']:.1f} s",
              flush=True)
    elapsed = time.perf_counter() - start
    header = ["intensity update", "final log-likelihood (nats)", "final cc_true", "best cc_true (iteration)",
              "warm-up run (s, with compilation)", "iteration (s, median)", "timed run (s)"]
    rows = []
    for rule, h in histories.items():
        times = sorted(x["seconds"] for x in h)
        best = max(h, key=lambda x: x["cc_true"])
        rows.append([rule, h[-1]["log_likelihood"], h[-1]["cc_true"], f"{best['cc_true']:.4f} ({best['iteration']})",
                     h[0]["warm_up_s"], times[len(times) // 2], h[-1]["wall_s"]])
    table = rc.markdown_table(header, rows)
    table += (f"\n{sizes['frames']} frames at {sizes['d_min']} Å, n = 4 grid, 50 Bragg + 50 background photons per "
              f"frame, {sizes['iters']} iterations from seed 0; gradient: {args.steps} Adam steps of {args.lr} per "
              f"M-step. Total {elapsed:.0f} s.\n")
    fig, axes = rc.figure(2)
    for rule, h in histories.items():
        t = [x["wall_s"] for x in h]
        axes[0].plot(t, [x["log_likelihood"] for x in h], "o-", ms=3, label=rule)
        axes[1].plot(t, [x["cc_true"] for x in h], "o-", ms=3, label=rule)
    for ax, label in zip(axes, ["log-likelihood (nats)", "cc_true"]):
        ax.set_xlabel("wall time (s, compiled steps)")
        ax.set_ylabel(label)
        ax.legend()
    record = {"sizes": sizes, "steps": args.steps, "lr": args.lr, "seconds": elapsed, "header": header, "rows": rows,
              "runs": histories}
    rc.save(args.out, "mstep_speed", table, record, fig)


if __name__ == "__main__":
    main()
