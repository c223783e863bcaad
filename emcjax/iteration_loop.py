"""The iterations of an EMC run, shared by emcjax.lowres and emcjax.highres (:func:`run_iterations`): one
iteration after another with metrics, iterations/NNN.h5, a checkpoint each, progress lines
(:func:`progress_line`), figures, orientation refinement and its resume, and the convergence stop.
"""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np

from emcjax import checkpoint, runio, scoring
from emcjax import emc as emc_lib


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(record: dict, total: int, eta_s: float, at_most: bool = False) -> str:
    """One progress line: iteration/total, log-likelihood, model change, phi mean±std, certainty, seconds,
    ETA (``at_most``: a bound, the run may stop earlier on convergence) and cc_true when present."""
    width = len(str(total))
    parts = [
        f"iter {record['iteration']:>{width}d}/{total}",
        f"logL {record.get('log_likelihood', float('nan')):.6e}",
        f"dmodel {record.get('model_change', float('nan')):.3e}",
        f"phi {record.get('phi_mean', float('nan')):.3f}±{record.get('phi_std', float('nan')):.3f}",
        f"certainty {record.get('certainty', float('nan')):.3f}",
        f"{record.get('seconds', float('nan')):.2f}s",
        f"ETA {'<= ' if at_most else ''}{_fmt_seconds(eta_s)}",
    ]
    if record.get("cc_true") is not None:
        parts.append(f"cc_true {record['cc_true']:.4f}")
    if record.get("orientation_error_median_deg") is not None:
        parts.append(f"orient {record['orientation_error_median_deg']:.2f}°")
    return "  ".join(parts)


def run_iterations(config, emc_config, problem, state, manager, meta, records, main_process, log,
                   stop_model_change: float = 0.0):
    """The iterations from ``state.iteration`` to ``config.iters`` (a stage config with ``out``, ``iters``,
    ``iterations_every``, ``figures_every``): metrics, iterations/NNN.h5, a checkpoint each, progress lines
    and figures; returns the final state and all metrics records. Shared by lowres and highres.

    ``stop_model_change`` > 0 stops the run early, after the first iteration whose relative model change
    (``model_change``) is below it (a convergence stop; --iters is then a maximum), with orientation
    refinement not before the first refined iteration."""
    out = config.out
    times: list[float] = []
    iterate = functools.partial(emc_lib.iterate, problem, config=emc_config)
    refiner = None
    if emc_config.refine_orientations:
        from emcjax.refinement import Refiner

        refiner = Refiner(problem, emc_config)
        iterate = refiner.iterate
        log(f"orientation refinement: from iteration {emc_config.refine_start + 1}, the {emc_config.refine_top_k} "
            f"most probable rotations of each frame, {emc_config.refine_steps} steps, up to "
            f"{emc_config.refine_max_angle_deg}°")
        if int(state.iteration) > 0:
            _restore_refinement(refiner, out, int(state.iteration), log)
    refined_from = emc_config.refine_start + 1 if emc_config.refine_orientations else 0
    for _ in range(int(state.iteration), config.iters):
        state, metrics, per_frame = iterate(state)
        iteration = int(state.iteration)
        converged = (bool(stop_model_change) and float(metrics.get("model_change", np.inf)) < stop_model_change
                     and iteration > refined_from)  # a grid-only plateau is not convergence of a refined run
        record = {"iteration": iteration, **metrics,
                  **scoring.orientation_metrics(problem, per_frame["best_rotation"], per_frame.get("best_quaternion"))}
        records.append(record)
        if main_process:
            runio.append_metrics(out, record)
        if main_process and (
            iteration == config.iters or converged or (config.iterations_every and iteration % config.iterations_every == 0)
        ):
            runio.write_iteration(out, iteration, state.intensity, state.phi,
                                  per_frame["best_rotation"], per_frame["best_probability"], metrics,
                                  extra={k: v for k, v in per_frame.items() if k.startswith("kept_") or k == "best_quaternion"})
        if refiner is not None and main_process:
            runio.write_side_arrays(out, runio.REFINEMENT_DIR, iteration, refiner.snapshot(),
                                    keep=config.keep_checkpoints)
        checkpoint.save(manager, state, {**meta, "iteration": iteration})
        times.append(float(metrics.get("seconds", 0.0)))
        recent = times[-5:]
        eta = (config.iters - iteration) * (sum(recent) / len(recent))
        if main_process:
            log(progress_line(record, config.iters, eta, at_most=bool(stop_model_change)))
        if main_process and config.figures_every and iteration % config.figures_every == 0 and iteration < config.iters:
            draw_run_figures(out, records, problem, state)
        if converged:
            log(f"converged: relative model change {metrics['model_change']:.2e} < {stop_model_change:g} at "
                f"iteration {iteration} (of at most {config.iters}); stopping")
            break
    return state, records


def _restore_refinement(refiner, out: pathlib.Path, iteration: int, log) -> None:
    """Resumes the refiner where checkpoint ``iteration`` left it (its kept rotations and refined candidates);
    without the file (a run from before it was written) refinement restarts from a grid E-step."""
    arrays = runio.read_side_arrays(out, runio.REFINEMENT_DIR, iteration)
    if arrays is None:
        log(f"warning: {out / runio.REFINEMENT_DIR} has no state for iteration {iteration}; orientation refinement "
            "restarts from a grid E-step")
    elif arrays:
        refiner.restore(arrays)


def draw_run_figures(out: pathlib.Path, records: list[dict], problem, state) -> None:
    """Draws the run's PNG figures into ``out`` (emcjax.figures.draw_all): the per-iteration metrics of
    ``records`` and the integrated model of ``state`` (against the truth's, for simulated data)."""
    from emcjax import figures as figures_lib  # matplotlib: imported when the first figure is drawn

    truth = getattr(problem, "truth", None)
    true_integrated = None
    if truth is not None and truth.get("intensity") is not None and truth.get("hkl") is not None:
        # the truth's reflections need not be the model's (e.g. a run to a lower resolution than the data)
        true_integrated = scoring.values_by_hkl(
            problem.grid.asu.hkl, truth["hkl"], np.asarray(problem.integrated(truth["intensity"]))
        )
    crystal = getattr(problem.grid, "crystal", None)
    figures_lib.draw_all(
        out,
        records,
        problem.grid.asu.hkl,
        np.asarray(problem.integrated(state.intensity)),
        true_integrated,
        laue_ops=getattr(crystal, "laue_ops", None),
    )
