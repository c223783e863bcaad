"""Figures of a run (matplotlib, Agg backend): convergence curves, central sections, recovered vs true.

All functions take plain arrays / metric records, write one PNG atomically and return its path; they
never change global matplotlib state beyond selecting the Agg backend for this module's figures.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)  # no display needed; a no-op when a backend is already active
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from emcjax.atomic_files import atomic_path  # noqa: E402

FIGURES_DIR = "figures"


def save_figure(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    """Writes ``fig`` as a PNG (110 dpi) to ``path`` atomically, closes it and returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    it = [r["iteration"] for r in records if r.get(key) is not None]
    val = [r[key] for r in records if r.get(key) is not None]
    return np.asarray(it, np.float64), np.asarray(val, np.float64)


def plot_convergence(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
    """Log-likelihood, relative model change and (when present) ``cc_true`` against iteration.

    Args:
      records: metric records (``metrics.jsonl`` lines) with ``iteration`` and any of
        ``log_likelihood``, ``model_change``, ``cc_true``.
      path: the PNG to write.
    """
    panels = [("log_likelihood", "log-likelihood", False), ("model_change", "relative model change", True)]
    if any(r.get("cc_true") is not None for r in records):
        panels.append(("cc_true", "CC with true intensities", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        x, y = _series(records, key)
        if log:
            keep = y > 0
            x, y = x[keep], y[keep]
        ax.plot(x, y, "o-", ms=3)
        if log and y.size:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key == "cc_true" and y.size:
            ax.set_ylim(min(0.0, float(y.min())), 1.0)
    fig.tight_layout()
    return save_figure(fig, pathlib.Path(path))


def plot_sections(
    hkl: np.ndarray, integrated: np.ndarray, path: str | os.PathLike, laue_ops: np.ndarray | None = None
) -> pathlib.Path:
    """Central sections hk0, h0l and 0kl of the integrated intensities.

    Every unique reflection is drawn with its symmetry mates ``M @ hkl`` for the Laue operators ``M`` when
    given (they include the inversion), otherwise with its Friedel mate (-h,-k,-l) only, as a scatter
    coloured by log10 of the integrated intensity (colour range: the 1st percentile to the maximum).

    Args:
      hkl: (n_asu, 3) int Miller indices of the unique reflections.
      integrated: (n_asu,) integrated intensity (photons at phi = 1) per unique reflection.
      path: the PNG to write.
      laue_ops: optional (n_ops, 3, 3) int Laue operators acting on Miller indices.
    """
    hkl = np.asarray(hkl, np.int64)
    integrated = np.asarray(integrated, np.float64)
    ops = np.asarray(laue_ops, np.int64) if laue_ops is not None else np.stack([np.eye(3, dtype=np.int64), -np.eye(3, dtype=np.int64)])
    mates = np.einsum("gij,nj->gni", ops, hkl).reshape(-1, 3)
    value = np.tile(integrated, ops.shape[0])
    mates, first = np.unique(mates, axis=0, return_index=True)
    value = value[first]
    positive = value[value > 0]
    if positive.size:
        vmin, vmax = float(np.log10(np.percentile(positive, 1))), float(np.log10(positive.max()))
    else:
        vmin, vmax = 0.0, 1.0
    logv = np.log10(np.maximum(value, 10.0**vmin))
    planes = [("hk0", 2, (0, 1), ("h", "k")), ("h0l", 1, (0, 2), ("h", "l")), ("0kl", 0, (1, 2), ("k", "l"))]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.4))
    scatter = None
    for ax, (name, zero_axis, (i, j), (xi, yj)) in zip(axes, planes):
        on = mates[:, zero_axis] == 0
        scatter = ax.scatter(mates[on, i], mates[on, j], c=logv[on], s=8, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"{name} ({int(on.sum())} reflections)")
        ax.set_xlabel(xi)
        ax.set_ylabel(yj)
        ax.grid(alpha=0.2)
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes), label="log10 integrated intensity", shrink=0.85)
    return save_figure(fig, pathlib.Path(path))


def plot_cc_true(integrated: np.ndarray, true_integrated: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
    """Recovered vs true integrated intensity per unique reflection (log-log), with their correlation.

    Args:
      integrated: (n_asu,) recovered integrated intensities.
      true_integrated: (n_asu,) true integrated intensities (same rows; NaN where the truth lacks a
        reflection: left out).
      path: the PNG to write.
    """
    a = np.asarray(integrated, np.float64)
    b = np.asarray(true_integrated, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"plot_cc_true: shapes differ: integrated {a.shape}, true_integrated {b.shape}")
    known = np.isfinite(b)
    a, b = a[known], b[known]
    cc = float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    keep = (a > 0) & (b > 0)
    ax.scatter(b[keep], a[keep], s=4, alpha=0.5)
    if keep.any():
        lo = float(min(a[keep].min(), b[keep].min()))
        hi = float(max(a[keep].max(), b[keep].max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("true integrated intensity")
    ax.set_ylabel("recovered integrated intensity")
    ax.set_title(f"CC = {cc:.4f} ({a.size} unique reflections)")
    ax.grid(alpha=0.3)
    return save_figure(fig, pathlib.Path(path))


def draw_all(
    run_dir: str | os.PathLike,
    records: Sequence[Mapping[str, Any]],
    hkl: np.ndarray,
    integrated: np.ndarray,
    true_integrated: np.ndarray | None = None,
    laue_ops: np.ndarray | None = None,
) -> list[pathlib.Path]:
    """Writes ``figures/convergence.png``, ``figures/sections.png`` and, with truth,
    ``figures/cc_true.png`` under ``run_dir``; returns the paths."""
    out = pathlib.Path(run_dir) / FIGURES_DIR
    paths = [
        plot_convergence(records, out / "convergence.png"),
        plot_sections(hkl, integrated, out / "sections.png", laue_ops),
    ]
    if true_integrated is not None:
        paths.append(plot_cc_true(integrated, true_integrated, out / "cc_true.png"))
    return paths
