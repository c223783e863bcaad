"""Merging statistics of two independent half-set reconstructions, per resolution shell.

Per shell (equal volumes in reciprocal space by default): observations (frames that record a reflection,
summed over both halves), unique reflections observed, multiplicity, completeness, mean I/sigma(I),
CC1/2 (Pearson correlation of the two halves' intensities) with a one-sided significance test, CC*
(Karplus & Diederichs, Science 336, 1030 (2012)), Rsplit (White et al., J. Appl. Cryst. 45, 335 (2012)) and,
when the truth is known, CC_true: the correlation of the merged (half-set average) intensities with the truth.

Pure numpy; the table is printed like those of xia2/DIALS, the figure is a PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib

import numpy as np
from scipy import stats as scipy_stats

from emcjax.errors import ConfigError

CC_HALF_LIMIT = 0.3
"""Default CC1/2 a shell must reach for the suggested resolution limit."""
SIGNIFICANCE = 0.01
"""Default one-sided p-value below which CC1/2 counts as significantly above zero."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergingOptions:
    """The settings of the merging table, shared by the commands that make one (``resolution``, ``halves``
    and the pipeline's resolution stage): keyword-only, so that a command's own required fields come first."""

    n_shells: int = 10
    """Number of resolution shells of the merging table (equal reciprocal-space volumes)."""
    cc_half_limit: float = CC_HALF_LIMIT
    """CC1/2 a shell must reach for the suggested resolution limit."""
    significance: float = SIGNIFICANCE
    """One-sided p-value below which CC1/2 counts as significant."""

    def __post_init__(self) -> None:
        if self.n_shells < 1:
            raise ConfigError(f"n_shells must be >= 1, got {self.n_shells}")
        if not 0 < self.significance < 1:
            raise ConfigError(f"significance must be a p-value in (0, 1), got {self.significance}")


def cc_star(cc_half):
    """CC* = sqrt(2 CC1/2 / (1 + CC1/2)) (Karplus & Diederichs 2012): the correlation of the merged data with
    the true signal that CC1/2 implies; NaN where CC1/2 <= 0."""
    cc = np.asarray(cc_half, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cc > 0, np.sqrt(2 * cc / (1 + cc)), np.nan)


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D arrays; NaN for fewer than 3 pairs or no variance."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size < 3:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db / denom) if denom > 0 else float("nan")


def correlation_p_value(cc: float, n: int) -> float:
    """One-sided p-value of a Pearson correlation ``cc`` of ``n`` pairs under no correlation (t-test with
    n - 2 degrees of freedom)."""
    if not np.isfinite(cc) or n < 3:
        return float("nan")
    if cc >= 1:
        return 0.0
    t = cc * math.sqrt((n - 2) / (1 - cc * cc))
    return float(scipy_stats.t.sf(t, n - 2))


