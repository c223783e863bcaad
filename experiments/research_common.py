"""Shared pieces of the model experiments (docs/EXPERIMENTS.md, sections b-e): a small simulated problem, a run
to convergence through the public API, and the outputs (a Markdown table, a JSON record and a PNG figure).

The problem: P 43 21 2 lysozyme-like cell, a 64 x 64 detector of 3.6 mm pixels at 0.45 m (1 Å), cut at 8 Å,
orientations drawn from the n = 4 grid (3240 rotations, 810 after the exact symmetry
reduction), EMC on the same grid from a random symmetric start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import time


import emcjax
from emcjax.simulate import SimulationConfig, write

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "experiments"


def geometry(d_min: float) -> emcjax.DetectorGeometry:
    """64 x 64 pixels of 3.6 mm at 0.45 m (the default detector binned 4 x 4), cut at ``d_min`` Å."""
    return emcjax.DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5),
                                   resolution_max_A=d_min, n_shells=10)


def simulate(path: pathlib.Path, d_min: float, **fields) -> pathlib.Path:
    """Writes a simulated data set (``fields``: SimulationConfig fields) unless ``path`` exists."""
    if not path.exists():
        write(SimulationConfig(out=path, geometry=geometry(d_min), **fields))
    return path


def setup(path: pathlib.Path, config: emcjax.EMCConfig, n_frames: int | None = None):
    """The problem of the data set's first ``n_frames`` frames (all by default), its per-frame truth cut to match."""
    with emcjax.SparseDataset(path) as dataset:
        n = dataset.n_frames if n_frames is None else min(n_frames, dataset.n_frames)
        frames = dataset.read_block(0, n) if n < dataset.n_frames else None
        problem = emcjax.setup_problem(dataset, config, frames=frames)
    if frames is not None and problem.truth is not None:
        truth = {k: (v[:n] if k in ("quaternion", "phi", "rotation_index") else v) for k, v in problem.truth.items()}
        problem = dataclasses.replace(problem, truth=truth)
    return problem


def run(problem, config: emcjax.EMCConfig, seed: int, iters: int, tol: float = 0.0, log=None) -> list[dict]:
    """Up to ``iters`` EMC iterations from the random start ``seed``; stops early once the relative model change
    falls below ``tol`` (after the annealing ramp). Returns every iteration's metrics, plus ``wall_s`` (cumulative
    seconds) and ``orientation_error_median_deg``."""
    from emcjax import scoring

    state = emcjax.initial_state(problem, config, seed)
    history, start = [], time.perf_counter()
    for i in range(iters):
        state, metrics, per_frame = emcjax.iterate(problem, state, config)
        metrics = {"iteration": i + 1, **metrics, "wall_s": time.perf_counter() - start,
                   **scoring.orientation_metrics(problem, per_frame["best_rotation"])}
        history.append(metrics)
        if log:
            log(f"  iter {i + 1}: cc_true {metrics['cc_true']:.4f}  logL {metrics['log_likelihood']:.6e}  "
                f"beta {metrics['inverse_temperature']:.3g}  {metrics['seconds']:.2f} s")
        if tol and i + 1 > config.anneal_iterations and metrics["model_change"] < tol:
            break
    return history


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI, about a minute)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="directory of the PNG, table and JSON")
    p.add_argument("--work", type=pathlib.Path, default=None, help="directory of the simulated data sets (default: OUT/data)")
    return p


def work_dir(args) -> pathlib.Path:
    work = args.work if args.work is not None else args.out / "data"
    work.mkdir(parents=True, exist_ok=True)
    return work


def machine() -> dict:
    """Where a result was measured: host, CPUs, load average, JAX devices."""
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": platform.node(), "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
            "devices": [str(d) for d in jax.devices()]}


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save(out: pathlib.Path, name: str, table: str, record: dict, figure) -> None:
    """``OUT/NAME.md`` (the table), ``OUT/NAME.json`` (every number, the sizes and the machine), ``OUT/NAME.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps({**record, "machine": machine()}, default=float))
    figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    print(table)
    print(f"wrote {out / name}.md, .json, .png")


def figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4), squeeze=False)
    return fig, axes[0]


def as_dict(config) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if not isinstance(v, (pathlib.Path,))}
