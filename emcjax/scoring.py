"""Scores of a reconstruction against a simulation's truth: orientation errors and correlation per resolution shell.

Numpy only; used by the runners' metrics and by the experiments.
"""

from __future__ import annotations

import numpy as np

from emcjax.rotations import symmetric_misorientation


def orientation_errors(estimated_quaternions, true_quaternions, rotation_ops_cartesian) -> np.ndarray:
    """Per-frame angle (rad) between the estimated orientation and the nearest symmetry-equivalent true one.

    Args:
        estimated_quaternions: ``(n_frames, 4)`` unit quaternions (e.g. each frame's most likely rotation).
        true_quaternions: ``(n_frames, 4)`` true orientations (``truth["quaternion"]`` of emcjax.simulate).
        rotation_ops_cartesian: ``(n_ops, 3, 3)`` proper rotations of the model's point group
            (``Crystal.rotation_ops_cartesian``).

    Returns:
        ``(n_frames,)`` float64 angles in radians.
    """
    return symmetric_misorientation(estimated_quaternions, true_quaternions, rotation_ops_cartesian)


def orientation_summary(errors_rad: np.ndarray) -> dict[str, float]:
    """``orientation_error_median_deg`` and ``orientation_error_p90_deg`` of per-frame errors (rad)."""
    deg = np.degrees(np.asarray(errors_rad, np.float64))
    return {
        "orientation_error_median_deg": float(np.median(deg)),
        "orientation_error_p90_deg": float(np.percentile(deg, 90)),
    }


def orientation_metrics(problem, best_rotation, best_quaternion=None) -> dict[str, float]:
    """:func:`orientation_summary` of each frame's most likely rotation (indices into ``problem.sampling``,
    or its quaternions ``best_quaternion`` (n_frames, 4) when given, e.g. refined off the grid) against the
    truth's orientations, over the frames the run uses (``problem.frame_weights`` > 0: not those rejected
    or of the other half set, which a run need not orient); empty when the data set has no true orientations."""
    truth = getattr(problem, "truth", None) or {}
    if truth.get("quaternion") is None:
        return {}
    estimated = best_quaternion if best_quaternion is not None else problem.sampling.quaternions[
        np.asarray(best_rotation, np.int64)]
    rotation_ops = problem.grid.crystal.rotation_ops_cartesian
    errors = orientation_errors(estimated, truth["quaternion"], rotation_ops)
    return orientation_summary(errors[used_frames(getattr(problem, "frame_weights", None), errors.shape[0])])


def used_frames(frame_weights, n_frames: int) -> np.ndarray:
    """(n_frames,) bool: the frames of weight > 0 (all when ``frame_weights`` is None)."""
    if frame_weights is None:
        return np.ones(n_frames, bool)
    return np.asarray(frame_weights)[:n_frames] > 0


def values_by_hkl(hkl, ref_hkl, ref_values) -> np.ndarray:
    """``ref_values`` reordered to the rows ``hkl`` (same asymmetric-unit convention); NaN where ``ref_hkl``
    lacks a reflection (e.g. a truth simulated to a lower resolution than the model).

    Args:
        hkl: ``(n, 3)`` Miller indices of the target rows.
        ref_hkl: ``(m, 3)`` Miller indices of ``ref_values``.
        ref_values: ``(m, ...)`` values per reflection.

    Returns:
        ``(n, ...)`` float64.
    """
    row = {tuple(h): i for i, h in enumerate(np.asarray(ref_hkl).tolist())}
    index = np.array([row.get(tuple(h), -1) for h in np.asarray(hkl).tolist()], np.int64)
    ref_values = np.asarray(ref_values, np.float64)
    out = ref_values[np.maximum(index, 0)] if ref_values.shape[0] else np.zeros((index.shape[0],) + ref_values.shape[1:])
    out[index < 0] = np.nan
    return out


def cc_by_shell(
    hkl, values, true_hkl, true_values, reciprocal_basis, edges_A
) -> list[dict]:
    """Pearson correlation of per-reflection values with the truth in resolution shells.

    Args:
        hkl: ``(n, 3)`` Miller indices of ``values``.
        values: ``(n,)`` e.g. integrated intensities of a reconstruction.
        true_hkl: ``(m, 3)`` Miller indices of ``true_values`` (same asymmetric-unit convention).
        true_values: ``(m,)`` true values.
        reciprocal_basis: ``(3, 3)`` B (columns a*, b*, c*, 1/Å).
        edges_A: shell edges as resolutions d in Å, descending (e.g. ``(8, 6, 5, 4, 3.5, 3)``).

    Returns:
        One dict per shell: ``d_max``, ``d_min`` (Å), ``n`` (reflections in both sets) and ``cc``
        (NaN with fewer than 3).
    """
    key = {tuple(h): i for i, h in enumerate(np.asarray(hkl).tolist())}
    pairs = [(key[tuple(h)], j) for j, h in enumerate(np.asarray(true_hkl).tolist()) if tuple(h) in key]
    ia, ib = (np.asarray(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    q = np.asarray(hkl, np.float64)[ia] @ np.asarray(reciprocal_basis, np.float64).T
    d = 1.0 / np.maximum(np.linalg.norm(q, axis=1), 1e-12)
    a, b = np.asarray(values, np.float64)[ia], np.asarray(true_values, np.float64)[ib]
    shells = []
    for hi, lo in zip(edges_A[:-1], edges_A[1:]):
        sel = (d <= hi) & (d > lo)
        cc = float(np.corrcoef(a[sel], b[sel])[0, 1]) if sel.sum() >= 3 else float("nan")
        shells.append({"d_max": float(hi), "d_min": float(lo), "n": int(sel.sum()), "cc": cc})
    return shells