def r_split(a, b) -> float:
    """Rsplit = (1/sqrt 2) sum|a - b| / (sum (a + b) / 2) of two half-set intensity arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = 0.5 * float(np.sum(a + b))
    return float(np.sum(np.abs(a - b)) / (math.sqrt(2) * denom)) if denom > 0 else float("nan")


def equal_volume_edges(q_min: float, q_max: float, n_shells: int) -> np.ndarray:
    """(n_shells + 1,) shell edges in 1/Å (|q| = 1/d) enclosing equal reciprocal-space volumes."""
    if n_shells < 1:
        raise ConfigError(f"n_shells must be >= 1, got {n_shells}")
    if not 0 <= q_min < q_max:
        raise ConfigError(f"shell limits must satisfy 0 <= q_min < q_max, got {q_min}, {q_max}")
    edges = np.cbrt(np.linspace(q_min**3, q_max**3, n_shells + 1))
    edges[0], edges[-1] = q_min, q_max  # exactly, so that the extreme reflections are inside
    return edges


def shell_of(q, edges) -> np.ndarray:
    """(n,) int shell index of each |q| (1/Å); -1 outside the edges (the last edge is inclusive)."""
    q = np.asarray(q, np.float64)
    index = np.searchsorted(edges, q, side="right") - 1
    index = np.where(q == edges[-1], len(edges) - 2, index)
    return np.where((q < edges[0]) | (q > edges[-1]), -1, index)


@dataclasses.dataclass(frozen=True)
class MergingStats:
    """Per-shell statistics (arrays of length n_shells) and the same over all shells (``overall``).

    Attributes:
      d_max, d_min: shell limits in Å.
      n_obs: frame observations of the shell's unique reflections (both halves).
      n_unique: unique reflections observed (in both halves).
      n_possible: unique reflections the space group allows in the shell.
      multiplicity: n_obs / n_unique.
      completeness: n_unique / n_possible (fraction).
      mean_i_over_sigma: mean of I/sigma(I) of the merged intensities.
      cc_half, cc_half_p: CC1/2 and its one-sided p-value.
      cc_star: CC* from CC1/2.
      r_split: Rsplit.
      cc_true: correlation of the merged intensities with the truth (NaN without truth).
      true_z_sd: standard deviation of z = (I - k I_true) / sigma(I), k the overall least-squares scale (NaN
        without truth): ~1 when sigma(I) is right.
      true_z_mad: the same spread measured robustly, 1.4826 x the median absolute deviation of z (a few
        reflections with a large error common to both halves raise the standard deviation, not this).
      overall: a MergingStats of one "shell" holding all reflections (None inside ``overall`` itself).
    """

    d_max: np.ndarray
    d_min: np.ndarray
    n_obs: np.ndarray
    n_unique: np.ndarray
    n_possible: np.ndarray
    multiplicity: np.ndarray
    completeness: np.ndarray
    mean_i_over_sigma: np.ndarray
    cc_half: np.ndarray
    cc_half_p: np.ndarray
    cc_star: np.ndarray
    r_split: np.ndarray
    cc_true: np.ndarray
    true_z_sd: np.ndarray
    true_z_mad: np.ndarray
    overall: "MergingStats | None" = None

    @property
    def n_shells(self) -> int:
        return int(self.d_max.shape[0])

    def rows(self) -> list[dict]:
        """One dict per shell (then the overall row, ``shell = "overall"``) of plain floats and ints."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "overall"]
        out = [{"shell": i + 1, **{n: getattr(self, n)[i].item() for n in names}} for i in range(self.n_shells)]
        if self.overall is not None:
            out.append({"shell": "overall", **{n: getattr(self.overall, n)[0].item() for n in names}})
        return out


