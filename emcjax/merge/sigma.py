"""sigma(I) of merged intensities from the scatter between two independent half-set reconstructions.

EMC has no per-observation intensities to merge, so the errors come from the two independent halves. For
unique reflection h with half-set intensities A_h and B_h (common scale), the merged intensity is
M_h = (A_h + B_h) / 2 and, when the halves' errors are independent and unbiased,

    Var(M_h) = (Var A_h + Var B_h) / 4 = E[(A_h - B_h)^2] / 4.

A single squared difference is a one-degree-of-freedom estimate (a sigma from it alone would give
standardized deviations with heavy tails), so the variance is modelled per resolution shell s, like a
counting-statistics error model,

    sigma_h^2 = a_s + b_s * max(M_h, 0),     a_s, b_s >= 0,

(a_s: the background-like floor, b_s: the Poisson-like growth with the intensity) and (a_s, b_s) are fitted
to d_h = (A_h - B_h)^2 / 4, averaged in groups of similar intensity, by iteratively re-weighted least
squares (d_h has mean sigma_h^2 and variance 2 sigma_h^4 for Gaussian errors). sigma_h^2 is floored at the
mean d_h of the shell's weakest reflections (so a reflection the model sets to 0 keeps an error). Shells
with fewer than ``min_per_shell`` reflections borrow the fit over all reflections.

Reflections on symmetry elements (a stabilizer of order > 1 in the Laue group: hk0, h0l, hhl, h00, ... in
4/mmm) have fewer distinct symmetry mates, so fewer observations, and scatter more between the halves at
the same shell and intensity (2.1x in variance in the 4 Å benchmark). With ``classes`` (the stabilizer order,
:func:`reflection_classes`) each class c gets a variance factor r_c, sigma_h^2 = r_c (a_s + b_s max(M_h, 0)),
fitted to the same half-set differences (no truth).

Checked against the truth (tests/test_merge_stats.py, experiments/merging.py, experiments/common_error.py):
(M_h - k I_true,h) / sigma_h has a spread of ~1 where the halves' errors are independent; errors common to
both halves are not seen (docs/METHOD-NOTES.md: on the simulator's default n = 4 grid of true orientations
every frame samples a reflection's profile in the same few ways, and the error this leaves is common).
"""

from __future__ import annotations

import numpy as np

from emcjax.errors import ConfigError

MIN_PER_SHELL = 20
"""Fewer reflections than this in a shell: use the model fitted over all shells."""


def common_scale(reference, other) -> float:
    """Scale k that puts ``other`` on the scale of ``reference``: sum(reference) / sum(other) (robust to the
    noise in both, unlike a least-squares slope)."""
    total = float(np.sum(other))
    if not total > 0:
        raise ConfigError("common_scale: the intensities to scale sum to <= 0; nothing to put on a common scale")
    return float(np.sum(reference)) / total


