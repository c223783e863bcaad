"""Experiment (a) of docs/EXPERIMENTS.md: grid-only vs refined orientations on data with continuous orientations.

For each grid (600-cell parameter n, angular resolution 0.944/n rad) a data set is simulated with continuous
(uniform) true orientations, ~150 Bragg + ~30 background photons per frame, and per-frame candidate lists of
the 8 grid rotations nearest the truth (what spot-based preselection gives). Two low-resolution runs then
reconstruct it from the same random start: grid-only (the candidates as they are) and with continuous
orientation refinement (``--emc.refine-orientations``, each frame's most probable rotation refined, from
iteration ``refine_start + 1`` on). Writes per iteration cc_true and the median
orientation error (against the nearest symmetry-equivalent true orientation) as a table (``table.md``) and a
figure (``orientation_refinement.png``) in ``--out``.

    python experiments/orientation_refinement.py [--quick] [--out DIR]

Public API only (emcjax.simulate, emcjax.lowres, emcjax.runio, emcjax.atomic_files).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time

from emcjax import atomic_files, lowres, runio, simulate
from emcjax.config import EMCConfig
from emcjax.detector import DetectorGeometry
from emcjax.sampling_600cell import COVERING_RADIUS_COEFF

FULL = dict(frames=500, iters=6, grids=(15, 20), refine_start=2)
QUICK = dict(frames=64, iters=3, grids=(16,), refine_start=1, small_detector=True)
SMALL_DETECTOR = DetectorGeometry(num_rows=96, num_cols=96, pixel_size_m=1.8e-3, beam_center_px=(47.5, 47.5),
                                  resolution_max_A=6.0, n_shells=20)
"""The --quick size's detector (6 Å): few pixels, so that CI runs it in about a minute."""


def grid_degrees(n: int) -> float:
    """Angular resolution 0.944/n of the 600-cell grid n (degrees)."""
    return math.degrees(COVERING_RADIUS_COEFF / n)


def run_pair(data: pathlib.Path, out: pathlib.Path, iters: int, refine_start: int, seed: int) -> dict:
    """Grid-only and refined runs of one data set: {mode: list of per-iteration metrics}."""
    runs = {}
    for mode in ("grid", "refined"):
        emc = EMCConfig(refine_orientations=mode == "refined", refine_start=refine_start, refine_top_k=1)
        config = lowres.LowresConfig(data=data, out=out / mode, iters=iters, seed=seed, emc=emc, iterations_every=0)
        start = time.perf_counter()
        lowres.run(config, log=lambda line: print(f"  [{data.stem} {mode}] {line}", flush=True))
        print(f"  [{data.stem} {mode}] {time.perf_counter() - start:.0f} s", flush=True)
        runs[mode] = runio.read_metrics(out / mode)
    return runs


def table(results: dict) -> str:
    """Markdown table: per grid and mode, cc_true and median orientation error at each iteration."""
    lines = ["| grid n (°) | mode | iteration | cc_true | median orientation error (°) |", "|---|---|---|---|---|"]
    for n, runs in results.items():
        for mode, records in runs.items():
            for r in records:
                lines.append(f"| {n} ({grid_degrees(n):.2f}) | {mode} | {r['iteration']} | {r['cc_true']:.4f} | "
                             f"{r['orientation_error_median_deg']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cc, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (n, runs) in zip(colours, results.items()):
        for mode, records in runs.items():
            style = "-" if mode == "refined" else "--"
            it = [r["iteration"] for r in records]
            label = f"n = {n} ({grid_degrees(n):.1f}°), {mode}"
            ax_cc.plot(it, [r["cc_true"] for r in records], style, color=colour, marker="o", ms=3, label=label)
            ax_err.plot(it, [r["orientation_error_median_deg"] for r in records], style, color=colour, marker="o",
                        ms=3, label=label)
        ax_err.axhline(grid_degrees(n) / 2, color=colour, lw=0.8, ls=":")
    ax_cc.set(xlabel="iteration", ylabel="cc_true (integrated intensities)", title="correlation with truth")
    ax_err.set(xlabel="iteration", ylabel="median orientation error (°)", yscale="log",
               title="orientation error (dotted: half the grid's resolution)")
    ax_cc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CI size: {QUICK}")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/orientation_refinement"))
    parser.add_argument("--frames", type=int, help=f"frames per data set (default {FULL['frames']})")
    parser.add_argument("--iters", type=int, help=f"iterations per run (default {FULL['iters']})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in (("frames", args.frames), ("iters", args.iters)) if v is not None})
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    start = time.perf_counter()
    for n in size["grids"]:
        data = out / f"grid{n}.h5"
        if not data.exists():
            sim = simulate.SimulationConfig(out=data, n_frames=size["frames"], orientations="uniform", candidates=8,
                                            candidate_n=n, seed=args.seed)
            if size.get("small_detector"):
                sim = dataclasses.replace(sim, geometry=SMALL_DETECTOR, bragg_photons=300.0)
            simulate.write(sim)
        results[n] = run_pair(data, out / f"grid{n}", size["iters"], size["refine_start"], args.seed)
    text = table(results)
    atomic_files.write_text_atomic(out / "table.md", text)
    figure(results, out / "orientation_refinement.png")
    print(text)
    for n, runs in results.items():
        g, r = runs["grid"][-1], runs["refined"][-1]
        print(f"n = {n} ({grid_degrees(n):.2f}°): cc_true grid-only {g['cc_true']:.4f} -> refined {r['cc_true']:.4f}; "
              f"median orientation error {g['orientation_error_median_deg']:.3f}° -> "
              f"{r['orientation_error_median_deg']:.3f}° (half the grid: {grid_degrees(n) / 2:.2f}°)")
    print(f"wrote {out / 'table.md'} and {out / 'orientation_refinement.png'} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