def _one_shell(i_a, i_b, sigma, n_obs, i_true, true_scale, n_possible, d_max, d_min) -> dict:
    merged = 0.5 * (i_a + i_b)
    cc = pearson(i_a, i_b)
    n_unique = int(i_a.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        ios = merged / sigma
    known = None if i_true is None else np.isfinite(i_true)  # reflections the truth holds
    if known is not None and known.sum() < 2:
        i_true = None
    z = (merged - true_scale * i_true)[known] / sigma[known] if i_true is not None else None
    return dict(
        d_max=d_max,
        d_min=d_min,
        n_obs=int(n_obs.sum()),
        n_unique=n_unique,
        n_possible=int(n_possible),
        multiplicity=float(n_obs.sum() / n_unique) if n_unique else float("nan"),
        completeness=float(n_unique / n_possible) if n_possible else float("nan"),
        mean_i_over_sigma=float(np.mean(ios[np.isfinite(ios)])) if np.isfinite(ios).any() else float("nan"),
        cc_half=cc,
        cc_half_p=correlation_p_value(cc, n_unique),
        cc_star=float(cc_star(cc)),
        r_split=r_split(i_a, i_b) if n_unique else float("nan"),
        cc_true=pearson(merged[known], i_true[known]) if i_true is not None else float("nan"),
        true_z_sd=float(np.std(z)) if z is not None else float("nan"),
        true_z_mad=float(1.4826 * np.median(np.abs(z - np.median(z)))) if z is not None else float("nan"),
    )


def merging_statistics(
    q,
    i_a,
    i_b,
    sigma,
    n_obs,
    possible_q,
    *,
    n_shells: int = 10,
    edges=None,
    i_true=None,
) -> MergingStats:
    """Statistics of the unique reflections observed in both halves, per shell and overall.

    Args:
      q: (n,) |q| = 1/d of each unique reflection (1/Å).
      i_a, i_b: (n,) intensities of the two halves, on a common scale.
      sigma: (n,) sigma(I) of the merged intensity (i_a + i_b) / 2.
      n_obs: (n,) frame observations of each reflection (both halves); reflections with 0 are left out.
      possible_q: |q| of every unique reflection the space group allows in the resolution range (for the
        completeness).
      n_shells: number of equal-volume shells (ignored when ``edges`` is given).
      edges: (n_shells + 1,) ascending shell edges in 1/Å; default equal volumes over [min q, max q].
      i_true: (n,) true intensities (NaN for a reflection the truth lacks: the truth columns are computed over
        the others), or None.
    """
    q = np.asarray(q, np.float64)
    arrays = [np.asarray(x, np.float64) for x in (i_a, i_b, sigma, n_obs)]
    if any(x.shape != q.shape for x in arrays) or (i_true is not None and np.shape(i_true) != q.shape):
        raise ConfigError("merging_statistics: q, i_a, i_b, sigma, n_obs (and i_true) must have the same shape")
    i_a, i_b, sigma, n_obs = arrays
    i_true = None if i_true is None else np.asarray(i_true, np.float64)
    possible_q = np.asarray(possible_q, np.float64)
    if edges is None:
        edges = equal_volume_edges(float(possible_q.min()), float(possible_q.max()), n_shells)
    edges = np.asarray(edges, np.float64)
    observed = n_obs > 0
    shell = shell_of(q, edges)
    possible_shell = shell_of(possible_q, edges)

    true_scale = None
    if i_true is not None:  # overall scale of the merged intensities to the truth (weighted least squares)
        known = observed & np.isfinite(i_true)
        m, t, w = 0.5 * (i_a + i_b)[known], i_true[known], sigma[known] ** -2.0
        true_scale = float(np.sum(w * m * t) / np.sum(w * t * t))

    def select(mask, total_possible, d_max, d_min):
        pick = lambda x: None if x is None else x[mask]  # noqa: E731
        arrays = (pick(x) for x in (i_a, i_b, sigma, n_obs, i_true))
        return _one_shell(*arrays, true_scale, total_possible, d_max, d_min)

    with np.errstate(divide="ignore"):
        d = 1.0 / edges
    rows = [
        select(observed & (shell == s), np.sum(possible_shell == s), d[s], d[s + 1]) for s in range(len(edges) - 1)
    ]
    overall = select(observed & (shell >= 0), np.sum(possible_shell >= 0), d[0], d[-1])

    def build(records, inner):
        return MergingStats(**{k: np.asarray([r[k] for r in records]) for k in records[0]}, overall=inner)

    return build(rows, build([overall], None))


def suggest_resolution(
    stats: MergingStats, cc_half_limit: float = CC_HALF_LIMIT, significance: float = SIGNIFICANCE
) -> tuple[float | None, str]:
    """Suggested high-resolution limit: d_min of the outermost shell such that it and every shell at lower
    resolution have CC1/2 >= ``cc_half_limit`` and a CC1/2 significantly above 0 (one-sided p < significance).

    Returns:
      ``(d_min in Å or None when even the first shell fails, the criterion in words)``.
    """
    criterion = f"CC1/2 >= {cc_half_limit:g} and significant (t-test, p < {significance:g}) in every shell to d_min"
    passed = (stats.cc_half >= cc_half_limit) & (stats.cc_half_p < significance)
    n_pass = int(np.argmin(passed)) if not passed.all() else stats.n_shells
    if n_pass == 0:
        return None, criterion
    note = "" if n_pass < stats.n_shells else " (every shell passes: the data may extend further)"
    return float(stats.d_min[n_pass - 1]), criterion + note


_COLUMNS = [
    # (header, field, format)
    ("d_max", "d_max", "{:7.2f}"),
    ("d_min", "d_min", "{:7.2f}"),
    ("#obs", "n_obs", "{:8d}"),
    ("#uniq", "n_unique", "{:6d}"),
    ("mult.", "multiplicity", "{:6.1f}"),
    ("%comp", "completeness", "{:6.1f}"),
    ("<I/sI>", "mean_i_over_sigma", "{:7.1f}"),
    ("cc_half", "cc_half", "{:8.3f}"),
    ("cc_star", "cc_star", "{:8.3f}"),
    ("r_split", "r_split", "{:8.3f}"),
    ("cc_true", "cc_true", "{:8.3f}"),
    ("sd(z)", "true_z_sd", "{:6.2f}"),
    ("mad(z)", "true_z_mad", "{:6.2f}"),
]


def _cell(fmt: str, value, width: int) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "-".rjust(width)
    return fmt.format(value).rjust(width)


def format_table(stats: MergingStats, *, significance: float = SIGNIFICANCE) -> str:
    """The merging table as text: one line per shell, then the overall line; ``*`` marks a significant CC1/2
    (p < ``significance``), as in DIALS. The truth columns (cc_true; sd(z) and mad(z), the spread of
    z = (I - k I_true) / sigma(I)) are left out when no truth is known."""
    truth = np.isfinite(stats.cc_true).any()
    columns = [c for c in _COLUMNS if truth or c[1] not in ("cc_true", "true_z_sd", "true_z_mad")]
    widths = [max(len(h), len(fmt.format(1.0 if "d" not in fmt else 1))) + 1 for h, _, fmt in columns]
    lines = ["".join(h.rjust(w) for (h, _, _), w in zip(columns, widths))]
    for row in stats.rows():
        cells = []
        for (_, field, fmt), w in zip(columns, widths):
            value = row[field]
            if field == "completeness":
                value = 100 * value
            text = _cell(fmt, value, w - 1)
            if field == "cc_half":
                text += "*" if row["cc_half_p"] < significance else " "
            else:
                text = " " + text
            cells.append(text)
        if row["shell"] == "overall":
            lines.append("-" * len(lines[0]))
        lines.append("".join(cells))
    return "\n".join(lines)


def to_csv(stats: MergingStats) -> str:
    """The per-shell rows and the overall row as CSV text (completeness as a fraction)."""
    rows = stats.rows()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(stats: MergingStats, path: str | os.PathLike, d_suggested: float | None = None) -> pathlib.Path:
    """CC1/2, CC*, CC_true (when known), Rsplit and completeness against 1/d (top axis: d in Å); PNG."""
    from emcjax.figures import save_figure, plt

    centre = np.sqrt(0.5 * (stats.d_max.astype(np.float64) ** -2 + stats.d_min.astype(np.float64) ** -2))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(centre, stats.cc_half, "o-", label="CC1/2")
    ax.plot(centre, stats.cc_star, "s-", label="CC*")
    if np.isfinite(stats.cc_true).any():
        ax.plot(centre, stats.cc_true, "^--", label="CC_true (merged vs truth)")
    ax.axhline(CC_HALF_LIMIT, color="grey", lw=0.8, ls=":")
    if d_suggested is not None:
        ax.axvline(1 / d_suggested, color="red", lw=0.8, ls="--", label=f"suggested d_min {d_suggested:.2f} Å")
    ax.set_xlabel("1/d (1/Å)")
    ax.set_ylabel("correlation")
    ax.set_ylim(min(0.0, float(np.nanmin(stats.cc_half)) - 0.05), 1.02)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("half-set correlation per shell")
    ax2.plot(centre, stats.r_split, "o-", label="Rsplit")
    ax2.plot(centre, stats.completeness, "s-", label="completeness")
    ax2.set_xlabel("1/d (1/Å)")
    ax2.legend(fontsize=8)
    ax2.set_title("Rsplit and completeness")
    inverse = lambda x: 1 / np.maximum(x, 1e-6)  # noqa: E731
    secondary = ax.secondary_xaxis("top", functions=(inverse, inverse))
    secondary.set_xlabel("d (Å)")
    return save_figure(fig, pathlib.Path(path))