def fit_variance_model(
    merged, squared_difference, *, group_size: int = 15, iterations: int = 10
) -> tuple[float, float]:
    """(a, b) >= 0 of Var = a + b max(merged, 0), fitted to ``squared_difference`` (unbiased one-degree-of-
    freedom estimates of Var).

    The reflections are sorted by intensity and averaged in groups of ~``group_size`` (a group mean of d has
    a relative error of ~sqrt(2 / group_size) instead of sqrt 2, and exact zeros, e.g. reflections both halves
    set to 0, cannot pull the fit to a zero variance), then (a, b) are fitted to the group means by least
    squares re-weighted with group size / Var^2.
    """
    x = np.maximum(np.asarray(merged, np.float64), 0.0)
    y = np.asarray(squared_difference, np.float64)
    if y.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(x)
    groups = np.array_split(order, max(1, y.size // group_size))
    gx = np.array([x[g].mean() for g in groups])
    gy = np.array([y[g].mean() for g in groups])
    gn = np.array([g.size for g in groups], np.float64)
    a, b = float(np.mean(y)), 0.0
    floor = 1e-6 * max(float(np.mean(y)), 1e-300)
    for _ in range(iterations):
        w = gn / np.maximum(a + b * gx, floor) ** 2
        design = np.stack([np.ones_like(gx), gx], axis=1) * np.sqrt(w)[:, None]
        (a_new, b_new), *_ = np.linalg.lstsq(design, gy * np.sqrt(w), rcond=None)
        if b_new < 0:  # constrained: constant variance
            a_new, b_new = float(np.sum(w * gy) / np.sum(w)), 0.0
        elif a_new < 0:  # constrained: proportional to the intensity
            a_new, b_new = 0.0, float(np.sum(w * gx * gy) / max(np.sum(w * gx * gx), 1e-300))
        a, b = float(a_new), float(b_new)
    return a, b


def stabilizer_order(laue_ops, hkl) -> np.ndarray:
    """(n,) int number of Laue-group operations ((n_ops, 3, 3) integer matrices acting on hkl) that map each
    reflection onto itself: 1 for a general reflection, > 1 for one on a symmetry element (hk0, h0l, hhl, h00,
    ... in 4/mmm)."""
    hkl = np.asarray(hkl, np.int64)
    images = np.einsum("gij,nj->ngi", np.asarray(laue_ops, np.int64), hkl)
    return np.all(images == hkl[:, None, :], axis=2).sum(axis=1)


def reflection_classes(order, min_count: int = MIN_PER_SHELL) -> np.ndarray:
    """(n,) int class 0, 1, ... of each reflection by its stabilizer order (ascending), a class with fewer
    than ``min_count`` reflections merged into the next lower order's (the lowest into the next higher)."""
    order = np.asarray(order, np.int64)
    values, index, counts = np.unique(order, return_inverse=True, return_counts=True)
    parent = np.arange(values.size)
    for i in range(values.size - 1, 0, -1):  # from the highest order down: a small class joins the next lower
        if counts[i] < min_count:
            parent[parent == i] = i - 1
            counts[i - 1] += counts[i]
    if values.size > 1 and counts[0] < min_count and np.any(parent != 0):  # a small lowest class joins upwards
        parent[parent == 0] = parent[parent != 0].min()
    return np.unique(parent, return_inverse=True)[1][index].reshape(order.shape)


def _shell_model(merged, d2, shell, n_shells: int, min_per_shell: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shell (a_s, b_s) fitted to ``d2`` and the variance a_s + b_s max(merged, 0) of every reflection,
    floored at the mean d2 of its shell's weakest reflections."""
    overall = fit_variance_model(merged, d2)
    params = np.empty((n_shells, 2))
    floor = np.zeros(n_shells)
    for s in range(n_shells):
        mask = shell == s
        params[s] = fit_variance_model(merged[mask], d2[mask]) if mask.sum() >= min_per_shell else overall
        if mask.any():  # a reflection the model puts at 0 keeps the error of the weakest group of its shell
            weakest = np.argsort(merged[mask])[: max(min_per_shell // 2, 1)]
            floor[s] = np.mean(d2[mask][weakest])
    inside = shell >= 0
    a = np.where(inside, params[np.maximum(shell, 0), 0] if n_shells else overall[0], overall[0])
    b = np.where(inside, params[np.maximum(shell, 0), 1] if n_shells else overall[1], overall[1])
    variance = a + b * np.maximum(merged, 0.0)
    if n_shells:
        variance = np.maximum(variance, np.where(inside, floor[np.maximum(shell, 0)], 0.0))
    return params, variance


def half_set_sigma(
    i_a, i_b, shell, *, classes=None, min_per_shell: int = MIN_PER_SHELL, iterations: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """sigma of the merged intensity (i_a + i_b) / 2 of every reflection, from the half-set error model.

    Args:
      i_a, i_b: (n,) half-set intensities on a common scale.
      shell: (n,) int shell index of each reflection (-1: no shell, uses the overall model).
      classes: (n,) int reflection class (e.g. :func:`reflection_classes` of the stabilizer order), or None
        for one class. Each class c gets a variance factor r_c (r = 1 for the class of most reflections):
        Var = r_c (a_s + b_s max(I, 0)), fitted by alternating the shell model on d / r_c and
        r_c = mean(d) / mean(model) over the class (d = (i_a - i_b)^2 / 4).
      min_per_shell: shells with fewer reflections use the model fitted to all.

    Returns:
      ``(sigma, params)``: (n,) float64 sigma(I); (n_shells, 2) the fitted (a_s, b_s) per shell (of the class
      of most reflections).
    """
    i_a = np.asarray(i_a, np.float64)
    i_b = np.asarray(i_b, np.float64)
    shell = np.asarray(shell)
    merged = 0.5 * (i_a + i_b)
    d2 = 0.25 * (i_a - i_b) ** 2
    n_shells = int(shell.max()) + 1 if shell.size else 0
    cls = np.zeros(merged.shape, np.int64) if classes is None else np.asarray(classes, np.int64)
    n_classes = int(cls.max()) + 1 if cls.size else 1
    ratio = np.ones(n_classes)
    largest = int(np.argmax(np.bincount(cls, minlength=n_classes)))
    for _ in range(iterations if n_classes > 1 else 0):
        _, variance = _shell_model(merged, d2 / ratio[cls], shell, n_shells, min_per_shell)
        for c in range(n_classes):
            mask = cls == c
            if mask.any():
                ratio[c] *= np.sum(d2[mask] / ratio[c]) / max(np.sum(variance[mask]), 1e-300)
        ratio /= ratio[largest]
    params, variance = _shell_model(merged, d2 / ratio[cls], shell, n_shells, min_per_shell)
    return np.sqrt(np.maximum(variance * ratio[cls], 1e-30)), params
