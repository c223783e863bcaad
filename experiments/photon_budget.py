"""Experiment (e): how few photons per frame EMC needs: cc_true after convergence against Bragg photons per frame
and number of frames.

    python experiments/photon_budget.py [--quick] [--out DIR]

A photon scan (Bragg photons per frame 5 .. 150 at a fixed number of frames) and a frame scan (1k .. 20k frames
at a fixed, low photon level; the first N frames of one simulated set). Every run starts from the same random
start and iterates until the relative model change falls below --tol (at most --iters iterations). Writes
photon_budget.png (cc_true against photons, and against frames), photon_budget.md and photon_budget.json.
"""

from __future__ import annotations

import time

import emcjax
import research_common as rc


def main(argv=None) -> None:
    p = rc.parser(__doc__)
    p.add_argument("--iters", type=int, default=20, help="most iterations of a run")
    p.add_argument("--tol", type=float, default=2e-3, help="stop when the relative model change is below this")
    args = p.parse_args(argv)
    if args.quick:
        sizes = dict(d_min=8.0, photons=[150.0], photon_scan_frames=80, frame_scan_photons=150.0,
                     frames=[80, 160], iters=2)
    else:
        sizes = dict(d_min=8.0, photons=[5.0, 10.0, 20.0, 50.0, 150.0], photon_scan_frames=1000,
                     frame_scan_photons=10.0, frames=[1000, 4000, 20000], iters=args.iters)
    work = rc.work_dir(args)
    config = emcjax.EMCConfig(rotation_n=4)
    common = dict(rotation_n=4, background_photons=30.0, seed=31)
    start = time.perf_counter()
    rows, histories = [], {}

    def one(path, n_frames, photons):
        problem = rc.setup(path, config, n_frames)
        h = rc.run(problem, config, seed=0, iters=sizes["iters"], tol=args.tol)
        histories[(photons, n_frames)] = h
        last = h[-1]
        rows.append([f"{photons:g}", n_frames, last["cc_true"], max(x["cc_true"] for x in h),
                     last.get("orientation_error_median_deg", float("nan")), last["iteration"], last["wall_s"]])
        print(f"{photons:g} photons, {n_frames} frames: cc_true {last['cc_true']:.4f} after {last['iteration']} "
              f"iterations, {last['wall_s']:.1f} s", flush=True)

    for photons in sizes["photons"]:
        n = sizes["photon_scan_frames"]
        path = rc.simulate(work / f"budget_{sizes['d_min']}A_{n}f_{photons:g}ph.h5", sizes["d_min"], n_frames=n,
                           bragg_photons=photons, **common)
        one(path, n, photons)
    photons = sizes["frame_scan_photons"]
    most = max(sizes["frames"])
    path = rc.simulate(work / f"budget_{sizes['d_min']}A_{most}f_{photons:g}ph.h5", sizes["d_min"], n_frames=most,
                       bragg_photons=photons, **common)
    for n in sizes["frames"]:
        if (photons, n) not in histories:
            one(path, n, photons)
    elapsed = time.perf_counter() - start
    header = ["Bragg photons/frame", "frames", "cc_true (converged)", "best cc_true", "median orientation error (°)",
              "iterations", "seconds"]
    table = rc.markdown_table(header, rows)
    table += (f"\n{sizes['d_min']} Å, n = 4 grid, 30 background photons per frame, seed 0, stop at model change < "
              f"{args.tol} or {sizes['iters']} iterations. Total {elapsed:.0f} s.\n")
    fig, axes = rc.figure(2)
    scan = [(ph, histories[(ph, sizes["photon_scan_frames"])][-1]["cc_true"]) for ph in sizes["photons"]]
    axes[0].semilogx(*zip(*scan), "o-")
    axes[0].set_xlabel("Bragg photons per frame")
    axes[0].set_title(f"{sizes['photon_scan_frames']} frames")
    scan = [(n, histories[(photons, n)][-1]["cc_true"]) for n in sizes["frames"]]
    axes[1].semilogx(*zip(*scan), "o-")
    axes[1].set_xlabel("frames")
    axes[1].set_title(f"{photons:g} Bragg photons per frame")
    for ax in axes:
        ax.set_ylabel("cc_true after convergence")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    record = {"sizes": sizes, "tol": args.tol, "seconds": elapsed, "header": header, "rows": rows,
              "runs": {f"{ph:g}/{n}": h for (ph, n), h in histories.items()}}
    rc.save(args.out, "photon_budget", table, record, fig)


if __name__ == "__main__":
    main()
